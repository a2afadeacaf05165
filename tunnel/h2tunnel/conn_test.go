package h2tunnel_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel/h2tunneltest"
)

// echoHandler answers with the request body, prefixed by the path.
func echoHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Path", r.URL.Path)
		io.WriteString(w, r.URL.Path+":")
		io.Copy(w, r.Body)
	})
}

func TestManyConcurrentStreams(t *testing.T) {
	p := h2tunneltest.NewPair(t, echoHandler(), h2tunneltest.Options{})
	const streams = 500
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for i := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := strings.Repeat(strconv.Itoa(i), 1000+i)
			req, _ := http.NewRequest(http.MethodPost, fmt.Sprintf("http://agent/s/%d", i), strings.NewReader(body))
			resp, err := p.RoundTrip(req)
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			got, err := io.ReadAll(resp.Body)
			if err != nil {
				errs <- err
				return
			}
			if want := fmt.Sprintf("/s/%d:%s", i, body); string(got) != want {
				errs <- fmt.Errorf("stream %d: got %d bytes, want %d", i, len(got), len(want))
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := p.KAS.Load(); n != 0 {
		t.Errorf("load after all bodies closed = %d, want 0", n)
	}
}

// TestStalledReaderDoesNotBlockOthers stalls one stream in each direction
// far beyond its flow-control window while other streams keep working.
func TestStalledReaderDoesNotBlockOthers(t *testing.T) {
	const big = 64 << 20 // 16 stream windows
	release := make(chan struct{})
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/download": // KAS never reads the response
			chunk := bytes.Repeat([]byte("d"), 64<<10)
			for written := 0; written < big; written += len(chunk) {
				if _, err := w.Write(chunk); err != nil {
					return
				}
			}
		case "/upload": // the agent never reads the request body
			<-release
		default:
			io.WriteString(w, "ok")
		}
	})
	p := h2tunneltest.NewPair(t, handler, h2tunneltest.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	defer close(release)

	download, err := p.Get(ctx, "/download")
	if err != nil {
		t.Fatal(err)
	}
	defer download.Body.Close()
	// Read a little so the stream is surely flowing, then stall.
	if _, err := io.ReadFull(download.Body, make([]byte, 1024)); err != nil {
		t.Fatal(err)
	}

	uploadBody, uploadWriter := io.Pipe()
	go func() {
		chunk := bytes.Repeat([]byte("u"), 64<<10)
		for written := 0; written < big; written += len(chunk) {
			if _, err := uploadWriter.Write(chunk); err != nil {
				return // the stream was reset at the end of the test
			}
		}
	}()
	uploadReq, _ := http.NewRequestWithContext(ctx, http.MethodPut, "http://agent/upload", uploadBody)
	uploadDone := make(chan struct{})
	go func() {
		defer close(uploadDone)
		if resp, err := p.RoundTrip(uploadReq); err == nil {
			resp.Body.Close()
		}
	}()

	// Both stalled streams have now filled their windows (or will while
	// these run). Everything else must still go through.
	done := make(chan struct{})
	go func() {
		defer close(done)
		var wg sync.WaitGroup
		for i := range 100 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := p.Get(ctx, fmt.Sprintf("/other/%d", i))
				if err != nil {
					t.Errorf("other request %d: %v", i, err)
					return
				}
				defer resp.Body.Close()
				if b, _ := io.ReadAll(resp.Body); string(b) != "ok" {
					t.Errorf("other request %d: body %q", i, b)
				}
			}()
		}
		wg.Wait()
	}()
	h2tunneltest.WaitDone(t, done, "requests next to stalled streams")
	cancel()
	uploadWriter.CloseWithError(errors.New("test over"))
	h2tunneltest.WaitDone(t, uploadDone, "stalled upload after cancel")
}

