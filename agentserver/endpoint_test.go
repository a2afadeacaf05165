package agentserver

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/wsconn"
)

const (
	goodToken  = "agent-one-secret-token"
	wrongToken = "wrong-secret-token"
)

// endpointURL is where tests reach the endpoint: the host is ignored, as
// every connection of a [servePipe] client reaches its server.
const endpointURL = "ws://kas.test/-/kubernetes-agent/"

type env struct {
	client *http.Client // reaches the endpoint
	store  *tunnel.Store
	router *tunnel.Router
	logs   *observer.ObservedLogs
}

func newEnv(t *testing.T, auth Authenticator) *env {
	t.Helper()
	if auth == nil {
		var err error
		auth, err = NewStaticAgents([]StaticAgent{{ID: 1, Name: "one", Token: goodToken}})
		if err != nil {
			t.Fatal(err)
		}
	}
	core, logs := observer.New(zapcore.DebugLevel)
	e := &env{store: tunnel.NewStore(), logs: logs}
	e.router = tunnel.NewRouter(e.store)
	e.client = servePipe(t, &Endpoint{Auth: auth, Store: e.store, Logger: zap.New(core)})
	t.Cleanup(func() { e.store.Close() }) // ends the live tunnels, before the server
	return e
}

// dial connects like agentk and serves h on the tunnel until ctx ends.
func (e *env) dial(ctx context.Context, token string, meta tunnel.AgentMeta, h http.Handler) (*http.Response, error) {
	header := http.Header{}
	if token != "" {
		header.Set("Authorization", "Bearer "+token)
	}
	h2tunnel.SetMetaHeaders(header, meta)
	nc, resp, err := wsconn.Dial(ctx, endpointURL, wsconn.DialOptions{HTTPClient: e.client, Header: header, Subprotocol: h2tunnel.Subprotocol})
	if err != nil {
		return resp, err
	}
	go (&h2tunnel.Server{Handler: h}).ServeConn(ctx, nc)
	return resp, nil
}

func (e *env) logged(msg string) []observer.LoggedEntry {
	return e.logs.FilterMessage(msg).All()
}

func TestEndpointConnectsAgent(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEnv(t, nil)
		ctx, cancel := context.WithCancel(context.Background())
		meta := tunnel.AgentMeta{Version: "v1.2.3", PodNamespace: "gitlab-agent", PodName: "agentk-0", PodID: 77, ConnectionID: 88, KubernetesVersion: "v1.32.13"}
		if _, err := e.dial(ctx, goodToken, meta, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "hello from the cluster")
		})); err != nil {
			t.Fatal(err)
		}
		findCtx, findCancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer findCancel()
		conn, err := e.router.Find(findCtx, 1)
		if err != nil {
			t.Fatal(err)
		}
		if got := conn.Agent(); got.Credential != sha256.Sum256([]byte(goodToken)) {
			t.Error("tunnel does not remember the digest of its token")
		}
		if got := conn.Agent(); got.Name != "one" || got.Meta != meta {
			t.Errorf("agent info %+v, want name one and meta %+v", got, meta)
		}
		req, _ := http.NewRequest(http.MethodGet, "http://agent/version", nil)
		resp, err := conn.RoundTrip(&tunnel.Request{HTTP: req})
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) != "hello from the cluster" {
			t.Errorf("body %q", body)
		}
		if n := len(e.logged("agent connected")); n != 1 {
			t.Errorf("%d 'agent connected' lines, want 1", n)
		}

		cancel() // agentk goes away
		synctest.Wait()
		if n := len(e.logged("agent disconnected")); n != 1 {
			t.Errorf("%d 'agent disconnected' lines after the agent left, want 1", n)
		}
		if got := e.store.Tunnels(1, nil); len(got) != 0 {
			t.Errorf("store still has %d tunnels of the agent", len(got))
		}
	})
}

