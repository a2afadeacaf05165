package redisregistry

import (
	"context"
	"errors"
	"fmt"
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
func (f *fakeTunnel) Agent() tunnel.AgentInfo                           { return f.info }
func (f *fakeTunnel) ConnectedAt() time.Time                            { return f.connectedAt }
func (f *fakeTunnel) Load() int64                                       { return 0 }
func (f *fakeTunnel) Done() <-chan struct{}                             { return nil }
func (f *fakeTunnel) Err() error                                        { return nil }

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

// singleClient returns a client of one Redis whose calls the deadlines of
// their contexts bound.
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
			return fmt.Errorf("connections %v, want %v", got, want)
		}
		return nil
	}
}

// halt stops r's goroutines without removing its entries, as a node that
// dies.
func halt(t *testing.T, r *Registry) {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	if err := r.stopGoroutines(ctxT(t)); err != nil {
		t.Fatal(err)
	}
}

// TestExpiryWithoutRefresh: the entries of a node that died stop counting
// after the TTL, also in keys another node keeps alive, and the other
// node's collection deletes them.
func TestExpiryWithoutRefresh(t *testing.T) {
	s := redistest.StartServer(t)
	const urlA, urlB = "grpc://10.0.0.1:8155", "grpc://10.0.0.2:8155"
	short := func(o *Options) { o.TTL, o.Refresh = time.Second, 500*time.Millisecond }
	tn := testTuning
	tn.wakeInterval = 100 * time.Millisecond // no event tells of an expiry
	a := newNode(t, singleClient(t, s.Addr()), urlA, tn, short)
	b := newNode(t, singleClient(t, s.Addr()), urlB, tn, short)
	a.Publish(newTunnel(7, 70, 1))
	b.Publish(newTunnel(7, 70, 2))
	waitNodes(t, b, 7, urlA)
	ctx := ctxT(t)
	eventually(t, func() error { return wantConnections(b.ConnectionsByAgentIDs(ctx, []int64{7}))(1, 2) })

	halt(t, a)
	waitNodes(t, b, 7)
	eventually(t, func() error { return wantConnections(b.ConnectionsByAgentIDs(ctx, []int64{7}))(2) })

	// b refreshes the keys, so a's fields stay until b collects them.
	rc := singleClient(t, s.Addr())
	for _, key := range []string{b.keys.nodesByAgent(7), b.keys.connsByAgent(7), b.keys.connsByProject(70)} {
		if n, err := rc.HLen(ctx, key).Result(); err != nil || n != 2 {
			t.Fatalf("%s has %d fields (error %v) before the collection, want 2", key, n, err)
		}
	}
	b.collect()
	for _, key := range []string{b.keys.nodesByAgent(7), b.keys.connsByAgent(7), b.keys.connsByProject(70)} {
		if n, err := rc.HLen(ctx, key).Result(); err != nil || n != 1 {
			t.Fatalf("%s has %d fields (error %v) after the collection, want 1", key, n, err)
		}
	}
	if got, err := rc.HKeys(ctx, b.keys.nodesByAgent(7)).Result(); err != nil || !slices.Equal(got, []string{urlB}) {
		t.Fatalf("nodes of agent 7 in redis: %q (error %v), want %q", got, err, urlB)
	}
	// Nobody refreshes the keys of a dead node's agent: they expire.
	if ttl, err := rc.PTTL(ctx, b.keys.nodesByAgent(7)).Result(); err != nil || ttl <= 0 || ttl > time.Second {
		t.Fatalf("the key's expiry is %v (error %v), want within the TTL", ttl, err)
	}
}

