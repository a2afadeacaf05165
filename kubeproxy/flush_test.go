package kubeproxy

import (
	"net/http"
	"testing"

	"github.com/caddy-kas/caddy-kas/internal/h2frametest"
)

// TestProxyFlushesOnlyWhatStreams holds the proxy to the frames an HTTP/2
// client gets: the agent's answer of known length in one HEADERS and one
// DATA frame that ends the stream, and a streamed answer (a watch:
// unknown length, or an event stream) line by line, each line on the
// wire before the cluster writes the next.
func TestProxyFlushesOnlyWhatStreams(t *testing.T) {
	for name, answer := range h2frametest.FlushCases() {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, answer.Handler())
			header := http.Header{"Authorization": {"Bearer pat:1:plain-token"}}
			ex := h2frametest.Start(t, e.proxy.Config.Handler, prefix+"api/v1/namespaces/default/configmaps", header)
			ex.Expect(answer)
		})
	}
}
