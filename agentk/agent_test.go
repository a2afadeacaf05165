package agentk

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/wsconn"
)

// fakeKAS is an agent endpoint: it checks the handshake like KAS does and
// hands every accepted tunnel to the test.
type fakeKAS struct {
	t   *testing.T
	srv *httptest.Server
	// conns receives the KAS side of every accepted tunnel.
	conns chan *h2tunnel.Conn
	// echoToken makes the refusals those of a misconfigured proxy that
	// echoes the request's Authorization header; set before the first
	// handshake.
	echoToken bool

	mu         sync.Mutex // guards token, refuse and handshakes
	token      string     // the agent token KAS accepts
	refuse     int        // how many more handshakes to refuse with 401
	handshakes []http.Header
}

func newFakeKAS(t *testing.T, token string, refuse int) *fakeKAS {
	k := &fakeKAS{t: t, token: token, refuse: refuse, conns: make(chan *h2tunnel.Conn, 10)}
	k.srv = httptest.NewServer(http.HandlerFunc(k.serveHTTP))
	t.Cleanup(k.srv.Close)
	return k
}

func (k *fakeKAS) url() string {
	return "ws" + strings.TrimPrefix(k.srv.URL, "http") + "/-/kubernetes-agent/"
}

func (k *fakeKAS) setToken(token string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.token = token
}

func (k *fakeKAS) serveHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/-/kubernetes-agent/" {
		http.Error(w, "wrong path "+r.URL.Path, http.StatusNotFound)
		return
	}
	if !wsconn.IsUpgrade(r) || !wsconn.Offers(r, h2tunnel.Subprotocol) {
		http.Error(w, "not a tunnel", http.StatusBadRequest)
		return
	}
	k.mu.Lock()
	k.handshakes = append(k.handshakes, r.Header.Clone())
	refuse := k.refuse > 0 || r.Header.Get("Authorization") != "Bearer "+k.token
	if k.refuse > 0 {
		k.refuse--
	}
	k.mu.Unlock()
	if refuse {
		if k.echoToken {
			// Echo the header, as a misconfigured proxy might: agentk
			// must not log the token it finds in the answer.
			w.Header().Set("Content-Type", "text/plain")
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, "who are you? "+r.Header.Get("Authorization"))
			return
		}
		// As caddy-kas's agent endpoint refuses a token.
		http.Error(w, "unauthenticated", http.StatusUnauthorized)
		return
	}
	meta, err := h2tunnel.MetaFromHeaders(r.Header)
	if err != nil {
		k.t.Errorf("handshake metadata: %v", err)
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	nc, err := wsconn.Accept(w, r, h2tunnel.Subprotocol)
	if err != nil {
		k.t.Errorf("accept: %v", err)
		return
	}
	c, err := h2tunnel.NewConn(nc, tunnel.AgentInfo{ID: 1, Name: "test", Meta: meta, RemoteAddr: r.RemoteAddr}, h2tunnel.Options{})
	if err != nil {
		k.t.Errorf("new conn: %v", err)
		return
	}
	k.conns <- c
}

func (k *fakeKAS) handshake(i int) http.Header {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.handshakes[i]
}

func (k *fakeKAS) handshakeCount() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.handshakes)
}

// next waits for the next accepted tunnel.
func (k *fakeKAS) next(t *testing.T) *h2tunnel.Conn {
	t.Helper()
	select {
	case c := <-k.conns:
		t.Cleanup(func() { c.Close() })
		return c
	case <-time.After(20 * time.Second):
		t.Fatal("agentk did not connect within 20s")
		return nil
	}
}