// TestDroppedConnectionFailsInFlight breaks the network under streams in
// flight, abruptly and silently; every stream must fail, none may hang.
func TestDroppedConnectionFailsInFlight(t *testing.T) {
	tests := []struct {
		name   string
		opts   h2tunnel.Options
		break_ func(p *h2tunneltest.Pair)
	}{
		{
			name:   "agent connection reset",
			break_: func(p *h2tunneltest.Pair) { p.AgentNet.Conn.Close() },
		},
		{
			// Nothing is closed: only keepalive PINGs can find out.
			name:   "network silently dead",
			opts:   h2tunnel.Options{KeepaliveInterval: 200 * time.Millisecond, KeepaliveTimeout: 200 * time.Millisecond},
			break_: func(p *h2tunneltest.Pair) { p.AgentNet.Blackhole() },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			started := make(chan struct{}, 100)
			handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				// A watch: one event, then silence until the client goes.
				io.WriteString(w, "event\n")
				http.NewResponseController(w).Flush()
				started <- struct{}{}
				<-r.Context().Done()
			})
			p := h2tunneltest.NewPair(t, handler, h2tunneltest.Options{Tunnel: tt.opts})
			const inFlight = 20
			results := make(chan error, inFlight)
			for range inFlight {
				go func() {
					resp, err := p.Get(context.Background(), "/watch")
					if err != nil {
						results <- err
						return
					}
					defer resp.Body.Close()
					_, err = io.ReadAll(resp.Body)
					results <- err
				}()
			}
			for range inFlight {
				<-started
			}
			tt.break_(p)
			for range inFlight {
				select {
				case err := <-results:
					if err == nil {
						t.Error("stream ended cleanly after the connection broke; want an error")
					}
				case <-time.After(30 * time.Second):
					t.Fatal("stream still open 30s after the connection broke")
				}
			}
			h2tunneltest.WaitDone(t, p.KAS.Done(), "conn done")
			if p.KAS.Err() == nil {
				t.Error("Err() = nil on a dead connection")
			}
			if _, err := p.Get(context.Background(), "/after"); err == nil {
				t.Error("request on a dead connection succeeded")
			}
		})
	}
}

func TestLargeBodiesBothWays(t *testing.T) {
	p := h2tunneltest.NewPair(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, _ := io.Copy(h, r.Body)
		fmt.Fprintf(w, "%d %x\n", n, h.Sum(nil))
		// Then send the same amount back.
		io.CopyN(w, zeros{}, n)
	}), h2tunneltest.Options{})
	const size = 32 << 20
	req, _ := http.NewRequest(http.MethodPut, "http://agent/big", io.LimitReader(zeros{}, size))
	resp, err := p.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var gotN int64
	var gotSum string
	if _, err := fmt.Fscanf(resp.Body, "%d %s\n", &gotN, &gotSum); err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(make([]byte, size))
	if gotN != size || gotSum != fmt.Sprintf("%x", want) {
		t.Errorf("agent got %d bytes with sum %s, want %d bytes", gotN, gotSum, size)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	if err != nil || n != size {
		t.Errorf("response body: %d bytes, err %v; want %d", n, err, size)
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

func TestServeConnEnds(t *testing.T) {
	t.Run("context cancelled", func(t *testing.T) {
		p := h2tunneltest.NewPair(t, echoHandler(), h2tunneltest.Options{})
		p.Cancel()
		select {
		case err := <-p.Served:
			if err != nil {
				t.Errorf("ServeConn = %v, want nil after cancel", err)
			}
			p.Served <- err // for the cleanup
		case <-time.After(30 * time.Second):
			t.Fatal("ServeConn still running after cancel")
		}
		h2tunneltest.WaitDone(t, p.KAS.Done(), "KAS side notices the agent left")
	})
	t.Run("KAS closes", func(t *testing.T) {
		p := h2tunneltest.NewPair(t, echoHandler(), h2tunneltest.Options{})
		p.KAS.Close()
		select {
		case err := <-p.Served:
			if err != h2tunnel.ErrConnClosed {
				t.Errorf("ServeConn = %v, want h2tunnel.ErrConnClosed", err)
			}
			p.Served <- err
		case <-time.After(30 * time.Second):
			t.Fatal("ServeConn still running after KAS closed")
		}
	})
}

// TestFlushReachesKASAtOnce checks that every flush on the agent side is
// delivered before the handler writes more: what watches rely on.
func TestFlushReachesKASAtOnce(t *testing.T) {
	next := make(chan struct{})
	p := h2tunneltest.NewPair(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		for i := range 3 {
			fmt.Fprintf(w, "line %d\n", i)
			rc.Flush()
			<-next // the test reads the line before the next is written
		}
	}), h2tunneltest.Options{})
	resp, err := p.Get(context.Background(), "/watch")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	buf := make([]byte, 64)
	for i := range 3 {
		n, err := resp.Body.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := string(buf[:n]), fmt.Sprintf("line %d\n", i); got != want {
			t.Errorf("read %q, want %q", got, want)
		}
		next <- struct{}{}
	}
}

