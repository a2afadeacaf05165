package tunnel_test

import (
	"context"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/caddy-kas/caddy-kas/tunnel"
)

// movableTunnel is a fakeTunnel whose agent can be asked to move.
type movableTunnel struct {
	*fakeTunnel
	moves atomic.Int32
}

func newMovable(agentID int64) *movableTunnel { return &movableTunnel{fakeTunnel: newFake(agentID)} }

func (m *movableTunnel) Move(context.Context) error { m.moves.Add(1); return nil }
func (m *movableTunnel) Moving() bool               { return m.moves.Load() > 0 }

var _ tunnel.Movable = (*movableTunnel)(nil)

func TestRouterAvoidsMovingTunnels(t *testing.T) {
	type spec struct {
		moving bool
		load   int64
	}
	for _, tc := range []struct {
		name    string
		tunnels []spec
		want    int
	}{
		{"a moving tunnel, however idle, after one that is not", []spec{{true, 0}, {false, 5}}, 1},
		{"the least loaded of those not moving", []spec{{false, 3}, {true, 0}, {false, 2}}, 2},
		{"only moving tunnels: the least loaded of them", []spec{{true, 4}, {true, 1}}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := tunnel.NewStore()
			var all []*movableTunnel
			for _, s := range tc.tunnels {
				m := newMovable(1)
				m.load.Store(s.load)
				if s.moving {
					_ = m.Move(t.Context())
				}
				store.Add(m)
				all = append(all, m)
			}
			got, err := tunnel.NewRouter(store).Find(t.Context(), 1)
			if err != nil {
				t.Fatal(err)
			}
			if got != all[tc.want] {
				t.Errorf("picked another tunnel than number %d", tc.want)
			}
		})
	}
}

func TestDrain(t *testing.T) {
	const grace = time.Minute
	for _, tc := range []struct {
		name string
		// busyFor is how long the tunnel carries a request after the
		// drain begins; zero: none.
		busyFor time.Duration
		// replacedAfter is when the agent's new tunnel is up; negative:
		// no Replaced check.
		replacedAfter time.Duration
		wantClosedAt  time.Duration
	}{
		{"idle: closed once settled", 0, -1, time.Second},
		{"busy: closed when its last request ends", 10 * time.Second, -1, 10 * time.Second},
		{"busy beyond the grace: closed at its end", 2 * time.Minute, -1, grace},
		{"idle, closed once the new tunnel is up", 0, 5 * time.Second, 5 * time.Second},
		{"idle, the new tunnel never comes: closed at the grace's end", 0, time.Hour, grace},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				m := newMovable(1)
				start := time.Now()
				if tc.busyFor > 0 {
					m.load.Store(1)
					time.AfterFunc(tc.busyFor, func() { m.load.Store(0) })
				}
				opts := tunnel.DrainOptions{Grace: grace}
				if tc.replacedAfter >= 0 {
					opts.Replaced = func() bool { return time.Since(start) >= tc.replacedAfter }
				}
				tunnel.Drain(t.Context(), m, opts)
				if !m.Moving() {
					t.Error("the agent was not asked to move")
				}
				if m.Err() == nil {
					t.Error("the tunnel is still open")
				}
				// The drain looks every 100 ms.
				if got := time.Since(start); got < tc.wantClosedAt || got > tc.wantClosedAt+200*time.Millisecond {
					t.Errorf("closed after %v, want %v", got, tc.wantClosedAt)
				}
			})
		})
	}
}

func TestStoreDrain(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := tunnel.NewStore()
		idle, busy := newMovable(1), newMovable(2)
		busy.load.Store(1)
		store.Add(idle)
		store.Add(busy)
		if store.Draining() {
			t.Fatal("draining before Drain")
		}
		start := time.Now()
		drained := make(chan struct{})
		go func() {
			defer close(drained)
			store.Drain(context.Background(), time.Minute)
		}()
		synctest.Wait()
		if !store.Draining() {
			t.Fatal("not draining during Drain")
		}
		late := newMovable(3)
		store.Add(late) // its handshake raced the stop
		time.Sleep(5 * time.Second)
		if idle.Err() == nil || late.Err() == nil {
			t.Error("idle tunnels still open 5 s into the drain")
		}
		if busy.Err() != nil {
			t.Error("a busy tunnel closed 5 s into the drain")
		}
		busy.load.Store(0)
		<-drained
		if busy.Err() == nil {
			t.Error("the busy tunnel is open after the drain")
		}
		for _, m := range []*movableTunnel{idle, busy, late} {
			if !m.Moving() {
				t.Errorf("agent %d was not asked to move", m.info.ID)
			}
		}
		if d := time.Since(start); d > 6*time.Second {
			t.Errorf("drain took %v after the last request ended at 5 s", d)
		}
		store.Drain(context.Background(), time.Minute) // again: returns at once
	})
}

func TestMaxAgeSchedule(t *testing.T) {
	for _, maxAge := range []time.Duration{time.Second, 2 * time.Hour} {
		for range 100 {
			move, grace := tunnel.MaxAgeSchedule(maxAge)
			if move+grace > maxAge {
				t.Fatalf("max age %v: move after %v with a grace of %v ends after the age", maxAge, move, grace)
			}
			if move < maxAge*30/100 || grace < maxAge*65/100 {
				t.Fatalf("max age %v: move after %v, grace %v: want about 35 %% and 65 %%", maxAge, move, grace)
			}
		}
	}
	if move, grace := tunnel.MaxAgeSchedule(0); move != 0 || grace != 0 {
		t.Errorf("no max age gave %v, %v", move, grace)
	}
}
