package tunnel

import (
	"context"
	"errors"
	"io"
	"net/http"
	"testing"
	"time"
)

func TestRegistryFindWaitsForAgent(t *testing.T) {
	r := NewMemoryRegistry()
	found := make(chan *Conn, 1)
	go func() {
		c, err := r.Find(context.Background(), 7)
		if err != nil {
			t.Error(err)
		}
		found <- c
	}()
	// Let Find start waiting (not required for correctness: Register
	// before Find must work too).
	time.Sleep(20 * time.Millisecond)
	p := newPair(t, echoHandler(), pairOptions{agent: AgentInfo{ID: 7}})
	unregister := r.Register(p.kas)
	defer unregister()
	select {
	case c := <-found:
		if c != p.kas {
			t.Errorf("Find returned %p, want %p", c, p.kas)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Find still waiting after the agent registered")
	}
}

func TestRegistryFindGivesUp(t *testing.T) {
	r := NewMemoryRegistry()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := r.Find(ctx, 42)
	if !errors.Is(err, ErrNoConnection) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Find = %v, want ErrNoConnection and DeadlineExceeded", err)
	}
	if n := len(r.agents); n != 0 {
		t.Errorf("registry keeps %d entries after a failed wait, want 0", n)
	}
}

func TestRegistryPicksLiveLeastLoaded(t *testing.T) {
	r := NewMemoryRegistry()
	block := make(chan struct{})
	defer close(block)
	slow := http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		w.WriteHeader(http.StatusOK)
		http.NewResponseController(w).Flush()
		<-block
	})
	busy := newPair(t, slow, pairOptions{agent: AgentInfo{ID: 3}})
	idle := newPair(t, slow, pairOptions{agent: AgentInfo{ID: 3}})
	dead := newPair(t, slow, pairOptions{agent: AgentInfo{ID: 3}})
	for _, p := range []*pair{busy, idle, dead} {
		defer r.Register(p.kas)()
	}
	dead.kas.Close()
	resp, err := busy.get(context.Background(), "/hold")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()

	c, err := r.Find(context.Background(), 3)
	if err != nil {
		t.Fatal(err)
	}
	if c != idle.kas {
		t.Errorf("Find picked the %s connection, want the idle one", map[*Conn]string{busy.kas: "busy", dead.kas: "dead"}[c])
	}
	if got := len(r.Conns(3)); got != 2 {
		t.Errorf("Conns = %d live connections, want 2", got)
	}
}

func TestRegistryUnregisterAndClose(t *testing.T) {
	r := NewMemoryRegistry()
	p := newPair(t, echoHandler(), pairOptions{agent: AgentInfo{ID: 5}})
	unregister := r.Register(p.kas)
	unregister()
	unregister() // twice is fine
	if n := len(r.agents); n != 0 {
		t.Fatalf("registry keeps %d entries after unregister, want 0", n)
	}

	q := newPair(t, echoHandler(), pairOptions{agent: AgentInfo{ID: 5}})
	r.Register(q.kas)
	waiting := make(chan error, 1)
	go func() {
		_, err := r.Find(context.Background(), 6)
		waiting <- err
	}()
	time.Sleep(20 * time.Millisecond)
	r.Close()
	waitDone(t, q.kas.Done(), "registered conn closed by registry Close")
	select {
	case err := <-waiting:
		if !errors.Is(err, ErrRegistryClosed) {
			t.Errorf("waiting Find = %v, want ErrRegistryClosed", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Find still waiting after Close")
	}
	if _, err := r.Find(context.Background(), 5); !errors.Is(err, ErrRegistryClosed) {
		t.Errorf("Find after Close = %v, want ErrRegistryClosed", err)
	}
}

func TestRegistryRoutesRequests(t *testing.T) {
	r := NewMemoryRegistry()
	for _, id := range []int64{1, 2} {
		p := newPair(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			io.WriteString(w, req.URL.Path)
		}), pairOptions{agent: AgentInfo{ID: id}})
		defer r.Register(p.kas)()
	}
	for _, id := range []int64{1, 2} {
		c, err := r.Find(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		if c.Agent().ID != id {
			t.Errorf("Find(%d) returned agent %d", id, c.Agent().ID)
		}
	}
}
