package kubeproxy

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"testing"
)

// BenchmarkProxy measures KAS's side of a small proxied request: the
// proxy's handler, called directly, authenticates a static token with an
// identity to impersonate, finds the agent's tunnel and copies the
// answer; the tunnel is a real one over loopback TCP to an agent that
// answers 1 KiB. Allocations per request include the agent's side (same
// process); -memprofile shows which are whose:
//
//	go test -run '^$' -bench Proxy -benchmem -memprofile mem.out ./kubeproxy/
func BenchmarkProxy(b *testing.B) {
	small := bytes.Repeat([]byte("k"), 1<<10)
	e := newEnv(b, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(small)
	}))
	h := e.proxy.Config.Handler
	b.ReportAllocs()
	for b.Loop() {
		req := httptest.NewRequest(http.MethodGet, prefix+"api/v1/namespaces/default/configmaps/x", nil)
		req.Header.Set("Authorization", "Bearer pat:1:dev-token")
		req.Header.Set("Accept", "application/json")
		req.Header.Set("User-Agent", "kubectl/v1.32.0 (linux/amd64) kubernetes/abcdef")
		w := &discardWriter{header: http.Header{}}
		h.ServeHTTP(w, req)
		if w.code != http.StatusOK || w.n != len(small) {
			b.Fatalf("status %d, %d bytes", w.code, w.n)
		}
	}
}

// discardWriter is a response writer that counts the body.
type discardWriter struct {
	header http.Header
	code   int
	n      int
}

func (w *discardWriter) Header() http.Header { return w.header }

func (w *discardWriter) WriteHeader(code int) { w.code = code }

func (w *discardWriter) Write(p []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	w.n += len(p)
	return len(p), nil
}