// TestRequestCannotCloseTunnel: a request marked Close (an HTTP/1.1 client
// that sent "Connection: close") must not retire the tunnel, which every
// other request of the agent shares.
func TestRequestCannotCloseTunnel(t *testing.T) {
	p := h2tunneltest.NewPair(t, echoHandler(), h2tunneltest.Options{})
	for i := range 3 {
		req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://agent/r%d", i), nil)
		req.Close = true
		req.Header.Set("Connection", "close")
		resp, err := p.RoundTrip(req)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err := p.KAS.Err(); err != nil {
			t.Fatalf("tunnel unusable after request %d: %v", i, err)
		}
	}
	if !req2xx(t, p) {
		t.Error("a plain request failed after Connection: close requests")
	}
}

func req2xx(t *testing.T, p *h2tunneltest.Pair) bool {
	resp, err := p.Get(context.Background(), "/after")
	if err != nil {
		t.Log(err)
		return false
	}
	resp.Body.Close()
	return resp.StatusCode/100 == 2
}

// TestAfterDone: callbacks run once the connection is done, whether they
// were registered before or after, and each exactly once.
func TestAfterDone(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newPipeConn(t, http.NotFoundHandler())
		var before, after atomic.Int32
		ran := make(chan struct{}, 2)
		c.AfterDone(func() { before.Add(1); ran <- struct{}{} })
		synctest.Wait() // the connection is up and idle
		select {
		case <-ran:
			t.Fatal("callback ran while the connection was up")
		default:
		}
		c.Close()
		c.Close()
		<-ran
		c.AfterDone(func() { after.Add(1); ran <- struct{}{} })
		<-ran
		synctest.Wait() // a second run would have happened by now
		if before.Load() != 1 || after.Load() != 1 {
			t.Errorf("callbacks ran %d and %d times, want once each", before.Load(), after.Load())
		}
	})
}

// newPipeConn starts a tunnel over net.Pipe, whose agent side serves h,
// and returns its KAS side; cleanup closes it. Unlike
// [h2tunneltest.NewPair] it needs no network and no WebSocket, so it runs
// in a synctest bubble.
func newPipeConn(t *testing.T, h http.Handler) *h2tunnel.Conn {
	t.Helper()
	kasEnd, agentEnd := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- (&h2tunnel.Server{Handler: h}).ServeConn(ctx, agentEnd) }()
	c, err := h2tunnel.NewConn(kasEnd, tunnel.AgentInfo{ID: 1}, h2tunnel.Options{})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		cancel()
		<-served
	})
	return c
}

