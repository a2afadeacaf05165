package tunnel_test

import (
	"context"
	"errors"
	"testing"
	"testing/synctest"
	"time"

	"github.com/caddy-kas/caddy-kas/tunnel"
)

func TestRouterFindWaitsForAgent(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := tunnel.NewStore()
		r := tunnel.NewRouter(s)
		found := make(chan tunnel.Tunnel, 1)
		go func() {
			c, err := r.Find(context.Background(), 7)
			if err != nil {
				t.Error(err)
			}
			found <- c
		}()
		synctest.Wait() // Find is waiting
		ft := newFake(7)
		defer s.Add(ft)()
		if c := <-found; c != ft {
			t.Errorf("Find returned %v, want the tunnel added", c)
		}
	})
}

func TestRouterFindBeforeAndAfterAdd(t *testing.T) {
	s := tunnel.NewStore()
	r := tunnel.NewRouter(s)
	ft := newFake(8)
	remove := s.Add(ft)
	if c, err := r.Find(context.Background(), 8); err != nil || c != ft {
		t.Fatalf("Find = %v, %v; want the tunnel added before", c, err)
	}
	remove()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := r.Find(ctx, 8); !errors.Is(err, tunnel.ErrNoConnection) {
		t.Errorf("Find after remove = %v, want tunnel.ErrNoConnection", err)
	}
}

func TestRouterFindGivesUp(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := tunnel.NewStore()
		r := tunnel.NewRouter(s)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		start := time.Now()
		_, err := r.Find(ctx, 42)
		if !errors.Is(err, tunnel.ErrNoConnection) || !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Find = %v, want tunnel.ErrNoConnection and DeadlineExceeded", err)
		}
		if waited := time.Since(start); waited != 20*time.Second {
			t.Errorf("Find waited %s, want the context's 20s", waited)
		}
		if n := tunnel.NumAgentEntries(s); n != 0 {
			t.Errorf("store keeps %d entries after a failed wait, want 0", n)
		}
	})
}

func TestRouterPicksLiveLeastLoaded(t *testing.T) {
	s := tunnel.NewStore()
	r := tunnel.NewRouter(s)
	busy, idle, dead := newFake(3), newFake(3), newFake(3)
	for _, ft := range []*fakeTunnel{busy, idle, dead} {
		defer s.Add(ft)()
	}
	dead.Close()
	busy.load.Store(1)

	c, err := r.Find(context.Background(), 3)
	if err != nil {
		t.Fatal(err)
	}
	if c != idle {
		t.Errorf("Find picked the %s tunnel, want the idle one", map[tunnel.Tunnel]string{busy: "busy", dead: "dead"}[c])
	}
	if got := len(s.Tunnels(3, nil)); got != 2 {
		t.Errorf("Tunnels = %d live tunnels, want 2", got)
	}
	if got := len(s.All()); got != 2 {
		t.Errorf("All = %d live tunnels, want 2", got)
	}
}

func TestRouterManyTunnelsOfOneAgent(t *testing.T) {
	s := tunnel.NewStore()
	r := tunnel.NewRouter(s)
	var least *fakeTunnel
	for i := range 20 { // more than Find looks at without allocating
		ft := newFake(9)
		ft.load.Store(int64(100 - i))
		least = ft
		defer s.Add(ft)()
	}
	if c, err := r.Find(context.Background(), 9); err != nil || c != least {
		t.Errorf("Find = %v, %v; want the least loaded of 20", c, err)
	}
}

func TestStoreRemoveAndClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := tunnel.NewStore()
		r := tunnel.NewRouter(s)
		remove := s.Add(newFake(5))
		remove()
		remove() // twice is fine
		if n := tunnel.NumAgentEntries(s); n != 0 {
			t.Fatalf("store keeps %d entries after remove, want 0", n)
		}

		kept := newFake(5)
		s.Add(kept)
		waiting := make(chan error, 1)
		go func() {
			_, err := r.Find(context.Background(), 6)
			waiting <- err
		}()
		synctest.Wait()
		s.Close()
		<-kept.Done() // closed by the store
		if err := <-waiting; !errors.Is(err, tunnel.ErrStoreClosed) {
			t.Errorf("waiting Find = %v, want tunnel.ErrStoreClosed", err)
		}
		if _, err := r.Find(context.Background(), 5); !errors.Is(err, tunnel.ErrStoreClosed) {
			t.Errorf("Find after Close = %v, want tunnel.ErrStoreClosed", err)
		}
		late := newFake(5)
		s.Add(late)
		if late.Err() == nil {
			t.Error("a tunnel added to a closed store stays open")
		}
	})
}