// TestRefresh: a node rewrites its entries every Refresh, with a later
// expiry each time.
func TestRefresh(t *testing.T) {
	s := redistest.StartServer(t)
	a := newNode(t, singleClient(t, s.Addr()), "grpc://10.0.0.1:8155", testTuning, func(o *Options) {
		o.TTL, o.Refresh = time.Hour, 100*time.Millisecond
	})
	a.Publish(newTunnel(7, 0, 1))
	rc := singleClient(t, s.Addr())
	ctx := ctxT(t)
	expiry := func() time.Time {
		v, _ := rc.HGet(ctx, a.keys.nodesByAgent(7), "grpc://10.0.0.1:8155").Result()
		exp, _ := expiryOf(v)
		return exp
	}
	var first time.Time
	eventually(t, func() error {
		if first = expiry(); first.IsZero() {
			return errors.New("not written yet")
		}
		return nil
	})
	eventually(t, func() error {
		if !expiry().After(first) {
			return errors.New("not refreshed yet")
		}
		return nil
	})
	// Someone deletes everything: the next refresh writes it again.
	if err := rc.FlushAll(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	eventually(t, func() error {
		if expiry().IsZero() {
			return errors.New("not rewritten yet")
		}
		return nil
	})
}

// TestWakeBounded: a waiter is woken after the bounded interval even when
// no event comes.
func TestWakeBounded(t *testing.T) {
	s := redistest.StartServer(t)
	tn := testTuning
	tn.wakeInterval = 50 * time.Millisecond
	a := newNode(t, singleClient(t, s.Addr()), "grpc://10.0.0.1:8155", tn)
	for range 3 {
		_, changed, err := a.Nodes(ctxT(t), 7)
		if err != nil {
			t.Fatal(err)
		}
		select {
		case <-changed:
		case <-time.After(liveness):
			t.Fatal("the waiter was never woken")
		}
	}
}

// TestRedisRestart: while Redis is down Publish returns at once and Nodes
// fails with ErrUnavailable; once Redis is back (empty) everything is
// rewritten and the subscription is back, without anyone's help.
func TestRedisRestart(t *testing.T) {
	s := redistest.StartServer(t)
	const urlA, urlB = "grpc://10.0.0.1:8155", "grpc://10.0.0.2:8155"
	a := newNode(t, singleClient(t, s.Addr()), urlA, testTuning)
	b := newNode(t, singleClient(t, s.Addr()), urlB, testTuning)
	a.Publish(newTunnel(7, 70, 1))
	gone := a.Publish(newTunnel(12, 70, 2))
	waitNodes(t, b, 7, urlA)
	waitNodes(t, b, 12, urlA)

	s.Stop()
	a.Publish(newTunnel(9, 90, 3))
	gone()
	ctx := ctxT(t)
	eventually(t, func() error {
		_, _, err := b.Nodes(ctx, 13)
		if !errors.Is(err, ErrUnavailable) {
			return errors.New("Nodes does not fail yet with Redis down: " + errString(err))
		}
		return nil
	})
	if _, err := b.AllConnections(ctx); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("AllConnections with Redis down: %v, want ErrUnavailable", err)
	}
	if _, _, err := b.Count(ctx, "key", 10); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Count with Redis down: %v, want ErrUnavailable", err)
	}

	s.Start()
	waitNodes(t, b, 7, urlA)
	waitNodes(t, b, 9, urlA)
	waitNodes(t, b, 12)
	eventually(t, func() error { return wantConnections(b.AllConnections(ctx))(1, 3) })

	// The subscription is back: an event wakes a waiter (the bounded
	// wake-up is an hour here).
	waitNodes(t, b, 11)
	a.Publish(newTunnel(11, 0, 4))
	waitNodes(t, b, 11, urlA)
}

func errString(err error) string {
	if err == nil {
		return "no error"
	}
	return err.Error()
}

// TestSentinelFailover: the registry keeps working after the sentinels
// promote the replica of a master that died.
func TestSentinelFailover(t *testing.T) {
	s := redistest.StartSentinel(t)
	const urlA, urlB = "grpc://10.0.0.1:8155", "grpc://10.0.0.2:8155"
	a := newNode(t, failoverClient(t, s), urlA, testTuning)
	b := newNode(t, failoverClient(t, s), urlB, testTuning)
	a.Publish(newTunnel(7, 70, 1))
	waitNodes(t, b, 7, urlA)

	s.Master.Stop()
	s.WaitFailover(t)
	a.Publish(newTunnel(8, 80, 2))
	waitNodes(t, b, 8, urlA)
	waitNodes(t, b, 7, urlA)
	b.Publish(newTunnel(9, 90, 3))
	waitNodes(t, a, 9, urlB)
	ctx := ctxT(t)
	eventually(t, func() error { return wantConnections(a.AllConnections(ctx))(1, 2, 3) })
}
