package kubeproxy

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-kas/caddy-kas/identity"

	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel/h2tunneltest"
)

const prefix = "/-/kubernetes-agent/k8s-proxy/"

// seen records what reached the fake cluster behind the agent.
type seen struct {
	mu   sync.Mutex // guards reqs
	reqs []*http.Request
}

func (s *seen) add(r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reqs = append(s.reqs, r)
}

func (s *seen) last(t *testing.T) *http.Request {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.reqs) == 0 {
		t.Fatal("nothing reached the agent")
	}
	return s.reqs[len(s.reqs)-1]
}

func (s *seen) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.reqs)
}

type env struct {
	proxy *httptest.Server
	store *tunnel.Store
	agent *h2tunneltest.Pair
	seen  *seen
}

// newEnv starts the proxy with users dev (agent 1, impersonates alice),
// ops (agents 1 and 2, may impersonate) and plain (agent 1), and agent 1
// serving agentHandler (nil: record and answer 200 "ok").
func newEnv(t testing.TB, agentHandler http.Handler) *env {
	t.Helper()
	e := &env{store: tunnel.NewStore(), seen: &seen{}}
	if agentHandler == nil {
		agentHandler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.ReadAll(r.Body)
			e.seen.add(r)
			io.WriteString(w, "ok")
		})
	}
	e.agent = h2tunneltest.NewPair(t, agentHandler, h2tunneltest.Options{Agent: tunnel.AgentInfo{ID: 1}})
	t.Cleanup(e.store.Add(e.agent.KAS))
	auth, err := NewStaticAuthenticator([]User{
		{Name: "dev", Token: "dev-token", Agents: []int64{1}, Impersonate: &identity.Identity{Username: "alice", Groups: []string{"dev"}}},
		{Name: "ops", Token: "ops-token", Agents: []int64{1, 2}, AllowImpersonation: true},
		{Name: "plain", Token: "plain-token", Agents: []int64{1}},
	})
	if err != nil {
		t.Fatal(err)
	}
	e.proxy = httptest.NewServer(&Proxy{Prefix: prefix, Auth: auth, Router: tunnel.NewRouter(e.store), WaitForAgent: 200 * time.Millisecond, Via: "caddy-kas/test"})
	t.Cleanup(e.proxy.Close)
	return e
}

