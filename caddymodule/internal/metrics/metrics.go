// Package metrics exposes the agent server's Prometheus metrics through
// Caddy's metrics registry (the admin endpoint's /metrics and the metrics
// handler), next to Caddy's own.
package metrics

import (
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-kas/caddy-kas/agentserver"
	"github.com/caddy-kas/caddy-kas/gitlab"
	"github.com/caddy-kas/caddy-kas/kubeproxy"
	"github.com/caddy-kas/caddy-kas/tunnel"
)

const namespace = "caddy_kas"

// The collectors are created once per process and registered into every
// configuration's registry, so that counters keep counting across reloads
// just as tunnels live on across them.
var (
	agentTunnels = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: namespace, Subsystem: "agent", Name: "tunnels",
		Help: "Agent tunnels connected to this process.",
	})
	agentConnects = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: "agent", Name: "connects_total",
		Help: "Agent tunnels accepted.",
	})
	agentRefusals = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: "agent", Name: "refusals_total",
		Help: "Agent handshakes refused, by reason.",
	}, []string{"reason"})
	routingDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: namespace, Subsystem: "k8s_proxy", Name: "routing_duration_seconds",
		Help: "Time to find a tunnel of the request's agent; result is found or not_found.",
		// From an agent that is there (microseconds) to the 20 s wait for one
		// that is not.
		Buckets: []float64{.0001, .001, .01, .1, .5, 1, 2.5, 5, 10, 20, 30},
	}, []string{"result"})
	proxyRefusals = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: "k8s_proxy", Name: "refusals_total",
		Help: "Kubernetes API proxy requests refused by the agent server, by HTTP status code.",
	}, []string{"code"})

	gitlabCalls = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: namespace, Subsystem: "gitlab", Name: "request_duration_seconds",
		Help: "Calls to GitLab's internal API in GitLab mode, by API path and HTTP status code (0: no answer).",
		// GitLab answers in milliseconds; the client gives up after 30 s.
		Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
	}, []string{"path", "code"})

	gitlabRateLimited = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: "gitlab", Name: "rate_limited_total",
		Help: "Calls to GitLab's internal API not made because the api_rate_limit was reached, by API path.",
	}, []string{"path"})

	collectors = []prometheus.Collector{agentTunnels, agentConnects, agentRefusals, routingDuration, proxyRefusals, gitlabCalls, gitlabRateLimited}
)

// Register adds the collectors to the registry of ctx's configuration.
func Register(ctx caddy.Context) error {
	reg := ctx.GetMetricsRegistry()
	if reg == nil {
		return nil // no metrics registry (unit tests)
	}
	return register(reg)
}

func register(reg prometheus.Registerer) error {
	for _, c := range collectors {
		err := reg.Register(c)
		var already prometheus.AlreadyRegisteredError
		if err != nil && !(errors.As(err, &already) && already.ExistingCollector == c) {
			return fmt.Errorf("registering metrics: %w", err)
		}
	}
	return nil
}

// Agents records agent tunnels; it is an [agentserver.Observer].
type Agents struct{}

// AgentConnected implements [agentserver.Observer].
func (Agents) AgentConnected(tunnel.AgentInfo) {
	agentTunnels.Inc()
	agentConnects.Inc()
}

// AgentDisconnected implements [agentserver.Observer].
func (Agents) AgentDisconnected(tunnel.AgentInfo) { agentTunnels.Dec() }

// AgentRefused implements [agentserver.Observer].
func (Agents) AgentRefused(reason string) { agentRefusals.WithLabelValues(reason).Inc() }

// Proxy records Kubernetes API proxy requests; it is a [kubeproxy.Observer].
type Proxy struct{}

// Routed implements [kubeproxy.Observer].
func (Proxy) Routed(wait time.Duration, found bool) {
	result := "found"
	if !found {
		result = "not_found"
	}
	routingDuration.WithLabelValues(result).Observe(wait.Seconds())
}

// Refused implements [kubeproxy.Observer].
func (Proxy) Refused(code int) { proxyRefusals.WithLabelValues(strconv.Itoa(code)).Inc() }

// GitLab records calls to GitLab's internal API; it is a
// [gitlab.Observer].
type GitLab struct{}

// GitLabCall implements [gitlab.Observer].
func (GitLab) GitLabCall(path string, code int, took time.Duration) {
	gitlabCalls.WithLabelValues(path, strconv.Itoa(code)).Observe(took.Seconds())
}

// GitLabRateLimited implements [gitlab.Observer].
func (GitLab) GitLabRateLimited(path string) { gitlabRateLimited.WithLabelValues(path).Inc() }

// Interface guards
var (
	_ agentserver.Observer = Agents{}
	_ kubeproxy.Observer   = Proxy{}
	_ gitlab.Observer      = GitLab{}
)
