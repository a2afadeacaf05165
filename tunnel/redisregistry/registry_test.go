package redisregistry

import (
	"context"
	"errors"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap/zaptest"

	"github.com/caddy-kas/caddy-kas/internal/redistest"
	"github.com/caddy-kas/caddy-kas/tunnel"
)

// liveness bounds every wait of these tests; reaching it is a failure, not
// a measurement.
const liveness = 60 * time.Second

// fakeTunnel is a tunnel.Tunnel of one agent that carries no requests.
type fakeTunnel struct {
	info        tunnel.AgentInfo
	connectedAt time.Time

	mu    sync.Mutex // guards after and done
	after []func()
	done  bool
}

func newTunnel(agentID, projectID, connectionID int64) *fakeTunnel {
	return &fakeTunnel{
		info: tunnel.AgentInfo{ID: agentID, ProjectID: projectID, Name: "agent-" + strconv.FormatInt(agentID, 10),
			Meta: tunnel.AgentMeta{Version: "v16.5.0", PodName: "agentk-0", PodNamespace: "gitlab-agent", PodID: 42, ConnectionID: connectionID}},
		connectedAt: time.Now().Truncate(time.Millisecond),
	}
}

func (f *fakeTunnel) RoundTrip(*tunnel.Request) (*http.Response, error) { return nil, net.ErrClosed }
func (f *fakeTunnel) Agent() tunnel.AgentInfo                          { return f.info }
func (f *fakeTunnel) ConnectedAt() time.Time                           { return f.connectedAt }
func (f *fakeTunnel) Load() int64                                      { return 0 }
func (f *fakeTunnel) Done() <-chan struct{}                            { return nil }
func (f *fakeTunnel) Err() error                                       { return nil }

func (f *fakeTunnel) AfterDone(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.done {
		go fn()
		return
	}
	f.after = append(f.after, fn)
}

func (f *fakeTunnel) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.done {
		f.done = true
		for _, fn := range f.after {
			go fn()
		}
	}
	return nil
}

// testTuning makes failures show and heal quickly; a waiter is woken only
// by events and re-subscriptions (the bounded wake-up is tested apart).
var testTuning = tuning{
	opTimeout:     time.Second,
	wakeInterval:  time.Hour,
	retryInterval: 100 * time.Millisecond,
	logInterval:   time.Second,
	pingInterval:  200 * time.Millisecond,
}

// clientOptions are what every test client shares: deadlines of contexts
// bound every call.
func singleClient(t *testing.T, addr string) redis.UniversalClient {
	c := redis.NewClient(&redis.Options{Addr: addr, ContextTimeoutEnabled: true, DialTimeout: time.Second, MaxRetries: 1})
	t.Cleanup(func() { c.Close() })
	return c
}

func newNode(t *testing.T, client redis.UniversalClient, url string, tn tuning, edit ...func(*Options)) *Registry {
	t.Helper()
	opts := Options{Client: client, OwnURLs: []string{url}, Logger: zaptest.NewLogger(t).Named(url)}
	for _, e := range edit {
		e(&opts)
	}
	r, err := newRegistry(opts, tn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = r.Close(ctx)
	})
	return r
}

// waitNodes waits, as a request waiting for the agent does, until r names
// exactly want as the other nodes that hold the agent. Errors (Redis away)
// are waited out the same way.
func waitNodes(t *testing.T, r *Registry, agentID int64, want ...string) {
	t.Helper()
	deadline := time.After(liveness)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		got, changed, err := r.Nodes(ctx, agentID)
		cancel()
		if err == nil && slices.Equal(got, want) {
			return
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("agent %d: nodes are %q (error %v), want %q", agentID, got, err, want)
		}
	}
}

// eventually retries check until it succeeds.
func eventually(t *testing.T, check func() error) {
	t.Helper()
	deadline := time.Now().Add(liveness)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// backend is one way to run Redis with a client factory.
type backend struct {
	name  string
	start func(t *testing.T) func() redis.UniversalClient
}

var backends = []backend{
	{"single", func(t *testing.T) func() redis.UniversalClient {
		s := redistest.StartServer(t)
		return func() redis.UniversalClient { return singleClient(t, s.Addr()) }
	}},
	{"sentinel", func(t *testing.T) func() redis.UniversalClient {
		s := redistest.StartSentinel(t)
		return func() redis.UniversalClient { return failoverClient(t, s) }
	}},
	{"cluster", func(t *testing.T) func() redis.UniversalClient {
		c := redistest.StartCluster(t)
		return func() redis.UniversalClient {
			cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs(), ContextTimeoutEnabled: true, DialTimeout: time.Second})
			t.Cleanup(func() { cc.Close() })
			return cc
		}
	}},
}