func (e *env) do(t *testing.T, method, path, auth string, header http.Header, body io.Reader) *http.Response {
	t.Helper()
	req, err := http.NewRequest(method, e.proxy.URL+path, body)
	if err != nil {
		t.Fatal(err)
	}
	for k, vs := range header {
		req.Header[k] = vs
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := e.proxy.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

func decodeStatus(t *testing.T, resp *http.Response) map[string]any {
	t.Helper()
	var st map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatalf("body is not JSON: %v", err)
	}
	if st["kind"] != "Status" || st["apiVersion"] != "v1" || st["status"] != "Failure" {
		t.Errorf("body is not a failure Status: %v", st)
	}
	return st
}

func TestProxyForwards(t *testing.T) {
	e := newEnv(t, nil)
	header := http.Header{
		"Cookie":          {"_gitlab_kas=secret"},
		"X-Csrf-Token":    {"secret"},
		"Kas-Impersonate": {h2tunnel.EncodeIdentity(&identity.Identity{Username: "system:admin"})},
		"Content-Type":    {"application/apply-patch+yaml"},
		"Connection":      {"X-Private"},
		"X-Private":       {"hop"},
		"X-Real-Ip":       {"10.0.0.1"},
		"X-Forwarded-For": {"10.0.0.2"},
		"Forwarded":       {"for=10.0.0.3"},
	}
	resp := e.do(t, http.MethodPatch, prefix+"api/v1/namespaces/a%2Fb/configmaps/cm?fieldManager=me&gitlab-agent-id=1&force=true",
		"Bearer pat:1:plain-token", header, strings.NewReader("data: {}"))
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	got := e.seen.last(t)
	if got.Method != http.MethodPatch {
		t.Errorf("method %s", got.Method)
	}
	if got.URL.EscapedPath() != "/api/v1/namespaces/a%2Fb/configmaps/cm" {
		t.Errorf("path %q, want prefix stripped and escaping kept", got.URL.EscapedPath())
	}
	if got.URL.RawQuery != "fieldManager=me&force=true" {
		t.Errorf("query %q", got.URL.RawQuery)
	}
	for _, k := range []string{"Authorization", "Cookie", "X-Csrf-Token", "Kas-Impersonate", "X-Private", "X-Real-Ip", "X-Forwarded-For", "Forwarded"} {
		if v := got.Header.Get(k); v != "" {
			t.Errorf("%s reached the agent: %q", k, v)
		}
	}
	if got.Header.Get("Content-Type") != "application/apply-patch+yaml" {
		t.Errorf("Content-Type lost: %v", got.Header)
	}
}

func TestProxyIdentity(t *testing.T) {
	e := newEnv(t, nil)
	resp := e.do(t, http.MethodGet, prefix+"api", "Bearer pat:1:dev-token", nil, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	id, err := h2tunnel.DecodeIdentity(e.seen.last(t).Header.Get(h2tunnel.IdentityHeader))
	if err != nil {
		t.Fatalf("identity header: %v", err)
	}
	if id.Username != "alice" || len(id.Groups) != 1 || id.Groups[0] != "dev" {
		t.Errorf("identity %+v, want alice [dev]", id)
	}
}

func TestProxyRefuses(t *testing.T) {
	asBob := http.Header{"Impersonate-User": {"bob"}}
	tests := []struct {
		name         string
		path         string
		auth         string
		header       http.Header
		wantCode     int
		wantMessage  string
		unauthorized bool
	}{
		{"no credentials", prefix + "api/v1/namespaces", "", nil, 401, "no valid credentials", true},
		{"unknown token", prefix + "api/v1/namespaces", "Bearer pat:1:nope", nil, 401, "no valid credentials", true},
		{"malformed token", prefix + "api/v1/namespaces", "Bearer nope", nil, 401, "no valid credentials", true},
		{"agent not allowed", prefix + "api/v1/namespaces", "Bearer pat:2:dev-token", nil, 403, "agent 2 is not allowed", false},
		{"nested impersonation", prefix + "api/v1/namespaces", "Bearer pat:1:dev-token", asBob, 400, "nested impersonation is not supported", false},
		{"impersonation not allowed", prefix + "api/v1/namespaces", "Bearer pat:1:plain-token", asBob, 403, "impersonation is not allowed", false},
		{"outside prefix", "/elsewhere", "Bearer pat:1:plain-token", nil, 400, "expected prefix", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, nil)
			resp := e.do(t, http.MethodGet, tt.path, tt.auth, tt.header, nil)
			if resp.StatusCode != tt.wantCode {
				t.Errorf("status %d, want %d", resp.StatusCode, tt.wantCode)
			}
			if got := resp.Header.Get("Gitlab-Unauthorized") == "true"; got != tt.unauthorized {
				t.Errorf("Gitlab-Unauthorized present = %v, want %v", got, tt.unauthorized)
			}
			st := decodeStatus(t, resp)
			if msg, _ := st["message"].(string); !strings.Contains(msg, tt.wantMessage) || !strings.HasPrefix(msg, "GitLab Agent Server: ") {
				t.Errorf("message %q, want it to contain %q", msg, tt.wantMessage)
			}
			if code, _ := st["code"].(float64); int(code) != tt.wantCode {
				t.Errorf("Status code %v", st["code"])
			}
			if n := e.seen.count(); n != 0 {
				t.Errorf("%d requests reached the agent", n)
			}
		})
	}
}

