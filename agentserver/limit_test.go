package agentserver

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
)

// rateLimitedAuth checks no token: its backend's rate limit is reached.
type rateLimitedAuth struct{ wait time.Duration }

func (a rateLimitedAuth) AuthenticateAgent(context.Context, string) (Agent, error) {
	return Agent{}, &RateLimitedError{RetryAfter: a.wait, Err: errors.New("backend rate limit reached")}
}

// handshake sends our agentk's handshake with token to e and returns the
// answer.
func (e *env) handshake(t *testing.T, token string) *http.Response {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http"+strings.TrimPrefix(endpointURL, "ws"), nil)
	req.Header = wsHeader(h2tunnel.Subprotocol, token)
	resp, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp
}

// TestEndpointAuthenticationRateLimited: a token that could not be checked
// for a rate limit is answered 429 with Retry-After (our agentk), or
// Unavailable (GitLab's agentk), and counted under its own reason.
func TestEndpointAuthenticationRateLimited(t *testing.T) {
	t.Run("our agentk", func(t *testing.T) {
		e := newEnv(t, rateLimitedAuth{wait: 1500 * time.Millisecond})
		resp := e.handshake(t, goodToken)
		if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") != "2" {
			t.Errorf("answer %d with Retry-After %q, want 429 with 2", resp.StatusCode, resp.Header.Get("Retry-After"))
		}
		refusals := e.logged("agent refused")
		if len(refusals) != 1 || refusals[0].ContextMap()["reason"] != "authentication rate limited" {
			t.Errorf("refusal log %v, want one with reason %q", refusals, "authentication rate limited")
		}
	})
	t.Run("GitLab's agentk", func(t *testing.T) {
		core, logs := observer.New(zapcore.DebugLevel)
		srv := grpctunnel.NewServer()
		store := tunnel.NewStore()
		client := servePipe(t, &Endpoint{Auth: rateLimitedAuth{wait: time.Second}, Store: store, GRPC: srv, Logger: zap.New(core)})
		t.Cleanup(func() {
			store.Close()
			srv.Close()
		})
		cc := dialGRPC(t, client)
		if err := register(cc, goodToken); status.Code(err) != codes.Unavailable {
			t.Fatalf("Register = %v, want Unavailable", err)
		}
		if n := logs.FilterMessage("agent refused").FilterField(zap.String("reason", "authentication rate limited")).Len(); n != 1 {
			t.Errorf("%d refusals logged as rate limited, want 1", n)
		}
	})
}

func TestMemoryConnectionCounter(t *testing.T) {
	type count struct {
		key       string
		wantOK    bool
		wantRetry time.Duration // when refused
	}
	type step struct {
		sleep  time.Duration
		counts []count
	}
	tests := []struct {
		name  string
		limit uint64
		steps []step
	}{
		{"the limit within a minute, per key", 3, []step{
			{counts: []count{{"a", true, 0}, {"a", true, 0}, {"a", true, 0}, {"a", false, time.Minute}, {"b", true, 0}}},
			{sleep: 45 * time.Second, counts: []count{{"a", false, 15 * time.Second}, {"b", true, 0}, {"b", true, 0}, {"b", false, 15 * time.Second}}},
		}},
		{"counts start over each minute of the clock", 1, []step{
			{sleep: 59 * time.Second, counts: []count{{"a", true, 0}, {"a", false, time.Second}}},
			{sleep: time.Second, counts: []count{{"a", true, 0}, {"a", false, time.Minute}}},
			{sleep: 10 * time.Minute, counts: []count{{"a", true, 0}}},
		}},
		{"refusals are not counted", 2, []step{
			{counts: []count{{"a", true, 0}, {"a", true, 0}, {"a", false, time.Minute}, {"a", false, time.Minute}}},
			{sleep: time.Minute, counts: []count{{"a", true, 0}, {"a", true, 0}, {"a", false, time.Minute}}},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) { // the clock starts at a full minute
				var c MemoryConnectionCounter
				for i, s := range tt.steps {
					time.Sleep(s.sleep)
					for j, cnt := range s.counts {
						ok, retry, err := c.Count(context.Background(), cnt.key, tt.limit)
						if err != nil || ok != cnt.wantOK || retry != cnt.wantRetry {
							t.Errorf("step %d, count %d of %q: ok=%v retry=%v err=%v; want ok=%v retry=%v",
								i, j, cnt.key, ok, retry, err, cnt.wantOK, cnt.wantRetry)
						}
					}
				}
			})
		})
	}
}

func TestConnectionKey(t *testing.T) {
	const token = "0123456789abcdefghij0123456789ABCDEFGHIJ"
	key := ConnectionKey(token)
	if len(key) != 64 || strings.Contains(key, token[:10]) {
		t.Errorf("key %q, want a hex SHA-256 that does not show the token", key)
	}
	if ConnectionKey(token[:20]+"another second half!") != key {
		t.Error("tokens with the same first half have different keys, unlike GitLab's")
	}
	if ConnectionKey("X"+token[1:]) == key {
		t.Error("tokens with different first halves share a key")
	}
}