// fakeAPI is the "kube-apiserver" of the end-to-end tests.
func fakeAPI(t *testing.T) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer sa-token" {
			http.Error(w, "Unauthorized", http.StatusUnauthorized)
			return
		}
		switch r.URL.Path {
		case "/version":
			io.WriteString(w, `{"major":"1","minor":"32","gitVersion":"v1.32.13","platform":"linux/amd64"}`)
		default:
			w.Header().Set("Content-Type", "text/plain")
			io.WriteString(w, "path="+r.URL.Path+" user="+r.Header.Get("Impersonate-User"))
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

// testAgent starts an agent with fast reconnects and returns it, its logs
// and a function that stops it and waits until Run returned.
type testAgent struct {
	*Agent
	logs    *observer.ObservedLogs
	obsURL  string
	stop    func()
	stopped chan error
}

func startTestAgent(t *testing.T, kas *fakeKAS, api *httptest.Server, tokenPath string, connections int, tweaks ...func(*Config)) *testAgent {
	t.Helper()
	apiURL, err := parseServerURL(api.URL)
	if err != nil {
		t.Fatal(err)
	}
	cluster := newCluster(clusterSpec{server: apiURL, cred: staticToken("sa-token")})
	core, logs := observer.New(zapcore.DebugLevel)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{
		KASAddress:            kas.url(),
		Token:                 TokenFile(tokenPath),
		KASHeader:             http.Header{"X-Extra": {"extra value"}},
		Connections:           connections,
		Cluster:               cluster,
		PodNamespace:          "agents",
		PodName:               "agentk-0",
		Logger:                zap.New(core),
		Backoff:               Backoff{Initial: time.Millisecond, Max: 5 * time.Millisecond},
		ObservabilityListener: ln,
		Version:               "v0.0.1-test",
		Commit:                "abc123",
	}
	for _, tweak := range tweaks {
		tweak(&cfg)
	}
	a, err := New(cfg)
	if err != nil {
		ln.Close()
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ta := &testAgent{Agent: a, logs: logs, obsURL: "http://" + ln.Addr().String(), stop: cancel, stopped: make(chan error, 1)}
	go func() { ta.stopped <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-ta.stopped:
		case <-time.After(20 * time.Second):
			t.Error("Run did not return within 20s of cancel")
		}
	})
	return ta
}

