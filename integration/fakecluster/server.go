package fakecluster

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"sync"
	"time"
)

// group runs and counts goroutines and handlers so that Close can wait for
// them; once closed it starts nothing new.
type group struct {
	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
}

// enter counts one more running task; it reports false once the group is
// closed. Each successful enter needs one leave.
func (g *group) enter() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	g.wg.Add(1)
	return true
}

func (g *group) leave() { g.wg.Done() }

// goFunc runs f in a goroutine the group owns, unless the group is closed.
func (g *group) goFunc(f func()) bool {
	if !g.enter() {
		return false
	}
	go func() {
		defer g.leave()
		f()
	}()
	return true
}

// close stops new tasks and waits for the running ones, for timeout at most.
func (g *group) close(timeout time.Duration) error {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	done := make(chan struct{})
	go func() {
		g.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("still running after %s", timeout)
	}
}

// server is one TLS listener on 127.0.0.1 with an http.Server that keeps
// track of its handlers and of the connections they hijacked, which
// http.Server.Close does not close.
type server struct {
	name     string
	listener net.Listener
	srv      *http.Server
	handlers group
	served   chan struct{} // closed when Serve returned

	mu       sync.Mutex
	hijacked map[net.Conn]struct{}
}

func startServer(name string, handler http.Handler, cert tls.Certificate, http2 bool) (*server, error) {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("fakecluster: listen for the %s: %w", name, err)
	}
	s := &server{
		name:     name,
		listener: listener,
		served:   make(chan struct{}),
		hijacked: make(map[net.Conn]struct{}),
	}
	s.srv = &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !s.handlers.enter() {
				http.Error(w, "fakecluster is shutting down", http.StatusServiceUnavailable)
				return
			}
			defer s.handlers.leave()
			handler.ServeHTTP(w, r)
		}),
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{cert},
			MinVersion:   tls.VersionTLS12,
		},
		ConnState: func(c net.Conn, state http.ConnState) {
			if state == http.StateHijacked {
				s.mu.Lock()
				s.hijacked[c] = struct{}{}
				s.mu.Unlock()
			}
		},
		ReadHeaderTimeout: time.Minute,
		// TLS handshake errors of clients that give up are no news
		ErrorLog: log.New(io.Discard, "", 0),
	}
	if !http2 {
		s.srv.TLSNextProto = map[string]func(*http.Server, *tls.Conn, http.Handler){}
	}
	go func() {
		defer close(s.served)
		_ = s.srv.ServeTLS(listener, "", "")
	}()
	return s, nil
}

func (s *server) addr() string { return s.listener.Addr().String() }

// stopAccepting closes the listener and every connection, the hijacked ones
// included, which ends the streams they carry.
func (s *server) stopAccepting() {
	_ = s.srv.Close()
	<-s.served
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.hijacked {
		_ = c.Close()
	}
	clear(s.hijacked)
}

// waitHandlers waits until every handler returned.
func (s *server) waitHandlers(timeout time.Duration) error {
	if err := s.handlers.close(timeout); err != nil {
		return fmt.Errorf("fakecluster: handlers of the %s: %w", s.name, err)
	}
	return nil
}

// recorder wraps a ResponseWriter to note the status code a handler answered
// with and whether it took the connection over. It keeps the Hijacker and
// Flusher of the wrapped writer, which the upgrade handlers need.
type recorder struct {
	http.ResponseWriter
	mu       sync.Mutex
	status   int
	hijacked bool
}

func (r *recorder) WriteHeader(code int) {
	r.mu.Lock()
	if r.status == 0 {
		r.status = code
	}
	r.mu.Unlock()
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(p []byte) (int, error) {
	r.mu.Lock()
	if r.status == 0 {
		r.status = http.StatusOK
	}
	r.mu.Unlock()
	return r.ResponseWriter.Write(p)
}

func (r *recorder) Flush() { _ = r.FlushError() }

// FlushError is what http.ResponseController calls to flush.
func (r *recorder) FlushError() error {
	return http.NewResponseController(r.ResponseWriter).Flush()
}

func (r *recorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	h, ok := r.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, errors.New("fakecluster: the connection cannot be hijacked (HTTP/2?)")
	}
	conn, rw, err := h.Hijack()
	if err == nil {
		r.mu.Lock()
		r.hijacked = true
		r.mu.Unlock()
	}
	return conn, rw, err
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

func (r *recorder) result() (status int, hijacked bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.status, r.hijacked
}
