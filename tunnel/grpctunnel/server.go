package grpctunnel

import (
	"context"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	_ "google.golang.org/grpc/encoding/gzip" // GitLab's agentk compresses every call with gzip (gitlab-wire §B.1)
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentconfigurationrpc"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentregistrarrpc"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/reversetunnelrpc"
)

// Subprotocol is the WebSocket subprotocol GitLab's agentk offers for
// gRPC over a WebSocket (gitlab-wire §B.1).
const Subprotocol = "ws-tunnel"

// Limits and timers of the gRPC server, from GitLab's KAS and agentk
// (gitlab-wire §B.1, kas-spec §4.2).
const (
	// maxMessageSize is the largest gRPC message either side accepts.
	// Bodies travel in chunks far below it.
	maxMessageSize = 10 << 20
	// keepaliveMinTime is how often agentk may ping. agentk pings every
	// 55 s, also on idle connections, to keep proxies in front from
	// closing them.
	keepaliveMinTime = 20 * time.Second
	// keepaliveTime and keepaliveTimeout make the server ping a
	// connection that has been silent, to find dead agents.
	keepaliveTime    = 30 * time.Second
	keepaliveTimeout = 20 * time.Second
)

// Admission is how the agent endpoint that accepted a connection decides
// about the agent on it. Its methods are called concurrently.
type Admission interface {
	// Authenticate returns the agent a token belongs to, or an error that
	// is a gRPC status for the agent: Unauthenticated for a token of no
	// agent (agentk backs off), Unavailable when the token cannot be
	// checked now.
	Authenticate(ctx context.Context, token string) (tunnel.AgentInfo, error)
	// CountCall is told of every call whose token authenticated, before
	// the call is served, and returns an error that is a gRPC status for
	// the agent if the call may not go on: ResourceExhausted for a token
	// over its limit of calls per minute (GitLab's KAS counts every call
	// against connections_per_token_per_minute).
	CountCall(ctx context.Context, token string) error
	// Admit takes a tunnel whose agent is known and keeps it for as long
	// as it lives, re-checking token meanwhile. It is called once per
	// connection.
	Admit(t tunnel.Tunnel, token string)
	// Configuration returns the configuration of the agent as
	// GetConfiguration streams it, nil while none is known, and a channel
	// that is closed when that changes; a nil channel never is.
	Configuration(agentID int64) (*agentconfigurationrpc.ConfigurationResponse, <-chan struct{})
}

// Server serves GitLab's agentk connections: one gRPC server for all of
// them, which outlives configuration reloads as the tunnels do. Each
// connection remembers the [Admission] of the endpoint that accepted it.
type Server struct {
	// grpc serves the WebSocket connections; grpcHTTP the calls on the
	// site's own HTTP/2 connections. They are apart because gRPC's
	// graceful stop sends GOAWAY on the first but closes the second at
	// once: a stopping node drains only the first, and Caddy's own HTTP/2
	// shutdown sends the GOAWAY of the second.
	grpc     *grpc.Server
	grpcHTTP *grpc.Server
	lis      *connListener

	mu sync.Mutex // guards h2Conns
	// h2Conns are the agent connections whose calls come as requests on
	// the site's own HTTP/2 connections (grpc:// and grpcs://), by the
	// connection's remote address.
	h2Conns map[string]*h2Conn

	serveDone chan struct{} // closed when the goroutine of grpc.Serve returns

	// draining is closed by Drain: calls that only wait (idle Connect
	// streams, GetConfiguration) end, so that agentk makes them again on
	// its new connection.
	draining  chan struct{}
	drainOnce sync.Once
}

// Option tunes a [Server].
type Option func(*serverOptions)

type serverOptions struct {
	maxConnectionAge time.Duration
}

// WithMaxConnectionAge limits how long an agent connection lives, as
// GitLab's KAS max_connection_age does (kas-spec §1.1): after
// [tunnel.MaxAgeSchedule]'s first part (with gRPC's own jitter of
// ±10 % on top) the server sends GOAWAY, upon which GitLab's agentk
// (grpc-go) makes its next calls on a new connection, to whichever node
// its address leads to then; the connection closes at most maxAge after
// it opened, failing the calls still on it. Zero or negative: no limit.
func WithMaxConnectionAge(maxAge time.Duration) Option {
	return func(o *serverOptions) { o.maxConnectionAge = maxAge }
}

// NewServer starts a server; [Server.Close] stops it.
func NewServer(opts ...Option) *Server {
	var o serverOptions
	for _, opt := range opts {
		opt(&o)
	}
	params := keepalive.ServerParameters{Time: keepaliveTime, Timeout: keepaliveTimeout}
	if o.maxConnectionAge > 0 {
		params.MaxConnectionAge, params.MaxConnectionAgeGrace = tunnel.MaxAgeSchedule(o.maxConnectionAge)
		// gRPC adds its own jitter of ±10 % to the age; keep the end of
		// the grace within the limit.
		params.MaxConnectionAge = params.MaxConnectionAge * 9 / 10
	}
	s := &Server{lis: newConnListener(), serveDone: make(chan struct{}), h2Conns: make(map[string]*h2Conn), draining: make(chan struct{})}
	svc := &services{srv: s}
	newGRPC := func() *grpc.Server {
		g := grpc.NewServer(
			grpc.StatsHandler(connTracker{}),
			grpc.MaxRecvMsgSize(maxMessageSize),
			grpc.MaxSendMsgSize(maxMessageSize),
			grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: keepaliveMinTime, PermitWithoutStream: true}),
			grpc.KeepaliveParams(params),
		)
		reversetunnelrpc.RegisterReverseTunnelServer(g, svc)
		agentregistrarrpc.RegisterAgentRegistrarServer(g, svc)
		agentconfigurationrpc.RegisterAgentConfigurationServer(g, svc)
		return g
	}
	s.grpc, s.grpcHTTP = newGRPC(), newGRPC()
	go func() {
		defer close(s.serveDone)
		// Returns once the listener is closed by Stop.
		_ = s.grpc.Serve(s.lis)
	}()
	return s
}

