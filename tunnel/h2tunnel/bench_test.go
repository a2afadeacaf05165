package h2tunnel_test

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"testing"

	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel/h2tunneltest"
)

// BenchmarkOneAgent measures one agent connection against the same
// upstream reached directly, in the same run, so the two can be compared
// as a ratio (absolute numbers move between runs on a shared machine):
//
//	go test -run '^$' -bench OneAgent -benchmem ./tunnel/
//
// "direct" is an HTTP/1.1 client with keep-alive to the upstream on
// loopback; "tunnel" is the KAS side of a tunnel (WebSocket over loopback
// TCP, HTTP/2 inside) to an agent whose handler reverse-proxies to the
// same upstream, as agentk does. Parallel sub-benchmarks use
// GOMAXPROCS×p goroutines.
func BenchmarkOneAgent(b *testing.B) {
	small := bytes.Repeat([]byte("k"), 1<<10)
	large := bytes.Repeat([]byte("M"), 10<<20)
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/small":
			w.Write(small)
		case "/large":
			w.Write(large)
		case "/upload":
			io.Copy(io.Discard, r.Body)
		}
	}))
	defer upstream.Close()
	target, _ := url.Parse(upstream.URL)

	direct := &http.Transport{MaxIdleConnsPerHost: 1024}
	defer direct.CloseIdleConnections()
	agentHandler := &httputil.ReverseProxy{
		Rewrite:       func(pr *httputil.ProxyRequest) { pr.SetURL(target) },
		Transport:     &http.Transport{MaxIdleConnsPerHost: 1024},
		FlushInterval: -1,
	}
	p := h2tunneltest.NewPair(b, agentHandler, h2tunneltest.Options{})

	paths := map[string]http.RoundTripper{"direct": direct, "tunnel": p}
	for _, path := range []string{"direct", "tunnel"} {
		rt := paths[path]
		base := upstream.URL
		if path == "tunnel" {
			base = "http://agent"
		}
		for _, par := range []int{1, 8, 64} {
			b.Run(fmt.Sprintf("%s/get-1KiB/p%d", path, par), func(b *testing.B) {
				b.SetBytes(int64(len(small)))
				runParallel(b, par, func() error { return get(rt, base+"/small") })
			})
		}
		for _, par := range []int{1, 4} {
			b.Run(fmt.Sprintf("%s/get-10MiB/p%d", path, par), func(b *testing.B) {
				b.SetBytes(int64(len(large)))
				runParallel(b, par, func() error { return get(rt, base+"/large") })
			})
			b.Run(fmt.Sprintf("%s/put-10MiB/p%d", path, par), func(b *testing.B) {
				b.SetBytes(int64(len(large)))
				runParallel(b, par, func() error {
					req, _ := http.NewRequest(http.MethodPut, base+"/upload", bytes.NewReader(large))
					return send(rt, req)
				})
			})
		}
	}
}

func runParallel(b *testing.B, parallelism int, op func() error) {
	b.ReportAllocs()
	b.SetParallelism(parallelism)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := op(); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

func get(rt http.RoundTripper, u string) error {
	req, _ := http.NewRequest(http.MethodGet, u, nil)
	return send(rt, req)
}

func send(rt http.RoundTripper, req *http.Request) error {
	resp, err := rt.RoundTrip(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}

var _ http.RoundTripper = (*h2tunneltest.Pair)(nil)
