package tunnel

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

// pair is one tunnel between a test "KAS" and a test "agent", over real
// loopback TCP and a real WebSocket handshake.
type pair struct {
	kas *Conn
	// agentNet is the agent's raw TCP connection under the WebSocket, for
	// tests that break the network.
	agentNet *faultConn
	// served receives ServeConn's result when the agent side ends.
	served chan error
	cancel context.CancelFunc
}

type pairOptions struct {
	opts  Options
	agent AgentInfo
}

// newPair starts a tunnel whose agent side serves h.
func newPair(t testing.TB, h http.Handler, po pairOptions) *pair {
	t.Helper()
	accepted := make(chan net.Conn, 1)
	kasSrv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !IsWebSocketUpgrade(r) || !OffersSubprotocol(r) {
			http.Error(w, "not a tunnel", http.StatusBadRequest)
			return
		}
		nc, err := Accept(w, r)
		if err != nil {
			t.Errorf("accept: %v", err)
			return
		}
		accepted <- nc
	}))
	t.Cleanup(kasSrv.Close)

	var agentNet *faultConn
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			agentNet = newFaultConn(c)
			return agentNet, nil
		},
	}}
	ctx, cancel := context.WithCancel(context.Background())
	agentConn, _, err := Dial(ctx, "ws"+kasSrv.URL[len("http"):]+"/", DialOptions{HTTPClient: client})
	if err != nil {
		cancel()
		t.Fatalf("dial: %v", err)
	}
	srv := &Server{Handler: h, Options: po.opts}
	p := &pair{agentNet: agentNet, served: make(chan error, 1), cancel: cancel}
	go func() { p.served <- srv.ServeConn(ctx, agentConn) }()

	kasNet := <-accepted
	info := po.agent
	if info.ID == 0 {
		info.ID = 1
	}
	p.kas, err = NewConn(kasNet, info, po.opts)
	if err != nil {
		cancel()
		t.Fatalf("new conn: %v", err)
	}
	t.Cleanup(func() {
		p.kas.Close()
		cancel()
		select {
		case <-p.served:
		case <-time.After(10 * time.Second):
			t.Errorf("agent side did not stop")
		}
	})
	return p
}

// get sends a GET through the tunnel.
func (p *pair) get(ctx context.Context, path string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent"+path, nil)
	if err != nil {
		return nil, err
	}
	return p.kas.RoundTrip(req)
}

// faultConn is a net.Conn whose traffic a test can cut: abruptly (close)
// or silently (blackhole: writes vanish, reads block), the way a dead NAT
// mapping or a pulled cable behaves.
type faultConn struct {
	net.Conn
	mu        sync.Mutex // guards blackhole
	blackhole chan struct{}
}

func newFaultConn(c net.Conn) *faultConn { return &faultConn{Conn: c} }

func (c *faultConn) hole() chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.blackhole
}

// Blackhole makes the connection silently drop everything from now on.
func (c *faultConn) Blackhole() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.blackhole == nil {
		c.blackhole = make(chan struct{})
	}
}

func (c *faultConn) Write(p []byte) (int, error) {
	if c.hole() != nil {
		return len(p), nil
	}
	return c.Conn.Write(p)
}

func (c *faultConn) Read(p []byte) (int, error) {
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

// waitDone waits for a channel with a generous bound that only catches
// hangs; it is not a timing assertion.
func waitDone(t testing.TB, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: still waiting after 30s", what)
	}
}

var errTest = errors.New("test error")
