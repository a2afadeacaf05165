package agentk

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"testing"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel/h2tunneltest"
)

// BenchmarkProxy measures agentk's side of a small request: a tunnel over
// loopback TCP whose agent side is agentk's own proxy, forwarding to an
// HTTPS HTTP/2 upstream as to a kube-apiserver. The KAS side and the
// upstream run in the same process, so a CPU profile shows all three:
//
//	go test -run '^$' -bench Proxy -benchmem -cpuprofile cpu.out ./agentk/
func BenchmarkProxy(b *testing.B) {
	small := bytes.Repeat([]byte("k"), 1<<10)
	c := http2Cluster(b, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(small)
	}))
	agent := h2tunneltest.NewPair(b, newProxy(c, zap.NewNop(), newMetrics()), h2tunneltest.Options{})

	for _, par := range []int{1, 8} {
		b.Run(fmt.Sprintf("get-1KiB/p%d", par), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(small)))
			b.SetParallelism(par)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					req, _ := http.NewRequest(http.MethodGet, "http://agent/api/v1/namespaces/default/configmaps/x", nil)
					resp, err := agent.RoundTrip(req)
					if err != nil {
						b.Error(err)
						return
					}
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if err != nil || resp.StatusCode != http.StatusOK {
						b.Errorf("status %d, %v", resp.StatusCode, err)
						return
					}
				}
			})
		})
	}
}