func (ta *testAgent) get(t *testing.T, path string) (int, string) {
	t.Helper()
	resp, err := http.Get(ta.obsURL + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (ta *testAgent) count(msg string) int { return ta.logs.FilterMessage(msg).Len() }

// proxyGet sends a request through the tunnel as KAS would.
func proxyGet(t *testing.T, c *h2tunnel.Conn, path string, id *identity.Identity, h http.Header) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent"+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, vs := range h {
		req.Header[k] = vs
	}
	resp, err := c.RoundTrip(&tunnel.Request{HTTP: req, Identity: id})
	if err != nil {
		t.Fatalf("request through the tunnel: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestAgentEndToEnd(t *testing.T) {
	api := fakeAPI(t)
	kas := newFakeKAS(t, "agent-token-1", 1) // the first handshake is refused
	tokenPath := filepath.Join(t.TempDir(), "token")
	writeFile(t, tokenPath, []byte("agent-token-1\n"))
	ta := startTestAgent(t, kas, api, tokenPath, 1)

	// Not ready until a tunnel is up.
	rec := httptest.NewRecorder()
	ta.ObservabilityHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readiness", nil))
	if kas.handshakeCount() == 0 && rec.Code != http.StatusServiceUnavailable {
		t.Errorf("/readiness = %d before any tunnel, want 503", rec.Code)
	}

	conn := kas.next(t)
	eventually(t, "ready", func() bool { code, _ := ta.get(t, "/readiness"); return code == http.StatusOK })
	if code, _ := ta.get(t, "/liveness"); code != http.StatusOK {
		t.Errorf("/liveness = %d", code)
	}

	// The refusal was logged at error level with its status, and retried.
	refusals := ta.logs.FilterMessage("KAS refused the agent token").All()
	if len(refusals) != 1 {
		t.Fatalf("logged %d token refusals, want 1", len(refusals))
	}
	if refusals[0].Level != zapcore.ErrorLevel || refusals[0].ContextMap()["status_code"] != int64(401) {
		t.Errorf("refusal logged as %v with %v", refusals[0].Level, refusals[0].ContextMap())
	}
	if kas.handshakeCount() != 2 {
		t.Errorf("%d handshakes, want 2 (refused, accepted)", kas.handshakeCount())
	}

	// The handshake carried the token and the metadata.
	h := kas.handshake(1)
	for name, want := range map[string]string{
		"Authorization":                   "Bearer agent-token-1",
		"User-Agent":                      "caddy-kas-agentk/v0.0.1-test",
		"X-Extra":                         "extra value",
		h2tunnel.HeaderAgentVersion:       "v0.0.1-test",
		h2tunnel.HeaderAgentCommit:        "abc123",
		h2tunnel.HeaderPodNamespace:       "agents",
		h2tunnel.HeaderPodName:            "agentk-0",
		h2tunnel.HeaderKubernetesVersion:  "v1.32.13",
		h2tunnel.HeaderKubernetesPlatform: "linux/amd64",
		"Sec-Websocket-Protocol":          h2tunnel.Subprotocol,
	} {
		if got := h.Get(name); got != want {
			t.Errorf("handshake header %s = %q, want %q", name, got, want)
		}
	}
	if h.Get(h2tunnel.HeaderPodID) != strconv.FormatInt(ta.podID, 10) {
		t.Errorf("pod id %q, want %d", h.Get(h2tunnel.HeaderPodID), ta.podID)
	}

	// A request through the tunnel reaches the apiserver as agentk,
	// impersonating the identity KAS sent.
	id := &identity.Identity{Username: "alice", Groups: []string{"dev"}}
	code, body := proxyGet(t, conn, "/api/v1/namespaces", id, http.Header{
		"Authorization": {"Bearer user-token"},
	})
	if code != http.StatusOK || body != "path=/api/v1/namespaces user=alice" {
		t.Errorf("through the tunnel: %d %q", code, body)
	}

	// KAS drops the tunnel; agentk reconnects, reading the rotated token.
	writeFile(t, tokenPath, []byte("agent-token-2"))
	kas.setToken("agent-token-2")
	conn.Close()
	conn2 := kas.next(t)
	if code, body := proxyGet(t, conn2, "/api", nil, nil); code != http.StatusOK || body != "path=/api user=" {
		t.Errorf("through the new tunnel: %d %q", code, body)
	}
	h2 := kas.handshake(kas.handshakeCount() - 1)
	if got := h2.Get("Authorization"); got != "Bearer agent-token-2" {
		t.Errorf("reconnect used %q, want the rotated token", got)
	}
	if h2.Get(h2tunnel.HeaderPodID) != h.Get(h2tunnel.HeaderPodID) {
		t.Errorf("pod id changed across connections")
	}
	if h2.Get(h2tunnel.HeaderConnectionID) == h.Get(h2tunnel.HeaderConnectionID) {
		t.Errorf("connection id reused across connections")
	}
	eventually(t, "disconnect logged", func() bool { return ta.count("tunnel disconnected") == 1 })
	if n := ta.count("tunnel connected"); n != 2 {
		t.Errorf("logged %d connects, want 2", n)
	}

	// Metrics.
	eventually(t, "ready again", func() bool { code, _ := ta.get(t, "/readiness"); return code == http.StatusOK })
	_, metricsText := ta.get(t, "/metrics")
	for _, want := range []string{
		"# HELP agentk_tunnel_connections ",
		"# TYPE agentk_tunnel_connections gauge\nagentk_tunnel_connections 1\n",
		"# TYPE agentk_tunnel_connects_total counter\nagentk_tunnel_connects_total 2\n",
		"agentk_tunnel_connect_failures_total 1\n",
		`agentk_proxied_requests_total{code="200"} 2` + "\n",
		"agentk_proxied_requests_in_flight 0\n",
		`agentk_build_info{version="v0.0.1-test",commit="abc123"} 1` + "\n",
	} {
		if !strings.Contains(metricsText, want) {
			t.Errorf("/metrics lacks %q:\n%s", want, metricsText)
		}
	}

	// No log line carries a token.
	for _, e := range ta.logs.All() {
		line := e.Message
		for k, v := range e.ContextMap() {
			line += " " + k + "=" + toString(v)
		}
		for _, secret := range []string{"agent-token-1", "agent-token-2", "sa-token", "user-token"} {
			if strings.Contains(line, secret) {
				t.Errorf("log line contains %s: %s", secret, line)
			}
		}
	}

	// Stop: Run returns, nothing of agentk keeps running.
	ta.stop()
	select {
	case err := <-ta.stopped:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
		ta.stopped <- err // for the cleanup
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return within 20s of cancel")
	}
	if ta.Ready() {
		t.Errorf("still ready after Run returned")
	}
	eventually(t, "agentk goroutines gone", func() bool { return agentGoroutines() == "" })
	if _, err := http.Get(ta.obsURL + "/liveness"); err == nil {
		t.Errorf("observability server still answers after Run returned")
	}
}

func toString(v any) string {
	if s, ok := v.(string); ok {
		return s
	}
	if err, ok := v.(error); ok {
		return err.Error()
	}
	return ""
}

// agentGoroutines returns the stacks of goroutines that run agentk or
// tunnel server code, "" if there are none.
func agentGoroutines() string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var found []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "agentk.(*Agent)") || strings.Contains(g, "agentk.(*proxy)") ||
			strings.Contains(g, "h2tunnel.(*Server)") {
			found = append(found, g)
		}
	}
	return strings.Join(found, "\n\n")
}

