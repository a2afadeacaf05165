// Package agentsim simulates many idle agents: each one opens a real
// tunnel (TLS, WebSocket handshake with an agent token, HTTP/2 in reverse)
// to one agent server and serves it with a trivial handler, the way agentk
// does but without a cluster behind it. It exists to measure what idle
// tunnels cost the server.
package agentsim

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-kas/caddy-kas/agentk"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/wsconn"
)

// Config describes the agents to simulate.
type Config struct {
	// URL is the agent endpoint, wss://host:port/-/kubernetes-agent/.
	URL string
	// TLS is the client TLS configuration (root CAs). HTTP/1.1 is forced.
	TLS *tls.Config
	// FirstID and Count choose the agents: ids FirstID..FirstID+Count-1.
	FirstID, Count int
	// Token returns the token of an agent id.
	Token func(id int) string
	// Sources are the local IP addresses to dial from, in turn, so that
	// many connections to one port do not exhaust the ephemeral ports of
	// one source address. Empty means the kernel's choice.
	Sources []net.IP
	// Parallel bounds how many handshakes run at once. Zero means 32.
	Parallel int
	// Reconnect makes each agent behave as agentk does: a failed handshake
	// is tried again, and a lost tunnel dialled again, after agentk's
	// backoff (1 s growing to 20 s, with jitter), until Stop. Start then
	// returns once every agent has been started, not connected.
	Reconnect bool
}

// Sim is a running set of simulated agents.
type Sim struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup // one per tunnel goroutine

	connected atomic.Int64 // tunnels up now
	failed    atomic.Int64 // handshakes that failed
	lost      atomic.Int64 // tunnels that ended before Stop
	stopping  atomic.Bool
}

// Start opens cfg.Count tunnels and returns once every handshake has
// succeeded or failed. The tunnels stay open until [Sim.Stop].
func Start(ctx context.Context, cfg Config) (*Sim, error) {
	if cfg.Count <= 0 || cfg.Token == nil {
		return nil, errors.New("agentsim: count and token function are required")
	}
	parallel := cfg.Parallel
	if parallel <= 0 {
		parallel = 32
	}
	tlsConfig := cfg.TLS.Clone()
	tlsConfig.NextProtos = []string{"http/1.1"}
	var next atomic.Uint64
	dialer := func(ctx context.Context, network, addr string) (net.Conn, error) {
		d := net.Dialer{Timeout: 30 * time.Second}
		if n := len(cfg.Sources); n > 0 {
			d.LocalAddr = &net.TCPAddr{IP: cfg.Sources[int(next.Add(1))%n]}
		}
		return d.DialContext(ctx, network, addr)
	}
	// Every connection is taken over by its tunnel after the handshake,
	// so the transport never keeps one idle.
	client := &http.Client{Transport: &http.Transport{
		DialContext:     dialer,
		TLSClientConfig: tlsConfig,
	}}

	runCtx, cancel := context.WithCancel(context.Background())
	s := &Sim{cancel: cancel}
	srv := &h2tunnel.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte("ok\n"))
	})}

	sem := make(chan struct{}, parallel)
	if cfg.Reconnect {
		for i := range cfg.Count {
			s.wg.Add(1)
			go func(id int) {
				defer s.wg.Done()
				s.reconnectLoop(runCtx, client, srv, sem, cfg.URL, cfg.Token(id), id)
			}(cfg.FirstID + i)
		}
		return s, nil
	}
	var hs sync.WaitGroup // handshakes in progress
	for i := range cfg.Count {
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		hs.Add(1)
		go func(id int) {
			defer hs.Done()
			nc, err := dial(ctx, client, cfg.URL, cfg.Token(id), id)
			<-sem
			if err != nil {
				s.failed.Add(1)
				return
			}
			s.connected.Add(1)
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				_ = srv.ServeConn(runCtx, nc)
				s.connected.Add(-1)
				if !s.stopping.Load() {
					s.lost.Add(1)
				}
			}()
		}(cfg.FirstID + i)
	}
	hs.Wait()
	client.CloseIdleConnections()
	return s, ctx.Err()
}

// reconnectLoop keeps one agent connected, as agentk does, until ctx ends.
func (s *Sim) reconnectLoop(ctx context.Context, client *http.Client, srv *h2tunnel.Server, sem chan struct{}, url, token string, id int) {
	b := agentk.DefaultBackoff()
	for ctx.Err() == nil {
		var uptime time.Duration
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return
		}
		nc, err := dial(ctx, client, url, token, id)
		<-sem
		if err != nil {
			s.failed.Add(1)
		} else {
			s.connected.Add(1)
			start := time.Now()
			_ = srv.ServeConn(ctx, nc)
			uptime = time.Since(start)
			s.connected.Add(-1)
			if !s.stopping.Load() {
				s.lost.Add(1)
			}
		}
		t := time.NewTimer(b.Next(uptime))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		}
	}
}

func dial(ctx context.Context, client *http.Client, url, token string, id int) (net.Conn, error) {
	h := make(http.Header)
	h.Set("Authorization", "Bearer "+token)
	h.Set("User-Agent", "kasbench-agentsim")
	h2tunnel.SetMetaHeaders(h, tunnel.AgentMeta{Version: "agentsim", PodNamespace: "bench", PodName: "agentsim-" + strconv.Itoa(id), PodID: int64(id), ConnectionID: int64(id)})
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	nc, resp, err := wsconn.Dial(dctx, url, wsconn.DialOptions{HTTPClient: client, Header: h, Subprotocol: h2tunnel.Subprotocol})
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("agent %d: handshake answered %s: %w", id, resp.Status, err)
		}
		return nil, fmt.Errorf("agent %d: %w", id, err)
	}
	return nc, nil
}

// Counts reports the tunnels up now, the handshakes that failed and the
// tunnels that ended on their own.
func (s *Sim) Counts() (connected, failed, lost int64) {
	return s.connected.Load(), s.failed.Load(), s.lost.Load()
}

// Stop closes every tunnel and waits for them to end.
func (s *Sim) Stop() {
	s.stopping.Store(true)
	s.cancel()
	s.wg.Wait()
}
