package agentserver

import (
	"context"
	"crypto/sha256"
	"errors"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/caddy-kas/caddy-kas/railsapi/pb/entity"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentregistrarrpc"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/reversetunnelinfo"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/reversetunnelrpc"
	"github.com/caddy-kas/caddy-kas/tunnel/wsconn"
)

// dialGRPC connects like GitLab's agentk: a WebSocket with subprotocol
// ws-tunnel to the endpoint, gRPC inside.
func dialGRPC(t *testing.T, client *http.Client) *grpc.ClientConn {
	t.Helper()
	var once sync.Once
	cc, err := grpc.NewClient("passthrough:///kas",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			err := errors.New("the test agent dials once")
			var nc net.Conn
			once.Do(func() {
				nc, _, err = wsconn.Dial(ctx, endpointURL, wsconn.DialOptions{HTTPClient: client, Subprotocol: grpctunnel.Subprotocol})
			})
			return nc, err
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func register(cc *grpc.ClientConn, token string) error {
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+token)
	_, err := agentregistrarrpc.NewAgentRegistrarClient(cc).Register(ctx, &agentregistrarrpc.RegisterRequest{
		AgentMeta: &entity.AgentMeta{Version: "v16.5.0", PodNamespace: "gitlab-agent", PodName: "agentk-0"}, PodId: 42})
	return err
}

// offerTunnel opens one idle ReverseTunnel/Connect stream, as agentk keeps
// a few, and returns once the server has taken it (the stream stays open
// until the test ends).
func offerTunnel(t *testing.T, cc *grpc.ClientConn, token string) {
	t.Helper()
	ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+token))
	t.Cleanup(cancel)
	s, err := reversetunnelrpc.NewReverseTunnelClient(cc).Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&reversetunnelrpc.ConnectRequest{Msg: &reversetunnelrpc.ConnectRequest_Descriptor_{Descriptor_: &reversetunnelrpc.Descriptor{
		AgentDescriptor: &reversetunnelinfo.AgentDescriptor{Services: []*reversetunnelinfo.Service{{
			Name: "gitlab.agent.kubernetes_api.rpc.KubernetesApi", Methods: []*reversetunnelinfo.Method{{Name: "MakeRequest"}}}}},
	}}}); err != nil {
		t.Fatal(err)
	}
}

// TestEndpointGitLabAgentk: GitLab's agentk is served on ws-tunnel, its
// token checked per call with the endpoint's authenticator, its
// connection admitted into the store as a tunnel of its agent.
func TestEndpointGitLabAgentk(t *testing.T) {
	auth, err := NewStaticAgents([]StaticAgent{{ID: 1, Name: "one", Token: goodToken}})
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	store := tunnel.NewStore()
	srv := grpctunnel.NewServer()
	client := servePipe(t, &Endpoint{Auth: auth, Store: store, GRPC: srv, Logger: zap.New(core)})
	t.Cleanup(func() {
		store.Close()
		srv.Close()
	})

	cc := dialGRPC(t, client)
	if err := register(cc, wrongToken); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("Register with a wrong token = %v, want Unauthenticated", err)
	}
	if n := logs.FilterMessage("agent refused").FilterField(zap.String("protocol", "ws-tunnel")).Len(); n != 1 {
		t.Errorf("%d 'agent refused' lines for ws-tunnel, want 1", n)
	}
	if err := register(cc, goodToken); err != nil {
		t.Fatal(err)
	}
	if n := len(store.Tunnels(1, nil)); n != 0 {
		t.Fatalf("%d tunnels before agentk offered a tunnel stream, want 0", n)
	}
	offerTunnel(t, cc, goodToken)
	findCtx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := tunnel.NewRouter(store).Find(findCtx, 1); err != nil {
		t.Fatal(err)
	}
	tunnels := store.Tunnels(1, nil)
	if len(tunnels) != 1 {
		t.Fatalf("%d tunnels of agent 1 in the store, want 1", len(tunnels))
	}
	info := tunnels[0].Agent()
	if info.Name != "one" || info.Credential != sha256.Sum256([]byte(goodToken)) || info.Meta.PodID != 42 || info.Meta.PodName != "agentk-0" {
		t.Errorf("agent info %+v", info)
	}
	if n := logs.FilterMessage("agent connected").FilterField(zap.String("protocol", "ws-tunnel")).Len(); n != 1 {
		t.Errorf("%d 'agent connected' lines, want 1", n)
	}
}

// TestEndpointWithoutGRPCRefusesWSTunnel: an endpoint without a gRPC
// server refuses GitLab's agentk with the unsupported-protocol answer.
func TestEndpointWithoutGRPCRefusesWSTunnel(t *testing.T) {
	e := newEnv(t, nil)
	_, resp, err := wsconn.Dial(context.Background(), endpointURL, wsconn.DialOptions{HTTPClient: e.client, Subprotocol: grpctunnel.Subprotocol})
	if err == nil || resp == nil || resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("dial = %v, %v; want 400", resp, err)
	}
	if n := len(e.logged("agent refused")); n != 1 {
		t.Errorf("%d 'agent refused' lines, want 1", n)
	}
}