// TestEncodingDropsForgedHeaders: whatever the caller's header holds of
// this protocol's own headers, the agent sees only what Conn encodes
// from the request's internal form.
func TestEncodingDropsForgedHeaders(t *testing.T) {
	seen := make(chan *tunnel.Request, 1)
	p := h2tunneltest.NewPair(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		raw := r.Header.Clone()
		req, err := h2tunnel.DecodeRequest(r)
		if err != nil {
			t.Errorf("agent: %v", err)
		}
		for k := range raw {
			if strings.HasPrefix(k, "Kas-") && k != h2tunnel.IdentityHeader && k != h2tunnel.UpgradeHeader {
				t.Errorf("agent got header %s", k)
			}
		}
		seen <- req
	}), h2tunneltest.Options{})
	forged := http.Header{
		"Accept":             {"application/json"},
		"Kas-Impersonate":    {h2tunnel.EncodeIdentity(&identity.Identity{Username: "system:admin"})},
		"Kas-Upgrade":        {"SPDY/3.1"},
		"kas-upgrade-status": {"101"},
		"Kas-Agent-Pod-Name": {"x"},
		"Connection":         {"close"},
	}
	alice := &identity.Identity{Username: "alice", Groups: []string{"dev"}}
	for _, id := range []*identity.Identity{nil, alice} {
		req, _ := http.NewRequest(http.MethodGet, "http://agent/api", nil)
		req.Header = forged.Clone()
		resp, err := p.KAS.RoundTrip(&tunnel.Request{HTTP: req, Identity: id})
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		got := <-seen
		if !reflect.DeepEqual(got.Identity, id) || got.Upgrade != "" {
			t.Errorf("agent decoded identity %+v upgrade %q, want %+v and none", got.Identity, got.Upgrade, id)
		}
		if got.HTTP.Header.Get("Accept") != "application/json" {
			t.Errorf("end-to-end header lost: %v", got.HTTP.Header)
		}
	}
	if !req2xx(t, p) {
		t.Error("Connection: close retired the tunnel")
	}
}

// TestUpgradeForm: an upgrade the cluster accepts comes back as a 101 with
// the cluster's Upgrade and its bytes in the body; one it refuses comes
// back unchanged.
func TestUpgradeForm(t *testing.T) {
	p := h2tunneltest.NewPair(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		req, err := h2tunnel.DecodeRequest(r)
		if err != nil || req.Upgrade == "" {
			t.Errorf("agent: upgrade %q, %v", req.Upgrade, err)
		}
		if req.Upgrade == "refuse" {
			http.Error(w, "no such protocol", http.StatusBadRequest)
			return
		}
		w.Header().Set("X-Stream-Protocol-Version", "v4.channel.k8s.io")
		h2tunnel.SetSwitched(w.Header(), "chosen")
		w.WriteHeader(http.StatusOK)
		http.NewResponseController(w).Flush()
		io.Copy(w, r.Body) // echo the client's bytes
	}), h2tunneltest.Options{})

	clientBytes, toAgent := io.Pipe()
	req, _ := http.NewRequest(http.MethodPost, "http://agent/exec", clientBytes)
	resp, err := p.KAS.RoundTrip(&tunnel.Request{HTTP: req, Upgrade: "offered"})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "chosen" ||
		resp.Header.Get("X-Stream-Protocol-Version") != "v4.channel.k8s.io" {
		t.Fatalf("switched answer %s %v", resp.Status, resp.Header)
	}
	for k := range resp.Header {
		if strings.HasPrefix(k, "Kas-") {
			t.Errorf("the caller got the protocol's %s header", k)
		}
	}
	go func() {
		io.WriteString(toAgent, "ping")
		toAgent.Close()
	}()
	if b, err := io.ReadAll(resp.Body); err != nil || string(b) != "ping" {
		t.Errorf("switched body %q, %v; want the echo", b, err)
	}

	req, _ = http.NewRequest(http.MethodPost, "http://agent/exec", http.NoBody)
	resp, err = p.KAS.RoundTrip(&tunnel.Request{HTTP: req, Upgrade: "refuse"})
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "no such protocol") {
		t.Errorf("refusal came back as %s %q", resp.Status, body)
	}
}

