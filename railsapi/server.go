// Package railsapi serves the internal gRPC API that GitLab Rails calls on
// KAS (KAS's api.listen): the agent tracker, Git push notifications, server
// info and the listing of agent configuration files.
//
// The service, method and message definitions are our own .proto files in
// proto/, written from the GitLab wire contract (gitlab-wire section A);
// their Go code is generated into pb/ by hack/protoc/generate.sh. Rails
// authenticates every call with a JWT signed with the shared KAS secret
// (gitlab-wire A.7).
//
// The package imports no Caddy package: the Caddy module only listens and
// hands the listener to a [grpc.Server] built from [Server.ServerOptions].
package railsapi

import (
	"context"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"

	"github.com/caddy-kas/caddy-kas/gitaly"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/agenttrackerrpc"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/configprojectrpc"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/notificationsrpc"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/serverinforpc"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/redisregistry"
)

// Connections lists the live agent connections the agent tracker
// reports: this node's ([Local]) or those of every node sharing a registry
// ([Shared]).
type Connections interface {
	// ByAgentIDs returns the connections of the agents, ByProjectIDs
	// those of the agents whose configuration project is one of the
	// projects, All every connection.
	ByAgentIDs(ctx context.Context, ids []int64) ([]Connection, error)
	ByProjectIDs(ctx context.Context, ids []int64) ([]Connection, error)
	All(ctx context.Context) ([]Connection, error)
}

// Connection is one live tunnel connection of an agent.
type Connection struct {
	AgentID, ProjectID int64
	Meta               tunnel.AgentMeta
	ConnectedAt        time.Time
}

// Local lists the live tunnels of this node; a [*tunnel.Store] provides
// them.
type Local struct {
	Tunnels interface{ All() []tunnel.Tunnel }
}

var _ Connections = Local{}

// ByAgentIDs implements [Connections].
func (l Local) ByAgentIDs(_ context.Context, ids []int64) ([]Connection, error) {
	want := setOf(ids)
	return l.list(func(a tunnel.AgentInfo) bool { return want[a.ID] }), nil
}

// ByProjectIDs implements [Connections].
func (l Local) ByProjectIDs(_ context.Context, ids []int64) ([]Connection, error) {
	want := setOf(ids)
	return l.list(func(a tunnel.AgentInfo) bool { return want[a.ProjectID] }), nil
}

// setOf makes ids a set: a request may name up to maxIDs of them, checked
// against every tunnel of the node.
func setOf(ids []int64) map[int64]bool {
	set := make(map[int64]bool, len(ids))
	for _, id := range ids {
		set[id] = true
	}
	return set
}

// All implements [Connections].
func (l Local) All(context.Context) ([]Connection, error) {
	return l.list(func(tunnel.AgentInfo) bool { return true }), nil
}

func (l Local) list(match func(tunnel.AgentInfo) bool) []Connection {
	if l.Tunnels == nil {
		return nil
	}
	var out []Connection
	for _, t := range l.Tunnels.All() {
		if t.Err() != nil { // closing; the store drops it shortly
			continue
		}
		a := t.Agent()
		if match(a) {
			out = append(out, Connection{AgentID: a.ID, ProjectID: a.ProjectID, Meta: a.Meta, ConnectedAt: t.ConnectedAt()})
		}
	}
	return out
}

// Shared lists the connections of every node, from the registry they
// share.
type Shared struct {
	Registry *redisregistry.Registry
}

var _ Connections = Shared{}

// ByAgentIDs implements [Connections].
func (s Shared) ByAgentIDs(ctx context.Context, ids []int64) ([]Connection, error) {
	return shared(s.Registry.ConnectionsByAgentIDs(ctx, ids))
}

// ByProjectIDs implements [Connections].
func (s Shared) ByProjectIDs(ctx context.Context, ids []int64) ([]Connection, error) {
	return shared(s.Registry.ConnectionsByProjectIDs(ctx, ids))
}

// All implements [Connections].
func (s Shared) All(ctx context.Context) ([]Connection, error) {
	return shared(s.Registry.AllConnections(ctx))
}

