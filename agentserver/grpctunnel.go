package agentserver

import (
	"context"
	"crypto/sha256"
	"errors"
	"net/http"
	"strconv"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/caddy-kas/caddy-kas/agentconfig"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentconfigurationrpc"
	"github.com/caddy-kas/caddy-kas/tunnel/wsconn"
)

// serveGRPCTunnel serves the handshake of GitLab's agentk (package
// grpctunnel): the WebSocket carries gRPC, and its handshake no token, so
// the connection is handed to the gRPC server at once and each call
// authenticates itself (gitlab-wire §B.1). The connection's tunnel is
// admitted with the first call whose token is valid.
func (e *Endpoint) serveGRPCTunnel(hs *handshake) {
	nc, err := wsconn.Accept(hs.w, hs.r, grpctunnel.Subprotocol)
	if err != nil {
		hs.log.Warn("agent handshake failed", zap.Error(err))
		return
	}
	e.GRPC.Serve(nc, hs.r.RemoteAddr, &grpcAdmission{e: e, remoteAddr: hs.r.RemoteAddr, protocol: grpctunnel.Subprotocol})
}

// ServeGRPC serves a gRPC call of GitLab's agentk made on the site's own
// HTTP/2 connection (an agentk configured with grpc:// or grpcs://, see
// [grpctunnel.IsGRPC]). Without a gRPC server it answers Unimplemented, in
// gRPC's own terms, so agentk logs why.
func (e *Endpoint) ServeGRPC(w http.ResponseWriter, r *http.Request) {
	if e.GRPC == nil {
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Grpc-Status", strconv.Itoa(int(codes.Unimplemented)))
		w.Header().Set("Grpc-Message", "gRPC agents are not served here")
		w.WriteHeader(http.StatusOK)
		return
	}
	e.GRPC.ServeHTTP(w, r, &grpcAdmission{e: e, remoteAddr: r.RemoteAddr, protocol: "grpc"})
}

// grpcAdmission decides about the agent on one of GitLab's agentk
// connections with the endpoint's authenticator, as for our own agentk.
type grpcAdmission struct {
	e          *Endpoint
	remoteAddr string
	// protocol names how the agent connected, for logs: "ws-tunnel", or
	// "grpc" for calls on the site's own HTTP/2 connection.
	protocol string
}

// Authenticate implements [grpctunnel.Admission].
func (a *grpcAdmission) Authenticate(ctx context.Context, token string) (tunnel.AgentInfo, error) {
	log := a.e.logger().With(zap.String("remote_addr", a.remoteAddr), zap.String("protocol", a.protocol))
	agent, err := a.e.Auth.AuthenticateAgent(ctx, token)
	var limited *RateLimitedError
	switch {
	case errors.Is(err, ErrUnknownToken):
		a.e.logRefusalOf(log, "unknown agent token", a.protocol)
		if a.e.Observer != nil {
			a.e.Observer.AgentRefused("unknown agent token")
		}
		return tunnel.AgentInfo{}, status.Error(codes.Unauthenticated, "unauthenticated")
	case errors.As(err, &limited):
		a.e.logRefusalOf(log, "authentication rate limited", a.protocol,
			zap.Duration("retry_after", limited.RetryAfter), zap.Error(limited.Err))
		if a.e.Observer != nil {
			a.e.Observer.AgentRefused("authentication rate limited")
		}
		// Unavailable, as GitLab's KAS answers when agent_info fails for
		// anything but a refused token: the check could not be made, and
		// not because of this agent (other clients spent the budget of
		// calls to GitLab), which ResourceExhausted, the answer of the
		// per-token connection limit, would suggest. gRPC defines
		// Unavailable as transient, to be retried with backoff, and
		// GitLab's agentk does back off: each of its loops (the reverse
		// tunnel's Connect streams, Register, GetConfiguration) waits
		// before it retries a failed call, whatever the code; the tunnel
		// 1 s, growing by 1.6 up to 20 s, with jitter.
		return tunnel.AgentInfo{}, status.Error(codes.Unavailable, "cannot authenticate the agent now (rate limited); retry later")
	case err != nil:
		a.e.logFailure(log, "cannot authenticate agent now", err)
		if a.e.Observer != nil {
			a.e.Observer.AgentRefused("authentication unavailable")
		}
		return tunnel.AgentInfo{}, status.Error(codes.Unavailable, "cannot authenticate the agent now; retry later")
	}
	return tunnel.AgentInfo{ID: agent.ID, Name: agent.Name, ProjectID: agent.ProjectID,
		RemoteAddr: a.remoteAddr, Credential: sha256.Sum256([]byte(token))}, nil
}

// CountCall implements [grpctunnel.Admission]: every call counts against
// the endpoint's connections per token, as in GitLab's KAS.
func (a *grpcAdmission) CountCall(ctx context.Context, token string) error {
	err := a.e.countConnection(ctx, token)
	if err == nil {
		return nil
	}
	log := a.e.logger().With(zap.String("remote_addr", a.remoteAddr), zap.String("protocol", a.protocol))
	var limited *RateLimitedError
	if errors.As(err, &limited) {
		a.e.logRefusalOf(log, "connection rate limit", a.protocol, zap.Duration("retry_after", limited.RetryAfter))
		if a.e.Observer != nil {
			a.e.Observer.AgentRefused("connection rate limit")
		}
		// GitLab's KAS's answer to a token over the limit, word for
		// word. agentk backs off as after any failed call (see
		// Authenticate).
		return status.Error(codes.ResourceExhausted, "new connection rate limit exhausted for this agent, try again later")
	}
	a.e.logFailure(log, "cannot count the agent's connections now", err)
	if a.e.Observer != nil {
		a.e.Observer.AgentRefused("connection count unavailable")
	}
	return status.Error(codes.Unavailable, "cannot admit the agent now; retry later")
}

// Admit implements [grpctunnel.Admission].
func (a *grpcAdmission) Admit(t tunnel.Tunnel, token string) {
	info := t.Agent()
	a.e.admit(t, token, a.e.logger().With(zap.String("remote_addr", a.remoteAddr),
		zap.Int64("agent_id", info.ID), zap.String("agent_name", info.Name), zap.String("protocol", a.protocol)))
}

// Configuration implements [grpctunnel.Admission] with the endpoint's
// configuration watcher.
func (a *grpcAdmission) Configuration(agentID int64) (*agentconfigurationrpc.ConfigurationResponse, <-chan struct{}) {
	if a.e.Configs == nil {
		return nil, nil
	}
	cfg, changed := a.e.Configs.Configuration(agentID)
	if cfg == nil {
		return nil, changed
	}
	return &agentconfigurationrpc.ConfigurationResponse{
		Configuration: agentconfig.ToAgentConfiguration(cfg.File, cfg.AgentID, cfg.ProjectID, cfg.ProjectPath, a.e.GitLabExternalURL),
		CommitId:      cfg.CommitID,
	}, changed
}