func TestEndpointRefuses(t *testing.T) {
	tests := []struct {
		name       string
		header     http.Header
		wantStatus int
		wantReason string
	}{
		{"plain GET", http.Header{}, http.StatusBadRequest, "not a websocket upgrade"},
		{"other subprotocol", wsHeader("ws-tunnel", goodToken), http.StatusBadRequest, "unsupported tunnel protocol"},
		{"no token", wsHeader(h2tunnel.Subprotocol, ""), http.StatusUnauthorized, "no agent token"},
		{"wrong token", wsHeader(h2tunnel.Subprotocol, wrongToken), http.StatusUnauthorized, "unknown agent token"},
		{"bad metadata", withHeader(wsHeader(h2tunnel.Subprotocol, goodToken), h2tunnel.HeaderPodID, "x"), http.StatusBadRequest, "malformed agent metadata"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, nil)
			req, _ := http.NewRequest(http.MethodGet, "http"+strings.TrimPrefix(endpointURL, "ws"), nil)
			req.Header = tt.header
			resp, err := e.client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tt.wantStatus {
				t.Errorf("status %d, want %d", resp.StatusCode, tt.wantStatus)
			}
			refusals := e.logged("agent refused")
			if len(refusals) != 1 || refusals[0].ContextMap()["reason"] != tt.wantReason {
				t.Errorf("refusal log %v, want one with reason %q", refusals, tt.wantReason)
			}
			for _, entry := range e.logs.All() {
				if s := fmt.Sprint(entry.Message, entry.ContextMap()); strings.Contains(s, goodToken) || strings.Contains(s, wrongToken) {
					t.Errorf("a token reached the log: %s", s)
				}
			}
		})
	}
}

// TestEndpointRefusalsLoggedOnce: 200 handshakes with a wrong token make
// one log line, at once, not 200 (the issue found 200 lines in 0.4 s).
func TestEndpointRefusalsLoggedOnce(t *testing.T) {
	e := newEnv(t, nil)
	for range 200 {
		req, _ := http.NewRequest(http.MethodGet, "http"+strings.TrimPrefix(endpointURL, "ws"), nil)
		req.Header = wsHeader(h2tunnel.Subprotocol, wrongToken)
		resp, err := e.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("status %d", resp.StatusCode)
		}
	}
	refusals := e.logged("agent refused")
	if len(refusals) != 1 || refusals[0].ContextMap()["reason"] != "unknown agent token" || refusals[0].ContextMap()["suppressed"] != int64(0) {
		t.Errorf("refusal lines %v, want the first one only", refusals)
	}
}

func TestEndpointWrongTokenThroughDial(t *testing.T) {
	e := newEnv(t, nil)
	resp, err := e.dial(context.Background(), wrongToken, tunnel.AgentMeta{}, http.NotFoundHandler())
	if err == nil {
		t.Fatal("dial with a wrong token succeeded")
	}
	if resp == nil || resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("response %v, want 401", resp)
	}
}

type failingAuth struct{}

func (failingAuth) AuthenticateAgent(context.Context, string) (Agent, error) {
	return Agent{}, errors.New("gitlab unreachable")
}

func TestEndpointBackendDown(t *testing.T) {
	e := newEnv(t, failingAuth{})
	resp, err := e.dial(context.Background(), goodToken, tunnel.AgentMeta{}, http.NotFoundHandler())
	if err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("dial = %v, %v; want a 503 refusal so agentk retries", resp, err)
	}
}

func TestNewStaticAgentsRejects(t *testing.T) {
	tests := []struct {
		name   string
		agents []StaticAgent
		want   string
	}{
		{"zero id", []StaticAgent{{Name: "a", Token: "t"}}, "id must be a positive integer"},
		{"duplicate id", []StaticAgent{{ID: 1, Name: "a", Token: "t"}, {ID: 1, Name: "b", Token: "u"}}, "agent 1: declared twice"},
		{"no name", []StaticAgent{{ID: 1, Token: "t"}}, "agent 1: empty name"},
		{"no token", []StaticAgent{{ID: 1, Name: "a"}}, "agent 1: empty token"},
		{"shared token", []StaticAgent{{ID: 1, Name: "a", Token: "t"}, {ID: 2, Name: "b", Token: "t"}}, "agent 2: same token as another agent"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := NewStaticAgents(tt.agents); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %v, want %q", err, tt.want)
			}
		})
	}
}

func wsHeader(subprotocol, token string) http.Header {
	h := http.Header{
		"Connection":             {"Upgrade"},
		"Upgrade":                {"websocket"},
		"Sec-Websocket-Version":  {"13"},
		"Sec-Websocket-Key":      {"dGhlIHNhbXBsZSBub25jZQ=="},
		"Sec-Websocket-Protocol": {subprotocol},
	}
	if token != "" {
		h.Set("Authorization", "Bearer "+token)
	}
	return h
}

func withHeader(h http.Header, k, v string) http.Header {
	h.Set(k, v)
	return h
}

func TestStaticAgentsDeclares(t *testing.T) {
	s, err := NewStaticAgents([]StaticAgent{{ID: 1, Name: "a", Token: "ta"}, {ID: 2, Name: "b", Token: "tb"}})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		id    int64
		token string
		want  bool
	}{
		{1, "ta", true}, {2, "tb", true},
		{1, "tb", false}, // another agent's token
		{3, "ta", false}, // unknown agent
		{1, "old", false},
	}
	for _, tt := range tests {
		if got := s.Declares(tt.id, sha256.Sum256([]byte(tt.token))); got != tt.want {
			t.Errorf("Declares(%d, %q) = %v, want %v", tt.id, tt.token, got, tt.want)
		}
	}
}

