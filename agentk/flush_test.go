package agentk

import (
	"testing"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/internal/h2frametest"
)

// TestProxyFlushesOnlyWhatStreams holds agentk's proxy to the frames it
// sends KAS: an answer of known length in one HEADERS and one DATA frame
// that ends the stream (no empty DATA frame flushed on its own), and a
// streamed answer (a watch: chunked, or an event stream) line by line,
// each line on the wire before the apiserver writes the next.
func TestProxyFlushesOnlyWhatStreams(t *testing.T) {
	for name, answer := range h2frametest.FlushCases() {
		t.Run(name, func(t *testing.T) {
			c := http2Cluster(t, answer.Handler())
			ex := h2frametest.Start(t, newProxy(c, zap.NewNop(), newMetrics()), "/api/v1/namespaces/default/configmaps", nil)
			ex.Expect(answer)
		})
	}
}
