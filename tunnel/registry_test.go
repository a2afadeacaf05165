package tunnel_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/tunneltest"
)

func TestRegistryFindWaitsForAgent(t *testing.T) {
	r := tunnel.NewMemoryRegistry()
	found := make(chan *tunnel.Conn, 1)
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
	p := tunneltest.NewPair(t, echoHandler(), tunneltest.Options{Agent: tunnel.AgentInfo{ID: 7}})
	unregister := r.Register(p.KAS)
	defer unregister()
	select {
	case c := <-found:
		if c != p.KAS {
			t.Errorf("Find returned %p, want %p", c, p.KAS)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Find still waiting after the agent registered")
	}
}

func TestRegistryFindGivesUp(t *testing.T) {
	r := tunnel.NewMemoryRegistry()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := r.Find(ctx, 42)
	if !errors.Is(err, tunnel.ErrNoConnection) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Find = %v, want tunnel.ErrNoConnection and DeadlineExceeded", err)
	}
	if n := tunnel.NumAgentEntries(r); n != 0 {
		t.Errorf("registry keeps %d entries after a failed wait, want 0", n)
	}
}

func TestRegistryPicksLiveLeastLoaded(t *testing.T) {
	r := tunnel.NewMemoryRegistry()
	block := make(chan struct{})
	defer close(block)
	slow := http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		w.WriteHeader(http.StatusOK)
		http.NewResponseController(w).Flush()
		<-block
	})
	busy := tunneltest.NewPair(t, slow, tunneltest.Options{Agent: tunnel.AgentInfo{ID: 3}})
	idle := tunneltest.NewPair(t, slow, tunneltest.Options{Agent: tunnel.AgentInfo{ID: 3}})
	dead := tunneltest.NewPair(t, slow, tunneltest.Options{Agent: tunnel.AgentInfo{ID: 3}})
	for _, p := range []*tunneltest.Pair{busy, idle, dead} {
		defer r.Register(p.KAS)()
	}
	dead.KAS.Close()
	resp, err := busy.Get(context.Background(), "/hold")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()

	c, err := r.Find(context.Background(), 3)
	if err != nil {
		t.Fatal(err)
	}
	if c != idle.KAS {
		t.Errorf("Find picked the %s connection, want the idle one", map[*tunnel.Conn]string{busy.KAS: "busy", dead.KAS: "dead"}[c])
	}
	if got := len(r.Conns(3)); got != 2 {
		t.Errorf("Conns = %d live connections, want 2", got)
	}
}

func TestRegistryUnregisterAndClose(t *testing.T) {
	r := tunnel.NewMemoryRegistry()
	p := tunneltest.NewPair(t, echoHandler(), tunneltest.Options{Agent: tunnel.AgentInfo{ID: 5}})
	unregister := r.Register(p.KAS)
	unregister()
	unregister() // twice is fine
	if n := tunnel.NumAgentEntries(r); n != 0 {
		t.Fatalf("registry keeps %d entries after unregister, want 0", n)
	}

	q := tunneltest.NewPair(t, echoHandler(), tunneltest.Options{Agent: tunnel.AgentInfo{ID: 5}})
	r.Register(q.KAS)
	waiting := make(chan error, 1)
	go func() {
		_, err := r.Find(context.Background(), 6)
		waiting <- err
	}()
	time.Sleep(20 * time.Millisecond)
	r.Close()
	tunneltest.WaitDone(t, q.KAS.Done(), "registered conn closed by registry Close")
	select {
	case err := <-waiting:
		if !errors.Is(err, tunnel.ErrRegistryClosed) {
			t.Errorf("waiting Find = %v, want tunnel.ErrRegistryClosed", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Find still waiting after Close")
	}
	if _, err := r.Find(context.Background(), 5); !errors.Is(err, tunnel.ErrRegistryClosed) {
		t.Errorf("Find after Close = %v, want tunnel.ErrRegistryClosed", err)
	}
}

func TestRegistryRoutesRequests(t *testing.T) {
	r := tunnel.NewMemoryRegistry()
	for _, id := range []int64{1, 2} {
		p := tunneltest.NewPair(t, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			io.WriteString(w, req.URL.Path)
		}), tunneltest.Options{Agent: tunnel.AgentInfo{ID: id}})
		defer r.Register(p.KAS)()
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