// switchableAuth accepts goodToken for agent 1 until revoked, and cannot
// answer at all while down. Each check is then sent on checked, if set.
type switchableAuth struct {
	revoked, down atomic.Bool
	checked       chan struct{}
}

func (a *switchableAuth) AuthenticateAgent(_ context.Context, token string) (Agent, error) {
	if a.checked != nil {
		defer func() { a.checked <- struct{}{} }()
	}
	switch {
	case a.down.Load():
		return Agent{}, errors.New("gitlab unreachable")
	case a.revoked.Load() || token != goodToken:
		return Agent{}, ErrUnknownToken
	}
	return Agent{ID: 1, Name: "one"}, nil
}

func TestEndpointRecheck(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// Buffered for the check of the handshake, which the test awaits
		// only once Dial returned.
		auth := &switchableAuth{checked: make(chan struct{}, 1)}
		core, logs := observer.New(zapcore.DebugLevel)
		store := tunnel.NewStore()
		client := servePipe(t, &Endpoint{Auth: auth, Store: store, Logger: zap.New(core), Recheck: 5 * time.Minute})
		t.Cleanup(func() { store.Close() }) // before the server
		header := http.Header{"Authorization": {"Bearer " + goodToken}}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		nc, _, err := wsconn.Dial(ctx, endpointURL, wsconn.DialOptions{HTTPClient: client, Header: header, Subprotocol: h2tunnel.Subprotocol})
		if err != nil {
			t.Fatal(err)
		}
		served := make(chan error, 1)
		go func() { served <- (&h2tunnel.Server{Handler: http.NotFoundHandler()}).ServeConn(ctx, nc) }()
		nextCheck := func() {
			t.Helper()
			select {
			case <-auth.checked:
			case <-time.After(time.Hour): // only catches a hang: checks are 5 minutes apart
				t.Fatal("no token check in an hour")
			}
		}
		nextCheck() // the handshake's

		// GitLab down: checks fail, the tunnel stays.
		auth.down.Store(true)
		for range 3 {
			nextCheck()
		}
		synctest.Wait() // the third check is done with
		if n := len(store.Tunnels(1, nil)); n != 1 {
			t.Fatalf("%d tunnels of agent 1 after failed checks, want 1", n)
		}
		if n := len(logs.FilterMessage("cannot re-check agent token now; keeping the tunnel").All()); n != 3 {
			t.Errorf("%d failed re-checks logged, want 3", n)
		}

		// Token revoked: the next check closes the tunnel.
		auth.down.Store(false)
		auth.revoked.Store(true)
		nextCheck()
		synctest.Wait()
		select {
		case <-served:
		default:
			t.Fatal("tunnel with a revoked token stayed up")
		}
		if len(logs.FilterMessage("closing tunnel: agent token revoked").All()) != 1 {
			t.Error("revocation not logged once")
		}
		for _, e := range logs.All() {
			for _, f := range e.Context {
				if strings.Contains(f.String, goodToken) {
					t.Errorf("token logged in %q", e.Message)
				}
			}
		}
	})
}

// TestEndpointSilentPeerNeverRoutable: a peer that completes the WebSocket
// handshake with a valid token but never starts HTTP/2 is not admitted,
// and is closed once agentk would long have sent its SETTINGS.
func TestEndpointSilentPeerNeverRoutable(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEnv(t, nil)
		header := http.Header{}
		header.Set("Authorization", "Bearer "+goodToken)
		nc, _, err := wsconn.Dial(context.Background(), endpointURL, wsconn.DialOptions{HTTPClient: e.client, Header: header, Subprotocol: h2tunnel.Subprotocol})
		if err != nil {
			t.Fatal(err)
		}
		closed := make(chan struct{})
		go func() { io.Copy(io.Discard, nc); close(closed) }() // reads, says nothing
		synctest.Wait()
		if n := len(e.store.Tunnels(1, nil)); n != 0 {
			t.Fatalf("%d tunnels of a peer that never started HTTP/2, want 0", n)
		}
		<-closed // after the preface timeout, in the bubble's time
		if n := len(e.logged("agent handshake failed")); n != 1 {
			t.Errorf("%d 'agent handshake failed' lines, want 1", n)
		}
		if n := len(e.logged("agent connected")); n != 0 {
			t.Errorf("%d 'agent connected' lines, want 0", n)
		}
	})
}
