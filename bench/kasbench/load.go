package kasbench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

var discardLog = log.New(io.Discard, "", 0)

// target is one way to reach the upstream: directly, or through Caddy.
type target struct {
	name    string // "direct" or "single node"
	variant string // "" or " (baseline)"
	proto   string // "h1" or "h2"
	client  *http.Client
	base    string // URL prefix of the upstream's paths
	auth    string // Authorization header, if any
}

func (t target) label() string { return t.name + t.variant + " " + t.proto }

// closeClients closes the idle connections of the targets' clients, which
// may be nil.
func closeClients(ts ...target) {
	for _, t := range ts {
		if t.client != nil {
			t.client.CloseIdleConnections()
		}
	}
}

// newClient returns a kubectl-like client: TLS to 127.0.0.1, HTTP/1.1 with
// a pool of keep-alive connections or HTTP/2 on as few connections as the
// server's stream limit allows.
func newClient(pool *x509.CertPool, h2 bool) *http.Client {
	tr := &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: pool},
		MaxIdleConnsPerHost: 1024,
		DisableCompression:  true,
		IdleConnTimeout:     time.Minute,
	}
	var p http.Protocols
	if h2 {
		p.SetHTTP2(true)
	} else {
		p.SetHTTP1(true)
	}
	tr.Protocols = &p
	return &http.Client{Transport: tr}
}

func (t target) request(ctx context.Context, method, path string, body io.Reader, size int64) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, method, t.base+path, body)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.ContentLength = size
	}
	if t.auth != "" {
		req.Header.Set("Authorization", t.auth)
	}
	return req, nil
}

// meter counts the bytes of a load phase as they flow, so that a transfer
// still running at the end of the phase counts for what it moved.
type meter struct {
	on    *atomic.Bool
	bytes atomic.Int64
}

func (m *meter) add(n int64) {
	if m != nil && m.on.Load() {
		m.bytes.Add(n)
	}
}

// Write counts p.
func (m *meter) Write(p []byte) (int, error) {
	m.add(int64(len(p)))
	return len(p), nil
}

// do sends one request and reads the whole answer, counting body bytes in
// m (which may be nil).
func (t target) do(ctx context.Context, m *meter, method, path string, body []byte) error {
	var r io.Reader
	if body != nil {
		r = io.TeeReader(bytes.NewReader(body), m)
	}
	req, err := t.request(ctx, method, path, r, int64(len(body)))
	if err != nil {
		return err
	}
	resp, err := t.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var sink io.Writer = io.Discard
	if m != nil {
		sink = m
	}
	if _, err := io.Copy(sink, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s: %s", method, path, resp.Status)
	}
	return nil
}

// loadResult is what one load phase measured.
type loadResult struct {
	requests  int64
	errors    int64
	firstErr  error
	bytes     int64
	elapsed   time.Duration
	latencies []time.Duration // sorted
}

func (r loadResult) perSecond() float64 {
	if r.elapsed <= 0 {
		return 0
	}
	return float64(r.requests) / r.elapsed.Seconds()
}

func (r loadResult) mibPerSecond() float64 {
	if r.elapsed <= 0 {
		return 0
	}
	return float64(r.bytes) / (1 << 20) / r.elapsed.Seconds()
}

func (r loadResult) quantile(q float64) time.Duration { return quantile(r.latencies, q) }

func quantile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q * float64(len(sorted)-1))
	return sorted[i]
}

