package agentk

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestMetricsFormat(t *testing.T) {
	m := newMetrics()
	m.tunnels.Store(2)
	m.connects.Store(5)
	m.connectFailures.Store(3)
	m.moves.Store(4)
	m.inFlight.Store(1)
	m.requestDone(404)
	m.requestDone(200)
	m.requestDone(200)
	var b strings.Builder
	m.write(&b, `v1 "quoted"`, "back\\slash\nnewline")
	want := `# HELP agentk_build_info Version and commit of agentk; always 1.
# TYPE agentk_build_info gauge
agentk_build_info{version="v1 \"quoted\"",commit="back\\slash\nnewline"} 1
# HELP agentk_tunnel_connections Tunnels to KAS connected now.
# TYPE agentk_tunnel_connections gauge
agentk_tunnel_connections 2
# HELP agentk_tunnel_connects_total Tunnels to KAS established.
# TYPE agentk_tunnel_connects_total counter
agentk_tunnel_connects_total 5
# HELP agentk_tunnel_connect_failures_total Failed attempts to open a tunnel to KAS.
# TYPE agentk_tunnel_connect_failures_total counter
agentk_tunnel_connect_failures_total 3
# HELP agentk_tunnel_moves_total Tunnels KAS asked to move to a new tunnel (its node stopping, or the tunnel's maximum age).
# TYPE agentk_tunnel_moves_total counter
agentk_tunnel_moves_total 4
# HELP agentk_proxied_requests_total Requests from KAS answered, by HTTP status code.
# TYPE agentk_proxied_requests_total counter
agentk_proxied_requests_total{code="200"} 2
agentk_proxied_requests_total{code="404"} 1
# HELP agentk_proxied_requests_in_flight Requests from KAS being served now.
# TYPE agentk_proxied_requests_in_flight gauge
agentk_proxied_requests_in_flight 1
`
	if got := b.String(); got != want {
		t.Errorf("metrics:\n%s\nwant:\n%s", got, want)
	}
}

func TestProbes(t *testing.T) {
	a := &Agent{metrics: newMetrics()}
	h := a.observabilityHandler()
	tests := []struct {
		name      string
		tunnels   int64
		apiserver *bool // the last check of the apiserver; nil: none yet
		method    string
		path      string
		want      int
		wantBody  string
	}{
		{"liveness without tunnels", 0, nil, http.MethodGet, "/liveness", http.StatusOK, "ok"},
		{"liveness without apiserver", 1, new(false), http.MethodGet, "/liveness", http.StatusOK, "ok"},
		{"readiness without tunnels", 0, new(true), http.MethodGet, "/readiness", http.StatusServiceUnavailable, "no tunnel to KAS"},
		{"readiness with a tunnel and the apiserver", 1, new(true), http.MethodGet, "/readiness", http.StatusOK, "ok: 1 tunnel(s)"},
		{"readiness with a tunnel, apiserver unreachable", 1, new(false), http.MethodGet, "/readiness", http.StatusServiceUnavailable, "not reachable: connection refused"},
		{"readiness with a tunnel, apiserver not checked yet", 1, nil, http.MethodGet, "/readiness", http.StatusServiceUnavailable, "not checked yet"},
		{"metrics", 0, nil, http.MethodGet, "/metrics", http.StatusOK, "agentk_tunnel_connections 0"},
		{"HEAD is a GET", 1, new(true), http.MethodHead, "/readiness", http.StatusOK, ""},
		{"no pprof", 0, nil, http.MethodGet, "/debug/pprof/", http.StatusNotFound, ""},
		{"no POST", 0, nil, http.MethodPost, "/liveness", http.StatusMethodNotAllowed, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a.metrics.tunnels.Store(tt.tunnels)
			a.versionOK, a.versionErr = tt.apiserver, nil
			if tt.apiserver != nil && !*tt.apiserver {
				a.versionErr = errors.New("connection refused")
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(tt.method, tt.path, nil))
			if rec.Code != tt.want {
				t.Errorf("%s %s = %d, want %d", tt.method, tt.path, rec.Code, tt.want)
			}
			if !strings.Contains(rec.Body.String(), tt.wantBody) {
				t.Errorf("%s %s said %q, want %q", tt.method, tt.path, rec.Body.String(), tt.wantBody)
			}
		})
	}
}

// TestReadinessFollowsTheAPIServer runs agentk with a tunnel up and checks
// that /readiness says whether the apiserver answers: not ready while it
// cannot be reached, ready once it answers, not ready again when it goes.
func TestReadinessFollowsTheAPIServer(t *testing.T) {
	var down atomic.Bool
	down.Store(true)
	api := fakeAPI(t)
	flaky := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if down.Load() {
			// As a dead apiserver behind a live load balancer.
			http.Error(w, "no healthy upstream", http.StatusServiceUnavailable)
			return
		}
		api.Config.Handler.ServeHTTP(w, r)
	}))
	t.Cleanup(flaky.Close)
	kas := newFakeKAS(t, "agent-token-1", 0)
	tokenPath := filepath.Join(t.TempDir(), "token")
	writeFile(t, tokenPath, []byte("agent-token-1"))
	ta := startTestAgent(t, kas, flaky, tokenPath, 1, func(c *Config) { c.APIServerCheckInterval = 10 * time.Millisecond })
	kas.next(t)
	eventually(t, "a tunnel", func() bool { return ta.metrics.tunnels.Load() == 1 })

	code, body := ta.get(t, "/readiness")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "the Kubernetes API server is not reachable") {
		t.Errorf("/readiness with the tunnel up and the apiserver down = %d %q, want 503 saying why", code, body)
	}
	down.Store(false)
	eventually(t, "ready once the apiserver answers", func() bool { code, _ := ta.get(t, "/readiness"); return code == http.StatusOK })
	down.Store(true)
	eventually(t, "not ready once the apiserver is gone", func() bool { code, _ := ta.get(t, "/readiness"); return code == http.StatusServiceUnavailable })
	if ta.metrics.tunnels.Load() != 1 {
		t.Errorf("the tunnel went down with the apiserver")
	}
}
