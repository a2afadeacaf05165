package grpctunnel

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"time"
)

// GitLab's agentk configured with a grpc:// or grpcs:// address speaks
// gRPC straight to the site, on HTTP/2 connections that the web server
// owns (gitlab-wire §B.1). grpc.Server.ServeHTTP serves each call as a
// request of its own; what ties the calls of one agentk connection
// together is the connection's remote address, which no other connection
// has while it is open. Such an agent connection lives while it has calls:
// agentk always keeps its configuration stream and at least two tunnel
// streams open, so when the last call of a connection ends, the
// connection has ended (or agentk restarts), and after h2ConnLinger the
// tunnel is done.

// h2ConnLinger is how long an agent connection without calls is kept,
// so that calls which end and begin at the same moment (a used tunnel
// stream replaced by a new one) do not end it.
var h2ConnLinger = 5 * time.Second

// h2Conn is the state of one agent connection served through ServeHTTP.
type h2Conn struct {
	*agentConn
	// ctx is cancelled by Close; every call's context derives from it.
	ctx    context.Context
	cancel context.CancelFunc

	mu     sync.Mutex  // guards calls and linger
	calls  int         // calls in progress
	linger *time.Timer // ends the connection once it had no calls for h2ConnLinger
}

// IsGRPC reports whether r is a gRPC call of GitLab's agentk made on the
// site's own HTTP/2 connection: HTTP/2, a gRPC content type, and a method
// of one of agentk's services (their names all start "gitlab.agent.").
func IsGRPC(r *http.Request) bool {
	return r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") &&
		strings.HasPrefix(r.URL.Path, "/gitlab.agent.")
}

// ServeHTTP serves one gRPC call of GitLab's agentk that came as a request
// on the site's HTTP/2 connection ([IsGRPC]). The connection's tunnel is
// admitted with admission, the first call's, once a call has authenticated
// its agent.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request, admission Admission) {
	c := s.h2ConnFor(r.RemoteAddr, admission)
	defer c.callEnded()
	ctx, stop := context.WithCancel(r.Context())
	defer stop()
	unwatch := context.AfterFunc(c.ctx, stop)
	defer unwatch()
	s.grpcHTTP.ServeHTTP(flushWriter{w}, r.WithContext(context.WithValue(ctx, connKey{}, c.agentConn)))
}

// h2ConnFor returns the live agent connection of remoteAddr with one more
// call, making it if there is none.
func (s *Server) h2ConnFor(remoteAddr string, admission Admission) *h2Conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c := s.h2Conns[remoteAddr]; c != nil {
		c.callStarted()
		if c.Err() == nil {
			return c
		}
		c.callEnded() // ended while idle: a new one takes its place
	}
	c := &h2Conn{}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.agentConn = newAgentConn(func() error { c.cancel(); return nil }, remoteAddr, admission)
	c.calls = 1
	s.h2Conns[remoteAddr] = c
	c.AfterDone(func() {
		c.cancel()
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.h2Conns[remoteAddr] == c {
			delete(s.h2Conns, remoteAddr)
		}
	})
	return c
}

func (c *h2Conn) callStarted() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls++
	if c.linger != nil {
		c.linger.Stop()
		c.linger = nil
	}
}

func (c *h2Conn) callEnded() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls--
	if c.calls == 0 {
		c.linger = time.AfterFunc(h2ConnLinger, c.endIfIdle)
	}
}

// endIfIdle ends the connection if no call started since the timer was
// armed.
func (c *h2Conn) endIfIdle() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.calls == 0 {
		c.markDone(errConnClosed)
	}
}

// flushWriter gives grpc.Server.ServeHTTP the http.Flusher it asserts on:
// the writers of web servers such as Caddy wrap the connection's writer and
// do not implement it themselves, but http.ResponseController reaches
// through the wrappers.
type flushWriter struct{ http.ResponseWriter }

func (w flushWriter) Flush() { _ = http.NewResponseController(w.ResponseWriter).Flush() }

// Unwrap lets http.ResponseController reach the writer underneath.
func (w flushWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