func shared(list []redisregistry.Connection, err error) ([]Connection, error) {
	if err != nil {
		return nil, err
	}
	out := make([]Connection, 0, len(list))
	for _, c := range list {
		out = append(out, Connection{AgentID: c.AgentID, ProjectID: c.ProjectID, Meta: c.Meta, ConnectedAt: c.ConnectedAt})
	}
	return out, nil
}

// Limits of the server, see [Server.ServerOptions].
const (
	// maxRecvMsgSize bounds a request message. Rails' largest request is
	// ListAgentConfigFiles with its Gitaly feature flags, a few KiB; a
	// thousand agent ids are 10 KiB.
	maxRecvMsgSize = 1 << 20
	// maxConcurrentStreams bounds the calls in flight on one connection.
	// Every call is a short unary one, and each Rails process (Puma worker
	// or Sidekiq) has its own connection.
	maxConcurrentStreams = 1000
	// keepaliveMinTime is how often a client may ping. Rails' gRPC client
	// does not enable keepalive by default; if it is turned on, anything at
	// or above this interval is accepted, and idle connections may ping,
	// so that an otherwise idle Rails connection is never closed for
	// "too many pings".
	keepaliveMinTime = 10 * time.Second
	// keepaliveTime and keepaliveTimeout make the server ping an idle
	// client to find dead connections (a Rails node gone without a FIN).
	keepaliveTime    = 1 * time.Minute
	keepaliveTimeout = 20 * time.Second
	// maxIDs bounds the agent or project ids of one agent tracker request.
	// Rails asks for the agents shown on one page.
	maxIDs = 1000
)

// Server implements the internal API for GitLab Rails. Set its fields
// before calling [Server.Register]; they must not change afterwards.
type Server struct {
	// Secret is the shared KAS secret (the decoded 32 bytes) that Rails
	// signs its JWTs with.
	Secret []byte
	// Connections are the live tunnels the agent tracker reports. Nil
	// means no agent is connected.
	Connections Connections
	// Version is our version, for example "v0.1.0"; Rails shows it and
	// compares agentk versions with it (gitlab-wire A.6).
	Version string
	// GitRef is the commit we were built from.
	GitRef string
	// OnGitPush, if set, is called for every Git push Rails reports: to
	// poll the configuration of the agents of that project at once, and
	// for usage metrics. It must return quickly: Rails waits for the
	// answer.
	OnGitPush func(projectID int64, fullPath string)
	// Gitaly reads the repositories ListAgentConfigFiles lists. Nil
	// answers ListAgentConfigFiles with Unavailable.
	Gitaly *gitaly.Pool
	// Logger receives the logs; nil means no logs.
	Logger *zap.Logger
}

func (s *Server) logger() *zap.Logger {
	if s.Logger == nil {
		return zap.NewNop()
	}
	return s.Logger
}

// Register registers every service of the internal API on g: the agent
// tracker under all of its method names, notifications, server info and
// configuration project (gitlab-wire A.1). g should have been created with
// [Server.ServerOptions], which authenticate the calls.
func (s *Server) Register(g *grpc.Server) {
	agenttrackerrpc.RegisterAgentTrackerServer(g, &agentTracker{s: s})
	notificationsrpc.RegisterNotificationsServer(g, &notifications{s: s})
	serverinforpc.RegisterServerInfoServer(g, &serverInfo{s: s})
	configprojectrpc.RegisterConfigurationProjectServer(g, &configProject{s: s})
}

// ServerOptions returns the options a [grpc.Server] for the internal API
// needs: the JWT authentication of every call, unary and streaming
// (gitlab-wire A.7), a bound on request size and on concurrent calls per
// connection, and a keepalive policy that lets Rails ping as its client
// may while finding dead connections.
func (s *Server) ServerOptions() []grpc.ServerOption {
	a := &authenticator{secret: s.Secret, log: s.logger()}
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(a.unary),
		grpc.ChainStreamInterceptor(a.stream),
		grpc.MaxRecvMsgSize(maxRecvMsgSize),
		grpc.MaxConcurrentStreams(maxConcurrentStreams),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             keepaliveMinTime,
			PermitWithoutStream: true,
		}),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time:    keepaliveTime,
			Timeout: keepaliveTimeout,
		}),
	}
}