// Serve serves gRPC on nc, a connection of GitLab's agentk (the byte stream
// of its WebSocket), whose peer address is remoteAddr. It returns at once:
// the server owns nc from then on. The connection's tunnel is admitted with
// admission once a call has authenticated its agent.
func (s *Server) Serve(nc net.Conn, remoteAddr string, admission Admission) {
	c := newAgentConn(nc.Close, remoteAddr, admission)
	if !s.lis.push(&taggedConn{Conn: nc, addr: &connAddr{conn: c}}) {
		c.Close()
	}
}

// Drain is for a node that stops: it sends GOAWAY on every WebSocket
// connection of an agent (gRPC's graceful stop), upon which GitLab's
// agentk (grpc-go) makes its next calls on a new connection, to whichever
// node its address leads to now, and ends the calls that only wait (idle
// Connect streams, GetConfiguration) so that agentk makes them there at
// once. Calls that carry a request go on until they end or grace has
// passed; then the server stops, and calls still on it fail. Drain returns
// once every call on the WebSocket connections has ended. Calls on the
// site's own HTTP/2 connections (grpc:// and grpcs:// addresses) go on
// meanwhile: Caddy's HTTP/2 shutdown sends those connections' GOAWAY, and
// their tunnels are drained like every other (tunnel.Store.Drain).
func (s *Server) Drain(grace time.Duration) {
	s.drainOnce.Do(func() { close(s.draining) })
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		s.grpc.GracefulStop()
	}()
	timer := time.NewTimer(grace)
	defer timer.Stop()
	select {
	case <-stopped:
	case <-timer.C:
		s.grpc.Stop()
		<-stopped
	}
	<-s.serveDone
}

// Close stops the server and closes every connection.
func (s *Server) Close() error {
	s.grpcHTTP.Stop()
	s.grpc.Stop()
	<-s.serveDone
	return nil
}

// connAddr is the remote address of a connection as the gRPC server sees
// it. It carries the connection's state, so that every call finds it in
// its context ([peer.FromContext]) and the stats handler can tell the
// connection ended.
type connAddr struct{ conn *agentConn }

func (a *connAddr) Network() string { return "websocket" }
func (a *connAddr) String() string  { return a.conn.remoteAddr }

// taggedConn is an agent connection with its [connAddr].
type taggedConn struct {
	net.Conn
	addr *connAddr
}

func (c *taggedConn) RemoteAddr() net.Addr { return c.addr }

// connTracker is the gRPC stats handler that puts each connection's state
// into the context of its calls and marks it done when it ends.
type connTracker struct{}

// connKey keys the state of a call's agent connection in the call's
// context; wsConnKey keys it in the context of a WebSocket connection
// only. The gRPC server also reports each call that ServeHTTP serves as a
// connection of its own, whose end is not the agent connection's.
type connKey struct{}
type wsConnKey struct{}

func (connTracker) TagConn(ctx context.Context, info *stats.ConnTagInfo) context.Context {
	if a, ok := info.RemoteAddr.(*connAddr); ok {
		return context.WithValue(context.WithValue(ctx, connKey{}, a.conn), wsConnKey{}, a.conn)
	}
	return ctx
}

func (connTracker) HandleConn(ctx context.Context, st stats.ConnStats) {
	if _, ok := st.(*stats.ConnEnd); !ok {
		return
	}
	if c, ok := ctx.Value(wsConnKey{}).(*agentConn); ok {
		c.markDone(errConnClosed)
	}
}

func (connTracker) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (connTracker) HandleRPC(context.Context, stats.RPCStats)                       {}

// connFrom returns the state of the connection a call came on.
func connFrom(ctx context.Context) (*agentConn, error) {
	c, ok := ctx.Value(connKey{}).(*agentConn)
	if !ok {
		return nil, status.Error(codes.Internal, "call on a connection the agent server did not accept")
	}
	return c, nil
}

// connListener hands the agent connections to grpc.Server.Serve.
type connListener struct {
	conns chan net.Conn

	mu     sync.Mutex // guards closed
	closed bool
	done   chan struct{} // closed by Close
}

func newConnListener() *connListener {
	return &connListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

// push hands nc to Accept; false means the listener is closed.
func (l *connListener) push(nc net.Conn) bool {
	select {
	case l.conns <- nc:
		return true
	case <-l.done:
		return false
	}
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case nc := <-l.conns:
		return nc, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *connListener) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.closed {
		l.closed = true
		close(l.done)
	}
	return nil
}

func (l *connListener) Addr() net.Addr { return listenerAddr{} }

type listenerAddr struct{}

func (listenerAddr) Network() string { return "websocket" }
func (listenerAddr) String() string  { return "agent websockets" }
