// Package h2tunneltest starts real tunnels of package h2tunnel (loopback
// TCP, WebSocket handshake, HTTP/2) between a test "KAS" and a test agent,
// with a network the test can break.
package h2tunneltest

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/wsconn"
)

// Pair is one tunnel between a test "KAS" and a test agent, over real
// loopback TCP and a real WebSocket handshake.
type Pair struct {
	// KAS is the KAS side of the tunnel.
	KAS *h2tunnel.Conn
	// AgentNet is the agent's raw TCP connection under the WebSocket, for
	// tests that break the network.
	AgentNet *FaultConn
	// Served receives ServeConn's result when the agent side ends.
	Served chan error
	// Cancel stops the agent side.
	Cancel context.CancelFunc
}

// Options configure [NewPair].
type Options struct {
	// Tunnel tunes both sides' HTTP/2 connection.
	Tunnel h2tunnel.Options
	// Agent describes the agent; ID 0 becomes 1.
	Agent tunnel.AgentInfo
	// OnMove is the agent side's [h2tunnel.Server.OnMove].
	OnMove func()
}

// NewPair starts a tunnel whose agent side serves h. Cleanup closes it.
func NewPair(t testing.TB, h http.Handler, o Options) *Pair {
	t.Helper()
	accepted := make(chan net.Conn, 1)
	kasSrv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !wsconn.IsUpgrade(r) || !wsconn.Offers(r, h2tunnel.Subprotocol) {
			http.Error(w, "not a tunnel", http.StatusBadRequest)
			return
		}
		nc, err := wsconn.Accept(w, r, h2tunnel.Subprotocol)
		if err != nil {
			t.Errorf("accept: %v", err)
			return
		}
		accepted <- nc
	}))
	t.Cleanup(kasSrv.Close)

	var agentNet *FaultConn
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			agentNet = &FaultConn{Conn: c}
			return agentNet, nil
		},
	}}
	ctx, cancel := context.WithCancel(context.Background())
	agentConn, _, err := wsconn.Dial(ctx, "ws"+kasSrv.URL[len("http"):]+"/", wsconn.DialOptions{HTTPClient: client, Subprotocol: h2tunnel.Subprotocol})
	if err != nil {
		cancel()
		t.Fatalf("dial: %v", err)
	}
	srv := &h2tunnel.Server{Handler: h, Options: o.Tunnel, OnMove: o.OnMove}
	p := &Pair{AgentNet: agentNet, Served: make(chan error, 1), Cancel: cancel}
	go func() { p.Served <- srv.ServeConn(ctx, agentConn) }()

	kasNet := <-accepted
	info := o.Agent
	if info.ID == 0 {
		info.ID = 1
	}
	p.KAS, err = h2tunnel.NewConn(kasNet, info, o.Tunnel)
	if err != nil {
		cancel()
		t.Fatalf("new conn: %v", err)
	}
	t.Cleanup(func() {
		p.KAS.Close()
		cancel()
		select {
		case err := <-p.Served:
			p.Served <- err // for tests that wait after cleanup started
		case <-time.After(10 * time.Second):
			t.Errorf("agent side did not stop")
		}
	})
	return p
}

// Get sends a GET for path through the tunnel.
func (p *Pair) Get(ctx context.Context, path string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent"+path, nil)
	if err != nil {
		return nil, err
	}
	return p.RoundTrip(req)
}

// RoundTrip sends req through the tunnel as a request without identity or
// upgrade, so that a Pair serves as an [http.RoundTripper]. Like every
// [tunnel.Request], it may change req's header.
func (p *Pair) RoundTrip(req *http.Request) (*http.Response, error) {
	return p.KAS.RoundTrip(&tunnel.Request{HTTP: req})
}

// FaultConn is a net.Conn whose traffic a test can cut: abruptly (Close)
// or silently ([FaultConn.Blackhole]: writes vanish, reads block), the way
// a dead NAT mapping or a pulled cable behaves.
type FaultConn struct {
	net.Conn
	mu        sync.Mutex // guards blackhole
	blackhole chan struct{}
}

func (c *FaultConn) hole() chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.blackhole
}

// Blackhole makes the connection silently drop everything from now on.
func (c *FaultConn) Blackhole() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.blackhole == nil {
		c.blackhole = make(chan struct{})
	}
}

func (c *FaultConn) Write(p []byte) (int, error) {
	if c.hole() != nil {
		return len(p), nil
	}
	return c.Conn.Write(p)
}

func (c *FaultConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if h := c.hole(); h != nil {
		// Drop what arrived and wait until the conn is closed.
		for err == nil {
			_, err = c.Conn.Read(p)
		}
		return 0, err
	}
	return n, err
}

// WaitDone waits for ch with a generous bound that only catches hangs; it
// is not a timing assertion.
func WaitDone(t testing.TB, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: still waiting after 30s", what)
	}
}
