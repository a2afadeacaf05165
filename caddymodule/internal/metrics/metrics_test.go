package metrics

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-kas/caddy-kas/tunnel"
)

func TestMetrics(t *testing.T) {
	// A reload registers the same collectors into a new registry; a second
	// registration into the same one (two handlers) is fine too.
	var reg *prometheus.Registry
	for range 2 {
		reg = prometheus.NewPedanticRegistry()
		if err := register(reg); err != nil {
			t.Fatal(err)
		}
		if err := register(reg); err != nil {
			t.Fatalf("second registration: %v", err)
		}
	}
	before := gather(t, reg)
	var a Agents
	a.AgentConnected(tunnel.AgentInfo{ID: 1})
	a.AgentConnected(tunnel.AgentInfo{ID: 2})
	a.AgentDisconnected(tunnel.AgentInfo{ID: 1})
	a.AgentRefused("unknown agent token")
	var p Proxy
	p.Routed(time.Millisecond, true)
	p.Routed(20*time.Second, false)
	p.Refused(401)
	p.Refused(401)
	var g GitLab
	g.GitLabCall("/api/v4/internal/kubernetes/agent_info", 200, 3*time.Millisecond)
	g.GitLabCall("/api/v4/internal/kubernetes/agent_info", 0, 30*time.Second)
	g.GitLabRateLimited("/api/v4/internal/kubernetes/authorize_proxy_user")
	after := gather(t, reg)

	tests := []struct {
		series string
		delta  float64
	}{
		{"caddy_kas_agent_tunnels", 1},
		{"caddy_kas_agent_connects_total", 2},
		{`caddy_kas_agent_refusals_total{reason="unknown agent token"}`, 1},
		{`caddy_kas_k8s_proxy_refusals_total{code="401"}`, 2},
		{`caddy_kas_k8s_proxy_routing_duration_seconds_count{result="found"}`, 1},
		{`caddy_kas_k8s_proxy_routing_duration_seconds_count{result="not_found"}`, 1},
		{`caddy_kas_gitlab_request_duration_seconds_count{code="200",path="/api/v4/internal/kubernetes/agent_info"}`, 1},
		{`caddy_kas_gitlab_request_duration_seconds_count{code="0",path="/api/v4/internal/kubernetes/agent_info"}`, 1},
		{`caddy_kas_gitlab_rate_limited_total{path="/api/v4/internal/kubernetes/authorize_proxy_user"}`, 1},
	}
	for _, tt := range tests {
		if got := after[tt.series] - before[tt.series]; got != tt.delta {
			t.Errorf("%s went up by %v, want %v", tt.series, got, tt.delta)
		}
	}
}

// gather returns every series of reg by name{labels}.
func gather(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			name := f.GetName()
			if len(m.GetLabel()) > 0 {
				name += "{"
				for i, l := range m.GetLabel() {
					if i > 0 {
						name += ","
					}
					name += l.GetName() + `="` + l.GetValue() + `"`
				}
				name += "}"
			}
			switch {
			case m.Gauge != nil:
				out[name] = m.GetGauge().GetValue()
			case m.Counter != nil:
				out[name] = m.GetCounter().GetValue()
			case m.Histogram != nil:
				// name_count{labels}
				base, labels := f.GetName(), name[len(f.GetName()):]
				out[base+"_count"+labels] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return out
}