func failoverClient(t *testing.T, s *redistest.Sentinel) redis.UniversalClient {
	c := redis.NewFailoverClient(&redis.FailoverOptions{MasterName: s.MasterName, SentinelAddrs: s.SentinelAddrs,
		ContextTimeoutEnabled: true, DialTimeout: time.Second, MaxRetries: 1})
	t.Cleanup(func() { c.Close() })
	return c
}

// TestTwoNodes runs two registries (two nodes) on one Redis of each kind:
// publish and unpublish, waiters woken by events, the tracker, the shared
// connection count, and Close removing the node's entries.
func TestTwoNodes(t *testing.T) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) {
			newClient := b.start(t)
			const urlA, urlB = "https://10.0.0.1:8155", "https://10.0.0.2:8155"
			a := newNode(t, newClient(), urlA, testTuning)
			bn := newNode(t, newClient(), urlB, testTuning)
			ctx := ctxT(t)

			waitNodes(t, bn, 7)
			t1 := newTunnel(7, 70, 1)
			unpublish1 := a.Publish(t1)
			waitNodes(t, bn, 7, urlA)
			waitNodes(t, a, 7) // its own URLs are left out

			conns, err := bn.ConnectionsByAgentIDs(ctx, []int64{7, 8})
			if err != nil {
				t.Fatal(err)
			}
			want := Connection{AgentID: 7, ProjectID: 70, AgentName: "agent-7", Meta: t1.info.Meta, ConnectedAt: t1.connectedAt, Node: urlA}
			if len(conns) != 1 || !conns[0].ConnectedAt.Equal(want.ConnectedAt) {
				t.Fatalf("connections of agent 7: %+v, want %+v", conns, want)
			}
			conns[0].ConnectedAt = want.ConnectedAt // same instant; the location differs after JSON
			if conns[0] != want {
				t.Fatalf("connection of agent 7: %+v, want %+v", conns[0], want)
			}

			// A second tunnel of the agent on the same node: losing the
			// first keeps the node listed.
			t2 := newTunnel(7, 70, 2)
			a.Publish(t2)
			eventually(t, func() error { return wantConnections(bn.ConnectionsByProjectIDs(ctx, []int64{70}))(1, 2) })
			unpublish1()
			unpublish1() // twice is harmless
			eventually(t, func() error { return wantConnections(bn.ConnectionsByAgentIDs(ctx, []int64{7}))(2) })
			waitNodes(t, bn, 7, urlA)

			// The agent on both nodes; the tracker sees both.
			bn.Publish(newTunnel(7, 70, 3))
			waitNodes(t, a, 7, urlB)
			eventually(t, func() error { return wantConnections(a.AllConnections(ctx))(2, 3) })

			// The tunnel ends (closed, not unpublished): gone everywhere.
			t2.Close()
			waitNodes(t, bn, 7)
			eventually(t, func() error { return wantConnections(bn.ConnectionsByAgentIDs(ctx, []int64{7}))(3) })

			// The connection count is shared.
			key := "count-" + b.name
			for i, node := range []*Registry{a, bn, a} {
				if ok, _, err := node.Count(ctx, key, 3); err != nil || !ok {
					t.Fatalf("count %d: ok %v, error %v", i+1, ok, err)
				}
			}
			ok, retryAfter, err := bn.Count(ctx, key, 3)
			if err != nil || ok || retryAfter <= 0 || retryAfter > time.Minute {
				t.Fatalf("count over the limit: ok %v, retry after %v, error %v", ok, retryAfter, err)
			}

			// Close removes this node's entries and wakes the waiters.
			bn.Publish(newTunnel(8, 80, 4))
			waitNodes(t, a, 8, urlB)
			if err := bn.Close(ctx); err != nil {
				t.Fatal(err)
			}
			waitNodes(t, a, 8)
			waitNodes(t, a, 7)
			if err := wantConnections(a.AllConnections(ctx))(); err != nil {
				t.Fatal(err)
			}
			if _, _, err := bn.Nodes(ctx, 7); !errors.Is(err, ErrUnavailable) {
				t.Fatalf("Nodes after Close: %v, want ErrUnavailable", err)
			}
		})
	}
}

// wantConnections checks that a tracker answer lists exactly the
// connection ids want, in order.
func wantConnections(conns []Connection, err error) func(want ...int64) error {
	return func(want ...int64) error {
		if err != nil {
			return err
		}
		var got []int64
		for _, c := range conns {
			got = append(got, c.Meta.ConnectionID)
		}
		if !slices.Equal(got, want) {
			return errors.New("connections " + strconv.Quote(strconv.Itoa(len(got))) + " differ: got " + fmtIDs(got) + ", want " + fmtIDs(want))
		}
		return nil
	}
}

func fmtIDs(ids []int64) string {
	s := "["
	for i, id := range ids {
		if i > 0 {
			s += " "
		}
		s += strconv.FormatInt(id, 10)
	}
	return s + "]"
}
