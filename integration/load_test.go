package integration

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// Bounds of every load loop: it stops by itself when either is reached.
const (
	loadMaxDuration       = 3 * time.Minute
	loadMaxRequestsPerRun = 20000
)

// streamingClient is an HTTP/2 client of Caddy's internal CA without an
// overall timeout, for watches and long requests.
func (c *caddyServer) streamingClient(t testing.TB) *http.Client {
	t.Helper()
	pool, err := kubetest.CertPoolFromFile(c.rootCAFile())
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// ownProxyURL is the Kubernetes API at the port only this Caddy listens on.
func (c *caddyServer) ownProxyURL() string {
	return fmt.Sprintf("https://localhost:%d/-/kubernetes-agent/k8s-proxy/", c.ownPort)
}

// loadResult is how one request of a load loop went.
type loadResult struct {
	started, ended time.Time
	target         string
	err            error // nil: a complete answer
}

// proxyLoad sends requests through Caddy in a loop, from several workers,
// until finish or its bounds, and records how each went. A request counts
// as complete only if it answered 200 and its whole body was read and
// ends as the apiserver ends it: a cut response that looks complete is a
// failure too.
type proxyLoad struct {
	client *http.Client
	auth   string
	target atomic.Pointer[string] // the proxy URL requests go to
	stop   chan struct{}
	wg     sync.WaitGroup
	sent   atomic.Int64

	mu      sync.Mutex // guards results
	results []loadResult
}

// startProxyLoad starts workers that each loop over one request: path
// (relative to the proxy URL) as a short request, or, with long set, a
// watch that the apiserver ends after watchSeconds, as a request that
// takes that long and must end cleanly.
func startProxyLoad(t testing.TB, client *http.Client, target, auth string, workers int, path string, check func(body []byte) error) *proxyLoad {
	l := &proxyLoad{client: client, auth: auth, stop: make(chan struct{})}
	l.target.Store(&target)
	deadline := time.Now().Add(loadMaxDuration)
	for range workers {
		l.wg.Go(func() {
			for time.Now().Before(deadline) && l.sent.Add(1) <= loadMaxRequestsPerRun {
				select {
				case <-l.stop:
					return
				default:
				}
				l.record(l.one(path, check))
			}
		})
	}
	t.Cleanup(func() { l.finish() })
	return l
}

func (l *proxyLoad) one(path string, check func([]byte) error) (r loadResult) {
	target := *l.target.Load()
	r = loadResult{started: time.Now(), target: target}
	defer func() { r.ended = time.Now() }()
	ctx, cancel := context.WithTimeout(context.Background(), httpTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target+path, nil)
	if err != nil {
		r.err = err
		return r
	}
	req.Header.Set("Authorization", l.auth)
	req.Header.Set("Accept", "application/json")
	resp, err := l.client.Do(req)
	if err != nil {
		r.err = err
		return r
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	switch {
	case err != nil:
		r.err = fmt.Errorf("reading the body: %w", err)
	case resp.StatusCode != http.StatusOK:
		r.err = fmt.Errorf("HTTP %s: %s", resp.Status, kubetest.Redact(string(body)))
	default:
		r.err = check(body)
	}
	return r
}

func (l *proxyLoad) record(r loadResult) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.results = append(l.results, r)
}

// retarget sends the next requests to target, as a load balancer does
// once it takes a node out of rotation.
func (l *proxyLoad) retarget(target string) { l.target.Store(&target) }

// finish stops the workers, waits for their requests in flight and
// returns every result.
func (l *proxyLoad) finish() []loadResult {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.results
}

// failures returns the results that failed among those started before
// until (all of them with a zero until).
func failures(results []loadResult, until time.Time) (failed []loadResult, counted int) {
	for _, r := range results {
		if !until.IsZero() && !r.started.Before(until) {
			continue
		}
		counted++
		if r.err != nil {
			failed = append(failed, r)
		}
	}
	return failed, counted
}

// reportLoad fails t for every failed request started before until and
// logs what was measured.
func reportLoad(t testing.TB, name string, results []loadResult, until time.Time) {
	t.Helper()
	failed, counted := failures(results, until)
	var longest time.Duration
	for _, r := range results {
		longest = max(longest, r.ended.Sub(r.started))
	}
	t.Logf("%s: %d requests, %d failed, longest %v", name, counted, len(failed), longest.Round(time.Millisecond))
	if counted == 0 {
		t.Errorf("%s: no request was made", name)
	}
	for i, r := range failed {
		if i == 5 {
			t.Errorf("%s: and %d more failures", name, len(failed)-i)
			break
		}
		t.Errorf("%s: request to %s started %s, ended after %v: %v", name, r.target,
			r.started.Format("15:04:05.000"), r.ended.Sub(r.started).Round(time.Millisecond), r.err)
	}
}

// isConfigMapList checks that a short request's body is a whole list.
func isConfigMapList(body []byte) error {
	var list struct {
		Kind string `json:"kind"`
	}
	if err := json.Unmarshal(body, &list); err != nil || list.Kind != "ConfigMapList" {
		return fmt.Errorf("not a complete ConfigMapList (%d bytes): %v", len(body), err)
	}
	return nil
}

// isWatchStream checks that a watch's body is a sequence of whole events.
func isWatchStream(body []byte) error {
	dec := json.NewDecoder(strings.NewReader(string(body)))
	for {
		var ev struct {
			Type string `json:"type"`
		}
		err := dec.Decode(&ev)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil || ev.Type == "" {
			return fmt.Errorf("a cut watch event in %d bytes: %v", len(body), err)
		}
	}
}

// apiWatch is one open watch of ConfigMaps through Caddy, read as raw
// HTTP: it records the names it saw and how the stream ended.
type apiWatch struct {
	mu    sync.Mutex // guards seen and err
	seen  map[string]bool
	ended chan struct{} // closed once the stream ended
	err   error         // why it ended; nil for a clean end
}

// openWatches opens n watches of the ConfigMaps of ns at proxyURL and
// waits until each delivered the existing ConfigMap marker.
func openWatches(t testing.TB, client *http.Client, proxyURL, auth, ns, marker string, n int) []*apiWatch {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	watches := make([]*apiWatch, n)
	for i := range watches {
		w := &apiWatch{seen: map[string]bool{}, ended: make(chan struct{})}
		watches[i] = w
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, proxyURL+"api/v1/namespaces/"+ns+"/configmaps?watch=1", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", auth)
		req.Header.Set("Accept", "application/json")
		go w.run(client, req)
	}
	for i, w := range watches {
		if err := w.waitSeen(marker, time.Minute); err != nil {
			t.Fatalf("watch %d: %v", i, err)
		}
	}
	return watches
}

func (w *apiWatch) run(client *http.Client, req *http.Request) {
	err := func() error {
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("HTTP %s", resp.Status)
		}
		dec := json.NewDecoder(resp.Body)
		for {
			var ev struct {
				Object struct {
					Metadata struct {
						Name string `json:"name"`
					} `json:"metadata"`
				} `json:"object"`
			}
			if err := dec.Decode(&ev); err != nil {
				if errors.Is(err, io.EOF) {
					return nil // a clean end
				}
				return err
			}
			w.mu.Lock()
			w.seen[ev.Object.Metadata.Name] = true
			w.mu.Unlock()
		}
	}()
	w.mu.Lock()
	w.err = err
	w.mu.Unlock()
	close(w.ended)
}

// waitSeen waits until the watch delivered an event of ConfigMap name.
func (w *apiWatch) waitSeen(name string, timeout time.Duration) error {
	return kubetest.Eventually(timeout, func() error {
		w.mu.Lock()
		seen := w.seen[name]
		w.mu.Unlock()
		if seen {
			return nil
		}
		select {
		case <-w.ended:
			return kubetest.Permanent(fmt.Errorf("the watch ended (%v) before %s", w.endErr(), name))
		default:
		}
		return fmt.Errorf("no event of %s yet", name)
	})
}

func (w *apiWatch) endErr() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}
