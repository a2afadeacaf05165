package agentk

import (
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
)

// metrics are agentk's Prometheus metrics. They are few, so they are
// written by hand in the text exposition format
// (https://prometheus.io/docs/instrumenting/exposition_formats/) instead of
// pulling in a client library.
type metrics struct {
	tunnels         atomic.Int64  // tunnels connected now
	connects        atomic.Uint64 // tunnels established
	connectFailures atomic.Uint64 // dial or handshake failures
	moves           atomic.Uint64 // tunnels KAS asked to move
	inFlight        atomic.Int64  // proxied requests being served

	mu       sync.Mutex     // guards requests
	requests map[int]uint64 // proxied requests by response status code
}

func newMetrics() *metrics { return &metrics{requests: make(map[int]uint64)} }

// requestDone counts a proxied request that ended with status code.
func (m *metrics) requestDone(code int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.requests[code]++
}

// write renders the metrics in the Prometheus text format.
func (m *metrics) write(w io.Writer, version, commit string) {
	var b strings.Builder
	metric := func(name, typ, help string) {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
	}
	metric("agentk_build_info", "gauge", "Version and commit of agentk; always 1.")
	fmt.Fprintf(&b, "agentk_build_info{version=%s,commit=%s} 1\n", labelValue(version), labelValue(commit))

	metric("agentk_tunnel_connections", "gauge", "Tunnels to KAS connected now.")
	fmt.Fprintf(&b, "agentk_tunnel_connections %d\n", m.tunnels.Load())
	metric("agentk_tunnel_connects_total", "counter", "Tunnels to KAS established.")
	fmt.Fprintf(&b, "agentk_tunnel_connects_total %d\n", m.connects.Load())
	metric("agentk_tunnel_connect_failures_total", "counter", "Failed attempts to open a tunnel to KAS.")
	fmt.Fprintf(&b, "agentk_tunnel_connect_failures_total %d\n", m.connectFailures.Load())
	metric("agentk_tunnel_moves_total", "counter", "Tunnels KAS asked to move to a new tunnel (its node stopping, or the tunnel's maximum age).")
	fmt.Fprintf(&b, "agentk_tunnel_moves_total %d\n", m.moves.Load())

	metric("agentk_proxied_requests_total", "counter", "Requests from KAS answered, by HTTP status code.")
	m.mu.Lock()
	codes := make([]int, 0, len(m.requests))
	for c := range m.requests {
		codes = append(codes, c)
	}
	slices.Sort(codes)
	for _, c := range codes {
		fmt.Fprintf(&b, "agentk_proxied_requests_total{code=\"%d\"} %d\n", c, m.requests[c])
	}
	m.mu.Unlock()
	metric("agentk_proxied_requests_in_flight", "gauge", "Requests from KAS being served now.")
	fmt.Fprintf(&b, "agentk_proxied_requests_in_flight %d\n", m.inFlight.Load())

	io.WriteString(w, b.String())
}

// labelEscaper escapes what the exposition format requires in label
// values: backslash, double quote and line feed.
var labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)

// labelValue quotes a label value.
func labelValue(s string) string { return `"` + labelEscaper.Replace(s) + `"` }

// observabilityHandler serves the probes and metrics.
func (a *Agent) observabilityHandler() http.Handler {
	mux := http.NewServeMux()
	// Liveness: the process runs and serves HTTP. It does not depend on
	// KAS, so that an unreachable KAS does not get agentk restarted in a
	// loop by kubelet.
	mux.HandleFunc("GET /liveness", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, "ok\n")
	})
	// Readiness: at least one tunnel is up, so KAS can reach the cluster
	// through this agentk, and the apiserver answered its last check, so
	// that requests through the tunnel can succeed.
	mux.HandleFunc("GET /readiness", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if err := a.readiness(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "not ready: %v\n", err)
			return
		}
		fmt.Fprintf(w, "ok: %d tunnel(s) to KAS connected; the Kubernetes API server answers\n", a.metrics.tunnels.Load())
	})
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		a.metrics.write(w, a.version, a.commit)
	})
	return mux
}
