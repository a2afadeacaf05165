package fakecluster

import (
	"fmt"
	"io"
	"net"
	"sync"
)

// echoServer is a TCP server on 127.0.0.1 that sends back whatever it
// receives; when the client half-closes, it finishes and closes too.
type echoServer struct {
	listener net.Listener
	wg       sync.WaitGroup
	mu       sync.Mutex
	closed   bool
	conns    map[net.Conn]struct{}
}

func startEchoServer() (*echoServer, error) {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("fakecluster: listen for the echo server: %w", err)
	}
	e := &echoServer{listener: listener, conns: make(map[net.Conn]struct{})}
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		for {
			conn, err := listener.Accept()
			if err != nil {
				return // closed
			}
			e.mu.Lock()
			if e.closed {
				e.mu.Unlock()
				_ = conn.Close()
				continue
			}
			e.conns[conn] = struct{}{}
			e.mu.Unlock()
			e.wg.Add(1) // the accept loop's own count keeps the group open
			go func() {
				defer e.wg.Done()
				defer func() {
					e.mu.Lock()
					delete(e.conns, conn)
					e.mu.Unlock()
					_ = conn.Close()
				}()
				_, _ = io.Copy(conn, conn)
				if tcp, ok := conn.(*net.TCPConn); ok {
					_ = tcp.CloseWrite()
				}
			}()
		}
	}()
	return e, nil
}

func (e *echoServer) addr() string { return e.listener.Addr().String() }

// close stops the server and its connections and waits for its goroutines.
func (e *echoServer) close() {
	_ = e.listener.Close()
	e.mu.Lock()
	e.closed = true
	for c := range e.conns {
		_ = c.Close()
	}
	e.mu.Unlock()
	e.wg.Wait()
}
