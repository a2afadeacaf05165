package tunnel_test

import (
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-kas/caddy-kas/tunnel"
)

// fakeTunnel is a [tunnel.Tunnel] whose load and end a test sets, for
// testing what is protocol-neutral: the store and the router.
type fakeTunnel struct {
	info tunnel.AgentInfo
	load atomic.Int64

	mu     sync.Mutex // guards after and closed
	after  []func()
	closed bool
	done   chan struct{}
}

func newFake(agentID int64) *fakeTunnel {
	return &fakeTunnel{info: tunnel.AgentInfo{ID: agentID}, done: make(chan struct{})}
}

func (f *fakeTunnel) RoundTrip(req *tunnel.Request) (*http.Response, error) {
	return &http.Response{StatusCode: http.StatusOK, Header: http.Header{}, Body: http.NoBody, Request: req.HTTP}, nil
}
func (f *fakeTunnel) Agent() tunnel.AgentInfo { return f.info }
func (f *fakeTunnel) ConnectedAt() time.Time  { return time.Time{} }
func (f *fakeTunnel) Load() int64             { return f.load.Load() }
func (f *fakeTunnel) Done() <-chan struct{}   { return f.done }

func (f *fakeTunnel) Err() error {
	select {
	case <-f.done:
		return net.ErrClosed
	default:
		return nil
	}
}

func (f *fakeTunnel) AfterDone(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		go fn()
		return
	}
	f.after = append(f.after, fn)
}

func (f *fakeTunnel) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.closed {
		f.closed = true
		close(f.done)
		for _, fn := range f.after {
			go fn()
		}
	}
	return nil
}

var _ tunnel.Tunnel = (*fakeTunnel)(nil)