// runLoad runs op from conc workers for warmup plus d (at most maxOps
// operations after the warmup), and measures the part after the warmup.
// mark, if not nil, is called as the measured part starts (true) and ends
// (false), to read CPU counters.
func runLoad(ctx context.Context, conc int, warmup, d time.Duration, maxOps int64, mark func(bool), op func(context.Context, *meter) error) loadResult {
	if mark == nil {
		mark = func(bool) {}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		measuring atomic.Bool
		ops       atomic.Int64
		errs      atomic.Int64
		errOnce   sync.Once
		firstErr  error
		mu        sync.Mutex // guards all
		all       []time.Duration
		wg        sync.WaitGroup
	)
	m := &meter{on: &measuring}
	stop := make(chan struct{})
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var lat []time.Duration
			defer func() {
				mu.Lock()
				all = append(all, lat...)
				mu.Unlock()
			}()
			for {
				select {
				case <-stop:
					return
				default:
				}
				start := time.Now()
				err := op(ctx, m)
				if !measuring.Load() {
					continue
				}
				if err != nil {
					if ctx.Err() != nil {
						return
					}
					errs.Add(1)
					errOnce.Do(func() { firstErr = err })
					continue
				}
				lat = append(lat, time.Since(start))
				if ops.Add(1) >= maxOps {
					return
				}
			}
		}()
	}
	sleep(ctx, warmup)
	mark(true)
	measuring.Store(true)
	start := time.Now()
	allDone := make(chan struct{})
	go func() { wg.Wait(); close(allDone) }()
	select {
	case <-time.After(d):
	case <-allDone:
	case <-ctx.Done():
	}
	// A phase shorter than one request (a short -quick phase on a loaded
	// machine) goes on until one ends, so that no cell reports nothing.
wait:
	for ops.Load() == 0 && errs.Load() == 0 {
		select {
		case <-allDone:
			break wait
		case <-ctx.Done():
			break wait
		case <-time.After(10 * time.Millisecond):
		}
	}
	elapsed := time.Since(start)
	measuring.Store(false)
	mark(false)
	close(stop)
	<-allDone
	slices.Sort(all)
	return loadResult{
		requests: ops.Load(), errors: errs.Load(), firstErr: firstErr,
		bytes: m.bytes.Load(), elapsed: elapsed, latencies: all,
	}
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-time.After(d):
	case <-ctx.Done():
	}
}

// watchResult is what a watch phase measured.
type watchResult struct {
	streams        int
	expected, got  int64
	errors         int64
	firstErr       error
	p50, p99, maxD time.Duration
	elapsed        time.Duration // from the first request to the last line
}

// runWatches opens streams watch streams of lines lines each at once and
// measures how late each line arrives after the upstream wrote it.
func runWatches(ctx context.Context, t target, up *upstream, streams, lines int) watchResult {
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex // guards delays, firstErr
		delays   []time.Duration
		firstErr error
		got      atomic.Int64
		errs     atomic.Int64
	)
	path := "/watch?lines=" + strconv.Itoa(lines)
	start := time.Now()
	for range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d, err := watchOnce(ctx, t, up, path, lines, &got)
			mu.Lock()
			defer mu.Unlock()
			delays = append(delays, d...)
			if err != nil {
				errs.Add(1)
				if firstErr == nil {
					firstErr = err
				}
			}
		}()
	}
	wg.Wait()
	slices.Sort(delays)
	r := watchResult{streams: streams, expected: int64(streams * lines), got: got.Load(), errors: errs.Load(), firstErr: firstErr, elapsed: time.Since(start)}
	if len(delays) > 0 {
		r.p50, r.p99, r.maxD = quantile(delays, 0.5), quantile(delays, 0.99), delays[len(delays)-1]
	}
	return r
}

func watchOnce(ctx context.Context, t target, up *upstream, path string, lines int, got *atomic.Int64) ([]time.Duration, error) {
	req, err := t.request(ctx, http.MethodGet, path, nil, 0)
	if err != nil {
		return nil, err
	}
	resp, err := t.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("watch: %s", resp.Status)
	}
	delays := make([]time.Duration, 0, lines)
	sc := bufio.NewScanner(resp.Body)
	next := 0
	for sc.Scan() {
		now := time.Since(up.base)
		seq, sent, ok := strings.Cut(sc.Text(), " ")
		i, err1 := strconv.Atoi(seq)
		ns, err2 := strconv.ParseInt(sent, 10, 64)
		if !ok || err1 != nil || err2 != nil {
			return delays, errors.New("watch: malformed line")
		}
		if i != next {
			return delays, fmt.Errorf("watch: line %d after line %d", i, next-1)
		}
		next++
		got.Add(1)
		delays = append(delays, now-time.Duration(ns))
	}
	if err := sc.Err(); err != nil {
		return delays, err
	}
	if next != lines {
		return delays, fmt.Errorf("watch: %d of %d lines", next, lines)
	}
	return delays, nil
}
