package grpctunnel

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/caddy-kas/caddy-kas/tunnel"
)

// errConnClosed is the reason of a tunnel whose connection ended.
var errConnClosed = errors.New("agent connection closed")

// agentConn is one gRPC connection of GitLab's agentk and, once a call has
// authenticated its agent, that agent's [tunnel.Tunnel].
type agentConn struct {
	// closeConn closes the connection: the WebSocket's byte stream, or
	// for calls served on an HTTP/2 connection of the site, the calls.
	closeConn   func() error
	remoteAddr  string
	admission   Admission
	connectedAt time.Time
	// connectionID tells this connection's tunnel apart in logs and, until
	// agentk registers its pod id, in the agent tracker.
	connectionID int64

	// active counts requests from RoundTrip until their response body is
	// closed or they fail.
	active atomic.Int64

	mu         sync.Mutex // guards the fields below
	info       tunnel.AgentInfo
	known      bool          // whether a call authenticated the agent
	token      string        // the token that did, for re-checks; never logged
	admitted   bool          // whether the tunnel was handed to the admission
	idle       []*idleStream // Connect streams waiting for a request, oldest first
	idleAdded  chan struct{} // closed (and replaced) when a stream is added or the connection ends
	doneErr    error         // why the connection ended; nil while it lives
	afterDone  []func()      // run once it ends
	done       chan struct{} // closed when it ends
	authorized [sha256.Size]byte
}

func newAgentConn(closeConn func() error, remoteAddr string, admission Admission) *agentConn {
	return &agentConn{
		closeConn:    closeConn,
		remoteAddr:   remoteAddr,
		admission:    admission,
		connectedAt:  time.Now(),
		connectionID: rand.Int64(),
		idleAdded:    make(chan struct{}),
		done:         make(chan struct{}),
	}
}

// authorize checks the token of one call. The first token that
// authenticates decides the connection's agent; a later call with the
// same token is not checked again (the agent endpoint re-checks it
// periodically), one with another token must belong to the same agent.
// The tunnel is admitted later, with its first idle stream: before that it
// could carry no request, and by then agentk has usually registered, so
// the tunnel is logged with its pod and version.
func (c *agentConn) authorize(ctx context.Context, token string) error {
	digest := sha256.Sum256([]byte(token))
	c.mu.Lock()
	if c.known && digestEqual(digest, c.authorized) {
		c.mu.Unlock()
		return nil
	}
	c.mu.Unlock()

	agent, err := c.admission.Authenticate(ctx, token)
	if err != nil {
		return err
	}
	c.mu.Lock()
	if c.doneErr != nil {
		c.mu.Unlock()
		return status.Error(codes.Unavailable, "connection closing")
	}
	if c.known {
		same := c.info.ID == agent.ID
		c.mu.Unlock()
		if !same {
			return status.Error(codes.PermissionDenied, "token of another agent than the connection's")
		}
		return nil
	}
	meta := c.info.Meta // what Register may have said already
	c.info = agent
	c.info.Meta = meta
	c.info.Meta.ConnectionID = c.connectionID
	c.info.RemoteAddr = c.remoteAddr
	c.info.Credential = digest
	c.known, c.authorized, c.token = true, digest, token
	c.mu.Unlock()
	return nil
}

// setMeta records what agentk said of itself in Register.
func (c *agentConn) setMeta(m tunnel.AgentMeta) {
	c.mu.Lock()
	defer c.mu.Unlock()
	m.ConnectionID = c.connectionID
	c.info.Meta = m
}

// addIdle offers a Connect stream of an authorized call for a request,
// admitting the tunnel with the first; false means the connection is
// ending.
func (c *agentConn) addIdle(is *idleStream) bool {
	c.mu.Lock()
	if c.doneErr != nil {
		c.mu.Unlock()
		return false
	}
	c.idle = append(c.idle, is)
	close(c.idleAdded)
	c.idleAdded = make(chan struct{})
	admit := !c.admitted
	c.admitted = true
	token := c.token
	c.mu.Unlock()
	if admit {
		c.admission.Admit(c, token)
	}
	return true
}

// removeIdle takes is out of the idle streams; false means a request has
// claimed it already.
func (c *agentConn) removeIdle(is *idleStream) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, x := range c.idle {
		if x == is {
			c.idle = append(c.idle[:i], c.idle[i+1:]...)
			return true
		}
	}
	return false
}

// claimIdle takes an idle stream for a request, waiting for agentk to open
// one if none is idle (it opens more as its streams are used, gitlab-wire
// §B.3), until ctx is done or the connection ends.
func (c *agentConn) claimIdle(ctx context.Context) (*idleStream, error) {
	for {
		c.mu.Lock()
		if c.doneErr != nil {
			err := c.doneErr
			c.mu.Unlock()
			return nil, err
		}
		// The newest stream first: an old idle stream is the likeliest to
		// be closed by agentk's idle timeout at this very moment.
		if n := len(c.idle); n > 0 {
			is := c.idle[n-1]
			c.idle = c.idle[:n-1]
			c.mu.Unlock()
			close(is.claimed)
			return is, nil
		}
		added := c.idleAdded
		c.mu.Unlock()
		select {
		case <-added:
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for an idle tunnel stream: %w", context.Cause(ctx))
		}
	}
}

// markDone ends the tunnel: no new requests, callbacks run.
func (c *agentConn) markDone(err error) {
	c.mu.Lock()
	if c.doneErr != nil {
		c.mu.Unlock()
		return
	}
	c.doneErr = err
	close(c.done)
	close(c.idleAdded)
	fs := c.afterDone
	c.afterDone = nil
	c.mu.Unlock()
	for _, f := range fs {
		go f()
	}
}

// Agent implements [tunnel.Tunnel].
func (c *agentConn) Agent() tunnel.AgentInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.info
}

// ConnectedAt implements [tunnel.Tunnel].
func (c *agentConn) ConnectedAt() time.Time { return c.connectedAt }

// Load implements [tunnel.Tunnel].
func (c *agentConn) Load() int64 { return c.active.Load() }

// Done implements [tunnel.Tunnel].
func (c *agentConn) Done() <-chan struct{} { return c.done }

// Err implements [tunnel.Tunnel].
func (c *agentConn) Err() error {
	select {
	case <-c.done:
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.doneErr
	default:
		return nil
	}
}

// AfterDone implements [tunnel.Tunnel].
func (c *agentConn) AfterDone(f func()) {
	c.mu.Lock()
	if c.doneErr == nil {
		c.afterDone = append(c.afterDone, f)
		c.mu.Unlock()
		return
	}
	c.mu.Unlock()
	go f()
}

// Close implements [tunnel.Tunnel]: it closes the connection; the gRPC
// server notices and ends every call on it.
func (c *agentConn) Close() error {
	err := c.closeConn()
	c.markDone(net.ErrClosed)
	return err
}

// RoundTrip implements [tunnel.Tunnel]: one MakeRequest call on an idle
// Connect stream.
func (c *agentConn) RoundTrip(req *tunnel.Request) (*http.Response, error) {
	c.active.Add(1)
	release := sync.OnceFunc(func() { c.active.Add(-1) })
	is, err := c.claimIdle(req.HTTP.Context())
	if err != nil {
		release()
		return nil, fmt.Errorf("agent %d: %w", c.Agent().ID, err)
	}
	resp, err := is.roundTrip(req, release)
	if err != nil {
		release()
		return nil, fmt.Errorf("agent %d: %w", c.Agent().ID, err)
	}
	return resp, nil
}

var _ tunnel.Tunnel = (*agentConn)(nil)