func TestRouterRoutesByAgent(t *testing.T) {
	s := tunnel.NewStore()
	r := tunnel.NewRouter(s)
	for _, id := range []int64{1, 2} {
		defer s.Add(newFake(id))()
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

func TestRouterFindDoesNotAllocate(t *testing.T) {
	s := tunnel.NewStore()
	r := tunnel.NewRouter(s)
	for range 3 {
		defer s.Add(newFake(4))()
	}
	ctx := context.Background()
	if n := testing.AllocsPerRun(100, func() { r.Find(ctx, 4) }); n != 0 {
		t.Errorf("Find of a connected agent allocates %v times, want 0", n)
	}
}

func TestRouterFindExpected(t *testing.T) {
	const window, wait = 30 * time.Second, 20 * time.Second
	tests := []struct {
		name string
		// storeAge is how long the store exists before the request.
		storeAge time.Duration
		// goneFor, if set, is how long before the request the agent's
		// last tunnel was removed; else the agent never connected.
		goneFor time.Duration
		// reconnectAfter, if set, adds a tunnel this long into the wait.
		reconnectAfter time.Duration
		window         time.Duration

		wantWaited time.Duration
		wantFound  bool
		wantAbsent bool // the error wraps an *AbsentError
		wantSeen   bool
	}{
		{name: "never connected, store just made: waits the request's time", storeAge: 0, window: window, wantWaited: wait},
		{name: "never connected, window ends during the wait", storeAge: 25 * time.Second, window: window, wantWaited: 5 * time.Second, wantAbsent: true},
		{name: "never connected, window over: fails at once", storeAge: time.Hour, window: window, wantWaited: 0, wantAbsent: true},
		{name: "just disconnected: waits", storeAge: time.Hour, goneFor: 5 * time.Second, window: window, wantWaited: wait},
		{name: "just disconnected and reconnects", storeAge: time.Hour, goneFor: 5 * time.Second, reconnectAfter: 3 * time.Second, window: window, wantWaited: 3 * time.Second, wantFound: true},
		{name: "gone longer than the window: fails at once", storeAge: time.Hour, goneFor: 31 * time.Second, window: window, wantWaited: 0, wantAbsent: true, wantSeen: true},
		{name: "no window: waits for an agent gone long ago", storeAge: time.Hour, goneFor: time.Hour / 2, window: 0, wantWaited: wait},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				const id = 11
				s := tunnel.NewStore()
				r := tunnel.NewRouter(s)
				var removedAt time.Time
				if tt.goneFor > 0 {
					time.Sleep(tt.storeAge - tt.goneFor)
					s.Add(newFake(id))()
					removedAt = time.Now()
					time.Sleep(tt.goneFor)
				} else {
					time.Sleep(tt.storeAge)
				}
				if tt.reconnectAfter > 0 {
					go func() {
						time.Sleep(tt.reconnectAfter)
						s.Add(newFake(id))
					}()
				}
				ctx, cancel := context.WithTimeout(context.Background(), wait)
				defer cancel()
				start := time.Now()
				c, err := r.FindExpected(ctx, id, tt.window)
				if waited := time.Since(start); waited != tt.wantWaited {
					t.Errorf("waited %s, want %s", waited, tt.wantWaited)
				}
				if found := err == nil && c != nil; found != tt.wantFound {
					t.Fatalf("FindExpected = %v, %v; want found %v", c, err, tt.wantFound)
				}
				if tt.wantFound {
					return
				}
				if !errors.Is(err, tunnel.ErrNoConnection) {
					t.Errorf("error %v does not wrap ErrNoConnection", err)
				}
				var absent *tunnel.AbsentError
				if errors.As(err, &absent) != tt.wantAbsent {
					t.Fatalf("error %v: wraps an AbsentError: %v, want %v", err, absent != nil, tt.wantAbsent)
				}
				if absent == nil {
					return
				}
				if absent.AgentID != id || absent.Seen != tt.wantSeen {
					t.Errorf("AbsentError %+v, want agent %d, seen %v", absent, id, tt.wantSeen)
				}
				if tt.wantSeen && !absent.Since.Equal(removedAt) {
					t.Errorf("AbsentError.Since = %s, want the removal at %s", absent.Since, removedAt)
				}
			})
		})
	}
}