// TestEndpointConnectionLimit: our agentk's handshakes with a valid token
// count, up to the limit in each minute; beyond it they get 429 with
// Retry-After until the next minute. Refused tokens do not count.
func TestEndpointConnectionLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		auth, err := NewStaticAgents([]StaticAgent{{ID: 1, Name: "one", Token: goodToken}})
		if err != nil {
			t.Fatal(err)
		}
		core, logs := observer.New(zapcore.DebugLevel)
		store := tunnel.NewStore()
		e := &env{store: store, logs: logs}
		e.client = servePipe(t, &Endpoint{Auth: auth, Store: store, Logger: zap.New(core),
			Connections: new(MemoryConnectionCounter), ConnectionsPerMinute: 2})
		t.Cleanup(func() { store.Close() })
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		for range 3 {
			if resp := e.handshake(t, wrongToken); resp.StatusCode != http.StatusUnauthorized {
				t.Fatalf("wrong token: %d, want 401", resp.StatusCode)
			}
		}
		for i := range 2 {
			if _, err := e.dial(ctx, goodToken, tunnel.AgentMeta{}, http.NotFoundHandler()); err != nil {
				t.Fatalf("connection %d within the limit: %v", i+1, err)
			}
		}
		time.Sleep(20 * time.Second)
		resp := e.handshake(t, goodToken)
		if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") != "40" {
			t.Errorf("connection over the limit: %d with Retry-After %q, want 429 with 40", resp.StatusCode, resp.Header.Get("Retry-After"))
		}
		if n := logs.FilterMessage("agent refused").FilterField(zap.String("reason", "connection rate limit")).Len(); n != 1 {
			t.Errorf("%d refusals logged for the connection rate limit, want 1", n)
		}
		time.Sleep(40 * time.Second) // the next minute
		if _, err := e.dial(ctx, goodToken, tunnel.AgentMeta{}, http.NotFoundHandler()); err != nil {
			t.Errorf("connection in the next minute: %v", err)
		}
		synctest.Wait()
		if n := len(store.Tunnels(1, nil)); n != 3 {
			t.Errorf("%d tunnels of agent 1, want 3", n)
		}
	})
}

// fakeCounter lets allow connections through, then refuses them; with
// err set it fails instead.
type fakeCounter struct {
	allow int
	err   error

	mu     sync.Mutex // guards counts
	counts int
}

func (c *fakeCounter) Count(_ context.Context, key string, limit uint64) (bool, time.Duration, error) {
	if c.err != nil {
		return false, 0, c.err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.counts >= c.allow || key != ConnectionKey(goodToken) || limit != DefaultConnectionsPerTokenPerMinute {
		return false, 30 * time.Second, nil
	}
	c.counts++
	return true, 0, nil
}

// TestEndpointGRPCCallsCounted: every call of GitLab's agentk counts as a
// connection, as in GitLab's KAS; over the limit calls get
// ResourceExhausted, and a counter that fails refuses with Unavailable.
func TestEndpointGRPCCallsCounted(t *testing.T) {
	tests := []struct {
		name      string
		counter   *fakeCounter
		wantCodes []codes.Code // of successive Register calls
		wantLog   string       // the one line logged for the refusal
		reason    string       // its reason, if any
	}{
		{"within and over the limit", &fakeCounter{allow: 2}, []codes.Code{codes.OK, codes.OK, codes.ResourceExhausted}, "agent refused", "connection rate limit"},
		{"counter fails", &fakeCounter{err: errors.New("redis down")}, []codes.Code{codes.Unavailable}, "cannot count the agent's connections now", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			auth, err := NewStaticAgents([]StaticAgent{{ID: 1, Name: "one", Token: goodToken}})
			if err != nil {
				t.Fatal(err)
			}
			core, logs := observer.New(zapcore.DebugLevel)
			srv := grpctunnel.NewServer()
			store := tunnel.NewStore()
			client := servePipe(t, &Endpoint{Auth: auth, Store: store, GRPC: srv, Logger: zap.New(core), Connections: tt.counter})
			t.Cleanup(func() {
				store.Close()
				srv.Close()
			})
			cc := dialGRPC(t, client)
			if err := register(cc, wrongToken); status.Code(err) != codes.Unauthenticated {
				t.Fatalf("Register with a wrong token = %v, want Unauthenticated (and not counted)", err)
			}
			for i, want := range tt.wantCodes {
				if err := register(cc, goodToken); status.Code(err) != want {
					t.Errorf("Register %d = %v, want %v", i+1, err, want)
				}
			}
			lines := logs.FilterMessage(tt.wantLog)
			if tt.reason != "" {
				lines = lines.FilterField(zap.String("reason", tt.reason))
			}
			if n := lines.Len(); n != 1 {
				t.Errorf("%d lines %q (reason %q), want 1", n, tt.wantLog, tt.reason)
			}
			// Every line about a call says its protocol, once: a key
			// twice in a JSON log line is ambiguous to log processors.
			for _, line := range logs.All() {
				if n := countFields(line.Context, "protocol"); n != 1 {
					t.Errorf("line %q has %d protocol fields, want 1", line.Message, n)
				}
			}
		})
	}
}

// countFields counts the fields named key.
func countFields(fields []zapcore.Field, key string) int {
	n := 0
	for _, f := range fields {
		if f.Key == key {
			n++
		}
	}
	return n
}

// TestEndpointH2CounterFails: a handshake whose connection cannot be
// counted is answered 503, so that agentk retries.
func TestEndpointH2CounterFails(t *testing.T) {
	auth, err := NewStaticAgents([]StaticAgent{{ID: 1, Name: "one", Token: goodToken}})
	if err != nil {
		t.Fatal(err)
	}
	store := tunnel.NewStore()
	e := &env{store: store}
	e.client = servePipe(t, &Endpoint{Auth: auth, Store: store, Connections: &fakeCounter{err: errors.New("redis down")}})
	t.Cleanup(func() { store.Close() })
	if resp := e.handshake(t, goodToken); resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("handshake = %d, want 503", resp.StatusCode)
	}
}