func TestAgentSeveralConnections(t *testing.T) {
	api := fakeAPI(t)
	kas := newFakeKAS(t, "agent-token", 0)
	tokenPath := filepath.Join(t.TempDir(), "token")
	writeFile(t, tokenPath, []byte("agent-token"))
	ta := startTestAgent(t, kas, api, tokenPath, 3)

	ids := map[string]bool{}
	for range 3 {
		c := kas.next(t)
		ids[strconv.FormatInt(c.Agent().Meta.ConnectionID, 10)] = true
		if c.Agent().Meta.PodID != ta.podID {
			t.Errorf("pod id %d, want %d", c.Agent().Meta.PodID, ta.podID)
		}
	}
	if len(ids) != 3 {
		t.Errorf("%d distinct connection ids, want 3", len(ids))
	}
	eventually(t, "three tunnels counted", func() bool { return ta.metrics.tunnels.Load() == 3 })
}

func TestAgentStopsWhileRefused(t *testing.T) {
	// KAS refuses forever; cancelling must still end Run promptly, in
	// the middle of a backoff wait or a handshake.
	api := fakeAPI(t)
	kas := newFakeKAS(t, "right-token", 0)
	kas.echoToken = true
	tokenPath := filepath.Join(t.TempDir(), "token")
	writeFile(t, tokenPath, []byte("wrong-token"))
	ta := startTestAgent(t, kas, api, tokenPath, 2)
	const refused = "a server that is not KAS refused the tunnel handshake"
	eventually(t, "several refusals", func() bool { return ta.count(refused) >= 4 })
	if ta.Ready() {
		t.Error("ready although KAS refuses the token")
	}
	ta.stop()
	select {
	case err := <-ta.stopped:
		ta.stopped <- err
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return")
	}
	eventually(t, "agentk goroutines gone", func() bool { return agentGoroutines() == "" })
	for _, e := range ta.logs.FilterMessage(refused).All() {
		if resp := toString(e.ContextMap()["response"]); strings.Contains(resp, "wrong-token") || !strings.Contains(resp, "[redacted]") {
			t.Fatalf("response excerpt not redacted: %q", resp)
		}
	}
}

func TestNewConfigErrors(t *testing.T) {
	cluster := newCluster(clusterSpec{server: mustURL(t, "https://k8s.example")})
	tests := []struct {
		name    string
		mutate  func(*Config)
		wantErr error
		text    string
	}{
		{name: "grpc scheme", mutate: func(c *Config) { c.KASAddress = "grpcs://kas.example" }, wantErr: ErrUnsupportedScheme},
		{name: "https scheme", mutate: func(c *Config) { c.KASAddress = "https://kas.example" }, wantErr: ErrUnsupportedScheme},
		{name: "no host", mutate: func(c *Config) { c.KASAddress = "wss:///path" }, text: "no host"},
		{name: "no token", mutate: func(c *Config) { c.Token = nil }, text: "no agent token"},
		{name: "no cluster", mutate: func(c *Config) { c.Cluster = nil }, text: "no cluster"},
		{name: "too many connections", mutate: func(c *Config) { c.Connections = MaxConnections + 1 }, text: "connections must be"},
		{name: "bad pod name", mutate: func(c *Config) { c.PodName = "a\nb" }, text: "pod name"},
		{name: "valid", mutate: func(*Config) {}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := Config{KASAddress: "wss://kas.example/-/kubernetes-agent/", Token: StaticToken("t"), Cluster: cluster}
			tt.mutate(&cfg)
			_, err := New(cfg)
			if tt.wantErr == nil && tt.text == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			checkError(t, err, tt.wantErr, tt.text)
		})
	}
}

func TestResponseExcerpt(t *testing.T) {
	tests := []struct {
		name, body, token, want string
	}{
		{"plain", "unknown agent token\n", "tok-123456", "unknown agent token"},
		{"token echoed", "got Bearer tok-123456 here", "tok-123456", "got Bearer [redacted] here"},
		{"token cut at the end", "got Bearer tok-12", "tok-123456", "got Bearer [redacted]"},
		{"control characters", "a\x00b\tc", "tok-123456", "a b c"},
		{"long", strings.Repeat("x", 300), "tok-123456", strings.Repeat("x", maxExcerpt) + "…"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := responseExcerpt(strings.NewReader(tt.body), tt.token); got != tt.want {
				t.Errorf("excerpt = %q, want %q", got, tt.want)
			}
		})
	}
}

func mustURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := parseServerURL(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func TestKubernetesVersionWarnsOnce(t *testing.T) {
	var up bool
	var mu sync.Mutex // guards up
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		if !up {
			http.Error(w, "starting", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, `{"gitVersion":"v1.33.1","platform":"linux/arm64"}`)
	}))
	t.Cleanup(api.Close)
	core, logs := observer.New(zapcore.DebugLevel)
	a, err := New(Config{
		KASAddress: "ws://kas.invalid/",
		Token:      StaticToken("t"),
		Cluster:    newCluster(clusterSpec{server: mustURL(t, api.URL)}),
		Logger:     zap.New(core),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.cfg.Cluster.CloseIdleConnections)
	warnings := func() int {
		return logs.FilterMessage("cannot get the Kubernetes version").FilterLevelExact(zapcore.WarnLevel).Len()
	}
	steps := []struct {
		up       bool
		want     string
		warnings int
	}{
		{up: false, want: "", warnings: 1},
		{up: false, want: "", warnings: 1}, // still down: debug only
		{up: true, want: "v1.33.1", warnings: 1},
		{up: false, want: "v1.33.1", warnings: 2}, // the last known version is kept
		{up: false, want: "v1.33.1", warnings: 2},
	}
	for i, st := range steps {
		mu.Lock()
		up = st.up
		mu.Unlock()
		got := a.kubernetesVersion(context.Background())
		wantPlatform := ""
		if st.want != "" {
			wantPlatform = "linux/arm64"
		}
		if got.GitVersion != st.want || got.Platform != wantPlatform {
			t.Errorf("step %d: version %+v, want %q on %q", i, got, st.want, wantPlatform)
		}
		if got := warnings(); got != st.warnings {
			t.Errorf("step %d: %d warnings, want %d", i, got, st.warnings)
		}
	}
	if n := logs.FilterMessage("kubernetes API server reachable").Len(); n != 1 {
		t.Errorf("logged reachable %d times, want 1", n)
	}
}

// TestAgentMovesWhenAsked has KAS ask the tunnel to move: agentk dials a
// new tunnel at once while the old one keeps serving, and once KAS closes
// the old one the agent stays connected through the new.
func TestAgentMovesWhenAsked(t *testing.T) {
	api := fakeAPI(t)
	kas := newFakeKAS(t, "agent-token", 0)
	tokenPath := filepath.Join(t.TempDir(), "token")
	writeFile(t, tokenPath, []byte("agent-token"))
	ta := startTestAgent(t, kas, api, tokenPath, 1)

	old := kas.next(t)
	if err := old.Move(t.Context()); err != nil {
		t.Fatal(err)
	}
	moved := kas.next(t)
	if moved.Agent().Meta.ConnectionID == old.Agent().Meta.ConnectionID {
		t.Error("the new tunnel has the old one's connection id")
	}
	for name, c := range map[string]*h2tunnel.Conn{"old": old, "new": moved} {
		if code, _ := proxyGet(t, c, "/version", nil, nil); code != http.StatusOK {
			t.Errorf("%s tunnel answered %d", name, code)
		}
	}
	eventually(t, "two tunnels counted", func() bool { return ta.metrics.tunnels.Load() == 2 })
	old.Close()
	eventually(t, "the old tunnel's end logged", func() bool {
		return ta.logs.FilterMessage("tunnel disconnected").FilterField(zap.String("reason", "moved")).Len() == 1
	})
	eventually(t, "one tunnel counted", func() bool { return ta.metrics.tunnels.Load() == 1 })
	if n := ta.metrics.moves.Load(); n != 1 {
		t.Errorf("moves counted: %d, want 1", n)
	}
	if kas.handshakeCount() != 2 {
		t.Errorf("%d handshakes, want 2: the closed old tunnel must not be redialed", kas.handshakeCount())
	}
	if _, body := ta.get(t, "/metrics"); !strings.Contains(body, "agentk_tunnel_moves_total 1\n") {
		t.Errorf("metrics lack the move:\n%s", body)
	}
}