func TestProxyClientImpersonationAllowed(t *testing.T) {
	e := newEnv(t, nil)
	resp := e.do(t, http.MethodGet, prefix+"api", "Bearer pat:1:ops-token",
		http.Header{"Impersonate-User": {"bob"}, "Impersonate-Group": {"g1", "g2"}}, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	got := e.seen.last(t).Header
	if got.Get("Impersonate-User") != "bob" || len(got.Values("Impersonate-Group")) != 2 || got.Get(h2tunnel.IdentityHeader) != "" {
		t.Errorf("agent saw %v", got)
	}
}

// TestProxyNoAgent checks what a request for an agent without a tunnel
// gets: a wait only while the agent may be reconnecting, and a message
// that the client shows: plain text where client-go reads the answer raw
// (discovery), a Status elsewhere.
func TestProxyNoAgent(t *testing.T) {
	tests := []struct {
		name string
		// serverAge is how long the tunnel store exists before the request.
		serverAge       time.Duration
		path            string
		wantWaited      time.Duration
		wantContentType string
		wantMessage     string
	}{
		{"just started, discovery", 0, "api", DefaultWaitForAgent, "text/plain; charset=utf-8",
			"GitLab Agent Server: agent 2 is not connected (waited 20s). Is the agent up and connected?"},
		{"just started, a resource", 0, "api/v1/namespaces", DefaultWaitForAgent, "application/json",
			"GitLab Agent Server: agent 2 is not connected (waited 20s). Is the agent up and connected?"},
		{"reconnect window ends during the wait", 25 * time.Second, "apis", 5 * time.Second, "text/plain; charset=utf-8",
			"GitLab Agent Server: agent 2 is not connected (waited 5s): it has not connected since this server started 30s ago. Is the agent up and connected?"},
		{"long after the start", time.Hour, "version", 0, "text/plain; charset=utf-8",
			"GitLab Agent Server: agent 2 is not connected: it has not connected since this server started 1h0m0s ago. Is the agent up and connected?"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				auth, err := NewStaticAuthenticator([]User{{Name: "ops", Token: "ops-token", Agents: []int64{2}}})
				if err != nil {
					t.Fatal(err)
				}
				p := &Proxy{Prefix: prefix, Auth: auth, Router: tunnel.NewRouter(tunnel.NewStore())}
				time.Sleep(tt.serverAge)
				req := httptest.NewRequest(http.MethodGet, prefix+tt.path, nil)
				req.Header.Set("Authorization", "Bearer pat:2:ops-token")
				rec := httptest.NewRecorder()
				start := time.Now()
				p.ServeHTTP(rec, req)
				if waited := time.Since(start); waited != tt.wantWaited {
					t.Errorf("request waited %s, want %s", waited, tt.wantWaited)
				}
				if rec.Code != http.StatusBadGateway {
					t.Errorf("status %d, want 502", rec.Code)
				}
				if got := rec.Header().Get("Content-Type"); got != tt.wantContentType {
					t.Errorf("Content-Type %q, want %q", got, tt.wantContentType)
				}
				msg := strings.TrimSpace(rec.Body.String())
				if tt.wantContentType == "application/json" {
					var st map[string]any
					if err := json.Unmarshal(rec.Body.Bytes(), &st); err != nil {
						t.Fatalf("body is not JSON: %v", err)
					}
					msg, _ = st["message"].(string)
				}
				if msg != tt.wantMessage {
					t.Errorf("message\n%q, want\n%q", msg, tt.wantMessage)
				}
			})
		})
	}
}

func TestNotConnectedMessage(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		now := time.Now()
		tests := []struct {
			waited time.Duration
			err    error
			want   string
		}{
			{20 * time.Second, fmt.Errorf("agent 3: %w: %w", tunnel.ErrNoConnection, context.DeadlineExceeded),
				"agent 3 is not connected (waited 20s). Is the agent up and connected?"},
			{0, fmt.Errorf("agent 3: %w: %w", tunnel.ErrNoConnection, &tunnel.AbsentError{AgentID: 3, Since: now.Add(-5 * time.Minute), Seen: true}),
				"agent 3 is not connected: its last connection to this server ended 5m0s ago. Is the agent up and connected?"},
			{1234 * time.Millisecond, fmt.Errorf("agent 3: %w: %w", tunnel.ErrNoConnection, &tunnel.AbsentError{AgentID: 3, Since: now.Add(-31 * time.Second)}),
				"agent 3 is not connected (waited 1.2s): it has not connected since this server started 31s ago. Is the agent up and connected?"},
		}
		for _, tt := range tests {
			if got := notConnectedMessage(3, tt.waited, tt.err); got != tt.want {
				t.Errorf("notConnectedMessage(%s, %v)\n= %q, want\n  %q", tt.waited, tt.err, got, tt.want)
			}
		}
	})
}

func TestProxyAgentArrivesWhileWaiting(t *testing.T) {
	e := newEnv(t, nil)
	e.proxy.Config.Handler.(*Proxy).WaitForAgent = 30 * time.Second
	done := make(chan int)
	go func() {
		req, _ := http.NewRequest(http.MethodGet, e.proxy.URL+prefix+"api", nil)
		req.Header.Set("Authorization", "Bearer pat:2:ops-token")
		resp, err := e.proxy.Client().Do(req)
		if err != nil {
			t.Error(err)
			done <- 0
			return
		}
		resp.Body.Close()
		done <- resp.StatusCode
	}()
	time.Sleep(50 * time.Millisecond) // let the request start waiting; not required for correctness
	agent2 := h2tunneltest.NewPair(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}), h2tunneltest.Options{Agent: tunnel.AgentInfo{ID: 2}})
	defer e.store.Add(agent2.KAS)()
	select {
	case code := <-done:
		if code != http.StatusOK {
			t.Errorf("status %d, want 200 once the agent connected", code)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("request still waiting after its agent connected")
	}
}

