package h2tunnel

import (
	"context"
	"errors"
	"log"
	"net"
	"net/http"
	"sync"
	"time"
)

// Server is the agent side of tunnels: it serves requests from KAS on
// connections that agentk dialed.
type Server struct {
	// Handler answers the requests KAS sends through the tunnel.
	Handler http.Handler
	// Options tune the HTTP/2 connection.
	Options Options
	// ErrorLog receives the HTTP/2 server's own error messages. Nil means
	// they are discarded.
	ErrorLog *log.Logger
	// ShutdownGrace is how long ServeConn lets requests in flight finish
	// after its context is done, before it closes the connection. Zero
	// closes at once.
	ShutdownGrace time.Duration
	// OnMove, if set, is called when KAS asks the agent to move (a
	// request with [MoveHeader]): it should open a new tunnel, and leave
	// this one serving until KAS closes it. It must not block; it may be
	// called more than once.
	OnMove func()
}

// serveMoves answers KAS's requests to move and passes every other request
// to s.Handler.
func (s *Server) serveMoves(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get(MoveHeader) == "" {
		s.Handler.ServeHTTP(w, r)
		return
	}
	if s.OnMove != nil {
		s.OnMove()
	}
	w.WriteHeader(http.StatusNoContent)
}

// ServeConn serves requests from KAS on nc until the connection ends or ctx
// is done, then closes nc. It returns nil when ctx ended it and
// [ErrConnClosed] when the connection ended on its own (KAS went away, or
// a keepalive PING went unanswered).
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) error {
	closed := make(chan struct{})
	var closeOnce sync.Once
	errorLog := s.ErrorLog
	if errorLog == nil {
		errorLog = log.New(discard{}, "", 0)
	}
	srv := &http.Server{
		Handler:   http.HandlerFunc(s.serveMoves),
		Protocols: h2cOnly(),
		HTTP2:     s.Options.http2Config(),
		ErrorLog:  errorLog,
		// Requests live as long as the tunnel, not longer: a handler
		// sees its context cancelled when the connection dies.
		BaseContext: func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
		ConnState: func(_ net.Conn, st http.ConnState) {
			if st == http.StateClosed || st == http.StateHijacked {
				closeOnce.Do(func() { close(closed) })
			}
		},
	}
	l := newSingleConnListener(nc)
	serveDone := make(chan struct{})
	go func() {
		defer close(serveDone)
		_ = srv.Serve(l) // returns when l is closed by Shutdown or Close below
	}()

	var err error
	select {
	case <-closed:
		err = ErrConnClosed
	case <-ctx.Done():
		if s.ShutdownGrace > 0 {
			sctx, cancel := context.WithTimeout(context.Background(), s.ShutdownGrace)
			_ = srv.Shutdown(sctx) // sends GOAWAY, waits for requests in flight
			cancel()
		}
	}
	_ = srv.Close()
	nc.Close()
	<-serveDone
	return err
}

// ErrConnClosed is returned by [Server.ServeConn] when the tunnel
// connection ended on its own.
var ErrConnClosed = errors.New("tunnel connection closed")

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// singleConnListener hands one connection to http.Server.Serve, then
// blocks until it is closed.
type singleConnListener struct {
	conns  chan net.Conn
	addr   net.Addr
	closed chan struct{}
	once   sync.Once
}

func newSingleConnListener(nc net.Conn) *singleConnListener {
	l := &singleConnListener{conns: make(chan net.Conn, 1), addr: nc.LocalAddr(), closed: make(chan struct{})}
	l.conns <- nc
	return l
}

func (l *singleConnListener) Accept() (net.Conn, error) {
	select {
	case nc := <-l.conns:
		return nc, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *singleConnListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *singleConnListener) Addr() net.Addr { return l.addr }
