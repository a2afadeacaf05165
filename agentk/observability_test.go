package agentk

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestMetricsFormat(t *testing.T) {
	m := newMetrics()
	m.tunnels.Store(2)
	m.connects.Store(5)
	m.connectFailures.Store(3)
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
		name    string
		tunnels int64
		method  string
		path    string
		want    int
	}{
		{"liveness without tunnels", 0, http.MethodGet, "/liveness", http.StatusOK},
		{"readiness without tunnels", 0, http.MethodGet, "/readiness", http.StatusServiceUnavailable},
		{"readiness with a tunnel", 1, http.MethodGet, "/readiness", http.StatusOK},
		{"metrics", 0, http.MethodGet, "/metrics", http.StatusOK},
		{"HEAD is a GET", 1, http.MethodHead, "/readiness", http.StatusOK},
		{"no pprof", 0, http.MethodGet, "/debug/pprof/", http.StatusNotFound},
		{"no POST", 0, http.MethodPost, "/liveness", http.StatusMethodNotAllowed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a.metrics.tunnels.Store(tt.tunnels)
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(tt.method, tt.path, nil))
			if rec.Code != tt.want {
				t.Errorf("%s %s = %d, want %d", tt.method, tt.path, rec.Code, tt.want)
			}
		})
	}
}