func TestProxyClientLeavesWhileWaiting(t *testing.T) {
	e := newEnv(t, nil)
	p := e.proxy.Config.Handler.(*Proxy)
	p.WaitForAgent = time.Hour
	ctx, cancel := context.WithCancel(context.Background())
	req := httptest.NewRequestWithContext(ctx, http.MethodGet, prefix+"api", nil)
	req.Header.Set("Authorization", "Bearer pat:2:ops-token")
	rec := httptest.NewRecorder()
	served := make(chan struct{})
	go func() { defer close(served); p.ServeHTTP(rec, req) }()
	time.Sleep(20 * time.Millisecond)
	cancel()
	h2tunneltest.WaitDone(t, served, "handler after the client left")
}

// TestProxyStreamsAndAborts checks that a watch's events arrive one by one
// and that losing the agent mid-response aborts the client's response.
func TestProxyStreamsAndAborts(t *testing.T) {
	next := make(chan struct{})
	e := newEnv(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		for i := 0; ; i++ {
			io.WriteString(w, `{"type":"ADDED"}`+"\n")
			rc.Flush()
			select {
			case <-next:
			case <-r.Context().Done():
				return
			}
		}
	}))
	resp := e.do(t, http.MethodGet, prefix+"api/v1/configmaps?watch=true", "Bearer pat:1:plain-token", nil, nil)
	lines := bufio.NewReader(resp.Body)
	for range 3 {
		line, err := lines.ReadString('\n')
		if err != nil || line != `{"type":"ADDED"}`+"\n" {
			t.Fatalf("read %q, %v", line, err)
		}
		next <- struct{}{}
	}
	e.agent.AgentNet.Conn.Close() // the agent vanishes mid-watch
	done := make(chan error)
	go func() {
		_, err := io.ReadAll(lines)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Error("watch ended cleanly after the agent vanished; want an error")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("watch still open 30s after the agent vanished")
	}
}

// TestVia: the proxy appends its Via element to the request the cluster
// gets and to the response the client gets (RFC 9110 §7.6.3), after any
// the client or the cluster sent.
func TestVia(t *testing.T) {
	e := newEnv(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Via-Seen", strings.Join(r.Header.Values("Via"), ", "))
		w.Header().Add("Via", "1.1 cluster-gateway")
		io.WriteString(w, "ok")
	}))
	e.proxy.Config.Handler.(*Proxy).ExtraAllowedResponseHeaders = []string{"x-via-seen"}
	resp := e.do(t, http.MethodGet, prefix+"api", "Bearer pat:1:plain-token", http.Header{"Via": {"1.0 corporate-proxy"}}, nil)
	if got := resp.Header.Get("X-Via-Seen"); got != "1.0 corporate-proxy, 1.1 caddy-kas/test" {
		t.Errorf("the cluster got Via %q", got)
	}
	if got := resp.Header.Values("Via"); !slices.Equal(got, []string{"1.1 cluster-gateway", "1.1 caddy-kas/test"}) {
		t.Errorf("the client got Via %q", got)
	}
}

// TestRefusalsLoggedOncePerInterval: a client that keeps being refused
// writes one log line, which names the status and the reason, and not
// one line per request.
func TestRefusalsLoggedOncePerInterval(t *testing.T) {
	tests := []struct {
		name       string
		header     http.Header
		wantStatus int
		wantReason string
	}{
		{"unknown token", http.Header{"Authorization": {"Bearer pat:1:wrong-token"}}, http.StatusUnauthorized, "unknown token"},
		{"origin not allowed", http.Header{"Authorization": {"Bearer pat:1:dev-token"}, "Origin": {"https://evil.example"}},
			http.StatusForbidden, "origin not allowed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, nil)
			core, logs := observer.New(zapcore.DebugLevel)
			p := e.proxy.Config.Handler.(*Proxy)
			p.Logger = zap.New(core)
			p.AllowedOrigin = "https://gitlab.example.com"
			for range 3 {
				resp := e.do(t, http.MethodGet, prefix+"api/v1/namespaces", "", tt.header, nil)
				resp.Body.Close()
				if resp.StatusCode != tt.wantStatus {
					t.Fatalf("status %d, want %d", resp.StatusCode, tt.wantStatus)
				}
			}
			lines := logs.FilterMessage("k8s proxy request refused").All()
			if len(lines) != 1 {
				t.Fatalf("%d refusal lines, want 1", len(lines))
			}
			fields := lines[0].ContextMap()
			if fields["status"] != int64(tt.wantStatus) || fields["reason"] != tt.wantReason || fields["suppressed"] != int64(0) {
				t.Errorf("refusal logged with %v, want status %d and reason %q", fields, tt.wantStatus, tt.wantReason)
			}
		})
	}
}
