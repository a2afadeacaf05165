package grpctunnel

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentconfigurationrpc"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentregistrarrpc"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/reversetunnelrpc"
)

// Names of the one service and method of agentk's that KAS calls through
// a tunnel (gitlab-wire §B.7).
const (
	kubernetesAPIService = "gitlab.agent.kubernetes_api.rpc.KubernetesApi"
	makeRequestMethod    = "MakeRequest"
	makeRequestPath      = "/" + kubernetesAPIService + "/" + makeRequestMethod
)

// services implements the gRPC services agentk calls.
type services struct {
	reversetunnelrpc.UnimplementedReverseTunnelServer
	agentregistrarrpc.UnimplementedAgentRegistrarServer
	agentconfigurationrpc.UnimplementedAgentConfigurationServer
	srv *Server
}

// authorize authenticates the call's agent token, has the admission count
// the call, and returns the connection.
func (s *services) authorize(ctx context.Context) (*agentConn, error) {
	c, err := connFrom(ctx)
	if err != nil {
		return nil, err
	}
	token, err := bearerToken(ctx)
	if err != nil {
		return nil, err
	}
	if err := c.authorize(ctx, token); err != nil {
		return nil, err
	}
	if err := c.admission.CountCall(ctx, token); err != nil {
		return nil, err
	}
	return c, nil
}

// bearerToken reads the agent token of a call: the one "authorization"
// metadata value, "Bearer <token>" (gitlab-wire §B.1).
func bearerToken(ctx context.Context) (string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	values := md.Get("authorization")
	if len(values) != 1 {
		return "", status.Error(codes.Unauthenticated, "want exactly one authorization metadata value")
	}
	const prefix = "bearer "
	v := values[0]
	if len(v) <= len(prefix) || !strings.EqualFold(v[:len(prefix)], prefix) {
		return "", status.Error(codes.Unauthenticated, "authorization is not a bearer token")
	}
	return v[len(prefix):], nil
}

// Connect offers one idle stream for one proxied request (gitlab-wire
// §B.3–B.4). It returns once the request is done or the agent gives the
// stream up.
func (s *services) Connect(stream grpc.BidiStreamingServer[reversetunnelrpc.ConnectRequest, reversetunnelrpc.ConnectResponse]) error {
	c, err := s.authorize(stream.Context())
	if err != nil {
		return err
	}
	// gRPC answers in the compression the client used, gzip for agentk.
	// What KAS sends on a tunnel stream is the client's request, bodies
	// included: compressing it costs CPU on every request, and compressing
	// what a client chose next to what KAS adds is what compression side
	// channels feed on. Our own tunnel does not compress either.
	_ = grpc.SetSendCompressor(stream.Context(), encoding.Identity)
	first, err := stream.Recv()
	if err != nil {
		return err // the agent gave up before describing itself
	}
	d := first.GetDescriptor_()
	if d == nil {
		return status.Error(codes.InvalidArgument, "the first message of a tunnel must be its descriptor")
	}
	if !servesMakeRequest(d.GetAgentDescriptor()) {
		// A tunnel for something this server never asks for: keep it,
		// unused, until agentk closes it.
		<-stream.Context().Done()
		return status.FromContextError(stream.Context().Err()).Err()
	}
	is := newIdleStream(stream)
	if !c.addIdle(is) {
		return status.Error(codes.Unavailable, "connection closing")
	}
	select {
	case <-is.claimed:
		return <-is.finished
	case <-stream.Context().Done():
		if c.removeIdle(is) {
			return status.FromContextError(stream.Context().Err()).Err()
		}
		// Claimed at the same moment: the request owns the stream now.
		return <-is.finished
	case <-s.srv.draining:
		// The node stops and sent GOAWAY: a clean end makes agentk open
		// the stream again, on its new connection, as GitLab's KAS ends
		// its long polls before its connections reach their age.
		if c.removeIdle(is) {
			return nil
		}
		return <-is.finished
	}
}

// Register records what agentk says of itself, for the agent tracker
// (gitlab-wire §B.6).
func (s *services) Register(ctx context.Context, req *agentregistrarrpc.RegisterRequest) (*agentregistrarrpc.RegisterResponse, error) {
	c, err := s.authorize(ctx)
	if err != nil {
		return nil, err
	}
	m := req.GetAgentMeta()
	meta := tunnel.AgentMeta{
		Version:            m.GetVersion(),
		CommitID:           m.GetCommitId(),
		PodNamespace:       m.GetPodNamespace(),
		PodName:            m.GetPodName(),
		PodID:              req.GetPodId(),
		KubernetesVersion:  m.GetKubernetesVersion().GetGitVersion(),
		KubernetesPlatform: m.GetKubernetesVersion().GetPlatform(),
	}
	if err := meta.Validate(); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	c.setMeta(meta)
	return &agentregistrarrpc.RegisterResponse{}, nil
}

// GetConfiguration streams the agent's configuration (gitlab-wire §B.5):
// the current one, unless agentk says it has that commit already, then
// each new one, until the stream or the connection ends. While none is
// known (standalone mode, or not read yet) the stream stays silent, which
// agentk tolerates, leaving the modules that need it idle.
func (s *services) GetConfiguration(req *agentconfigurationrpc.ConfigurationRequest, stream grpc.ServerStreamingServer[agentconfigurationrpc.ConfigurationResponse]) error {
	c, err := s.authorize(stream.Context())
	if err != nil {
		return err
	}
	// A configuration is a few hundred bytes, sent once per commit:
	// compressing it is not worth the CPU.
	_ = grpc.SetSendCompressor(stream.Context(), encoding.Identity)
	id := c.Agent().ID
	sent := req.GetCommitId()
	for {
		resp, changed := c.admission.Configuration(id)
		if resp != nil && resp.GetCommitId() != sent {
			if err := stream.Send(resp); err != nil {
				return err
			}
			sent = resp.GetCommitId()
		}
		select {
		case <-stream.Context().Done():
			return status.FromContextError(stream.Context().Err()).Err()
		case <-c.Done():
			return status.Error(codes.Unavailable, "connection closing")
		case <-s.srv.draining:
			return nil // agentk asks again, on its new connection
		case <-changed:
		}
	}
}

// digestEqual compares token digests in constant time.
func digestEqual(a, b [sha256.Size]byte) bool {
	return subtle.ConstantTimeCompare(a[:], b[:]) == 1
}