// TestLoadCountsRequests: a request counts from RoundTrip until its
// response body is closed, which is what the router's least-loaded choice
// reads.
func TestLoadCountsRequests(t *testing.T) {
	release := make(chan struct{})
	p := h2tunneltest.NewPair(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		http.NewResponseController(w).Flush()
		<-release
	}), h2tunneltest.Options{})
	if n := p.KAS.Load(); n != 0 {
		t.Fatalf("idle load %d", n)
	}
	resp, err := p.Get(context.Background(), "/hold")
	if err != nil {
		t.Fatal(err)
	}
	if n := p.KAS.Load(); n != 1 {
		t.Errorf("load with a response open: %d, want 1", n)
	}
	close(release)
	resp.Body.Close()
	if n := p.KAS.Load(); n != 0 {
		t.Errorf("load after the body was closed: %d, want 0", n)
	}
}

// TestAfterReady: the agent's SETTINGS make a connection ready; a peer that
// never speaks HTTP/2 never does, not even once the connection ends.
func TestAfterReady(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newPipeConn(t, http.NotFoundHandler())
		ready := make(chan struct{})
		c.AfterReady(func() { close(ready) })
		<-ready
		late := make(chan struct{})
		c.AfterReady(func() { close(late) }) // after the fact: runs at once
		<-late
	})
	synctest.Test(t, func(t *testing.T) {
		kasEnd, silentEnd := net.Pipe()
		go io.Copy(io.Discard, silentEnd) // reads KAS's preface, answers nothing
		c, err := h2tunnel.NewConn(kasEnd, tunnel.AgentInfo{ID: 1}, h2tunnel.Options{})
		if err != nil {
			t.Fatal(err)
		}
		var ran atomic.Bool
		c.AfterReady(func() { ran.Store(true) })
		synctest.Wait()
		c.Close()
		silentEnd.Close()
		synctest.Wait()
		if ran.Load() {
			t.Error("a peer that sent no SETTINGS made the connection ready")
		}
	})
}

// TestMove asks the agent to move while a request is in flight: the agent
// is told once per Move, the request in flight finishes, the tunnel still
// carries new requests, and a client cannot forge the request to move.
func TestMove(t *testing.T) {
	release := make(chan struct{})
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			w.WriteHeader(http.StatusOK)
			http.NewResponseController(w).Flush()
			<-release
		}
		io.WriteString(w, "done "+r.Header.Get(h2tunnel.MoveHeader))
	})
	var moves atomic.Int32
	p := h2tunneltest.NewPair(t, handler, h2tunneltest.Options{OnMove: func() { moves.Add(1) }})
	slow, err := p.Get(t.Context(), "/slow")
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Body.Close()
	if p.KAS.Moving() {
		t.Fatal("moving before Move")
	}
	if err := p.KAS.Move(t.Context()); err != nil {
		t.Fatal(err)
	}
	if !p.KAS.Moving() || moves.Load() != 1 {
		t.Fatalf("after Move: moving %v, agent told %d times", p.KAS.Moving(), moves.Load())
	}
	for _, tc := range []struct {
		name   string
		header http.Header
	}{
		{"plain", nil},
		{"with a forged Kas-Move", http.Header{h2tunnel.MoveHeader: {"1"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, "http://agent/fast", nil)
			maps.Copy(req.Header, tc.header)
			resp, err := p.RoundTrip(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(body) != "done " {
				t.Errorf("got %q, want %q", body, "done ")
			}
		})
	}
	if moves.Load() != 1 {
		t.Errorf("agent told to move %d times, want 1", moves.Load())
	}
	close(release)
	body, err := io.ReadAll(slow.Body)
	if err != nil || string(body) != "done " {
		t.Errorf("request in flight during the move: %q, %v", body, err)
	}
}
