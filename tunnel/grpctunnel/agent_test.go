package grpctunnel_test

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/caddy-kas/caddy-kas/railsapi/pb/entity"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentconfigurationrpc"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentregistrarrpc"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/grpctool"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/kubernetesapirpc"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/prototool"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/reversetunnelinfo"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/reversetunnelrpc"
)

// The test harness: a stand-in for GitLab's agentk that speaks the same
// RPCs in the same order (gitlab-wire §B), over an in-memory connection
// served by a real grpctunnel.Server. It serves each tunnelled
// MakeRequest with an http.Handler, the way GitLab's agentk forwards it to
// the kube-apiserver, and turns the impersonation config into
// Impersonate-* headers as agentk does.

// admission is a grpctunnel.Admission with one agent token.
type admission struct {
	token string
	agent tunnel.AgentInfo

	mu       sync.Mutex // guards the fields below
	admitted []tunnel.Tunnel
	checks   int
	calls    int // counted by CountCall
	// callLimit, if positive, is how many calls CountCall lets through.
	callLimit int
	ready     chan tunnel.Tunnel // receives every admitted tunnel
	config    *agentconfigurationrpc.ConfigurationResponse
	changed   chan struct{} // closed by setConfig
}

// setConfig makes cfg the agent's configuration.
func (a *admission) setConfig(cfg *agentconfigurationrpc.ConfigurationResponse) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.config = cfg
	close(a.changed)
	a.changed = make(chan struct{})
}

func (a *admission) Configuration(agentID int64) (*agentconfigurationrpc.ConfigurationResponse, <-chan struct{}) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if agentID != a.agent.ID {
		panic(fmt.Sprintf("configuration of agent %d asked for on a connection of agent %d", agentID, a.agent.ID))
	}
	return a.config, a.changed
}

func newAdmission(token string, agentID int64) *admission {
	return &admission{token: token, agent: tunnel.AgentInfo{ID: agentID, Name: "agent"}, ready: make(chan tunnel.Tunnel, 4), changed: make(chan struct{})}
}

func (a *admission) Authenticate(_ context.Context, token string) (tunnel.AgentInfo, error) {
	a.mu.Lock()
	a.checks++
	a.mu.Unlock()
	if token != a.token {
		return tunnel.AgentInfo{}, status.Error(codes.Unauthenticated, "unknown agent token")
	}
	return a.agent, nil
}

func (a *admission) CountCall(context.Context, string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.callLimit > 0 && a.calls >= a.callLimit {
		return status.Error(codes.ResourceExhausted, "call limit reached")
	}
	a.calls++
	return nil
}

func (a *admission) Admit(t tunnel.Tunnel, token string) {
	a.mu.Lock()
	a.admitted = append(a.admitted, t)
	a.mu.Unlock()
	a.ready <- t
}

func (a *admission) numChecks() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.checks
}

// fakeAgent is GitLab's agentk in miniature.
type fakeAgent struct {
	t       testing.TB
	conn    *grpc.ClientConn
	token   string
	handler http.Handler
	// echoUpgrades answers an upgrade request with 101 and echoes the
	// client's bytes, prefixed with "echo: ", until the client half-closes.
	echoUpgrades bool
}

// connect serves a new agent connection with srv and returns the agent
// side as a gRPC client, as agentk dials KAS through its WebSocket.
func connect(t testing.TB, srv *grpctunnel.Server, adm grpctunnel.Admission) *grpc.ClientConn {
	t.Helper()
	serverEnd, clientEnd := net.Pipe()
	srv.Serve(serverEnd, "192.0.2.7:40000", adm)
	var once sync.Once
	cc, err := grpc.NewClient("passthrough:///kas",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// As GitLab's agentk: every call gzip-compressed (gitlab-wire §B.1).
		grpc.WithDefaultCallOptions(grpc.UseCompressor(gzip.Name)),
		grpc.WithStatsHandler(compressionCheck{t}),
		grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) {
			var nc net.Conn
			once.Do(func() { nc = clientEnd })
			if nc == nil {
				return nil, errors.New("the test agent dials once")
			}
			return nc, nil
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func (a *fakeAgent) ctx(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+a.token)
}

// register calls AgentRegistrar/Register as agentk does at start.
func (a *fakeAgent) register(ctx context.Context, podID int64) error {
	_, err := agentregistrarrpc.NewAgentRegistrarClient(a.conn).Register(a.ctx(ctx), &agentregistrarrpc.RegisterRequest{
		AgentMeta: &entity.AgentMeta{Version: "v16.5.0", CommitId: "abc", PodNamespace: "gitlab-agent", PodName: "agentk-0",
			KubernetesVersion: &entity.KubernetesVersion{GitVersion: "v1.32.13", Platform: "linux/amd64"}},
		PodId: podID,
	})
	return err
}

// serveTunnels keeps n Connect streams open, opening a new one whenever
// one is used, until ctx ends; it returns the first error of a stream that
// could not be opened.
func (a *fakeAgent) serveTunnels(ctx context.Context, n int) error {
	errs := make(chan error, n)
	for range n {
		go func() {
			for ctx.Err() == nil {
				if err := a.serveOne(ctx); err != nil && ctx.Err() == nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	var first error
	for range n {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

var descriptor = &reversetunnelinfo.AgentDescriptor{Services: []*reversetunnelinfo.Service{{
	Name:    "gitlab.agent.kubernetes_api.rpc.KubernetesApi",
	Methods: []*reversetunnelinfo.Method{{Name: "MakeRequest"}},
}}}

// serveOne opens one Connect stream and serves the one request KAS sends
// on it.
func (a *fakeAgent) serveOne(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := reversetunnelrpc.NewReverseTunnelClient(a.conn).Connect(a.ctx(ctx))
	if err != nil {
		return err
	}
	if err := s.Send(&reversetunnelrpc.ConnectRequest{Msg: &reversetunnelrpc.ConnectRequest_Descriptor_{
		Descriptor_: &reversetunnelrpc.Descriptor{AgentDescriptor: descriptor}}}); err != nil {
		return err
	}
	first, err := s.Recv()
	if err != nil {
		return err
	}
	if got := first.GetRequestInfo().GetMethodName(); got != "/gitlab.agent.kubernetes_api.rpc.KubernetesApi/MakeRequest" {
		return fmt.Errorf("request info names %q", got)
	}
	// How one request ends is the request's business, not the agent's:
	// KAS cancels calls whose client went away, as agentk sees too.
	_ = a.serveRequest(s)
	return nil
}

type agentStream = grpc.BidiStreamingClient[reversetunnelrpc.ConnectRequest, reversetunnelrpc.ConnectResponse]

// recvHTTP reads the next HttpRequest message; io.EOF after close_send.
func recvHTTP(s agentStream) (*grpctool.HttpRequest, error) {
	f, err := s.Recv()
	if err != nil {
		return nil, err
	}
	switch m := f.GetMsg().(type) {
	case *reversetunnelrpc.ConnectResponse_Message:
		var r grpctool.HttpRequest
		if err := proto.Unmarshal(m.Message.GetData(), &r); err != nil {
			return nil, err
		}
		return &r, nil
	case *reversetunnelrpc.ConnectResponse_CloseSend:
		return nil, io.EOF
	default:
		return nil, fmt.Errorf("unexpected %T", m)
	}
}

func sendHTTP(s agentStream, m *grpctool.HttpResponse) error {
	data, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	return s.Send(&reversetunnelrpc.ConnectRequest{Msg: &reversetunnelrpc.ConnectRequest_Message{Message: &reversetunnelrpc.Message{Data: data}}})
}

func (a *fakeAgent) serveRequest(s agentStream) error {
	first, err := recvHTTP(s)
	if err != nil {
		return err
	}
	h := first.GetHeader()
	if h == nil {
		return errors.New("the first message is not a header")
	}
	hr := h.GetRequest()
	u := &url.URL{Scheme: "https", Host: "apiserver", Path: hr.GetUrlPath(), RawQuery: fromValues(hr.GetQuery()).Encode()}
	bodyR, bodyW := io.Pipe()
	req, err := http.NewRequestWithContext(s.Context(), hr.GetMethod(), u.String(), bodyR)
	if err != nil {
		return err
	}
	req.Header = http.Header(fromValues(hr.GetHeader()))
	req.ContentLength = h.GetContentLength()
	if h.GetExtra() != nil {
		var extra kubernetesapirpc.HeaderExtra
		if err := h.GetExtra().UnmarshalTo(&extra); err != nil {
			return fmt.Errorf("extra: %w", err)
		}
		ic := extra.GetImpConfig()
		req.Header.Set("Impersonate-User", ic.GetUsername())
		for _, g := range ic.GetGroups() {
			req.Header.Add("Impersonate-Group", g)
		}
		for _, kv := range ic.GetExtra() {
			for _, v := range kv.GetVal() {
				req.Header.Add("Impersonate-Extra-"+kv.GetKey(), v)
			}
		}
	}
	upgrade := a.echoUpgrades && strings.EqualFold(req.Header.Get("Connection"), "upgrade")
	// The request body, then (for an upgrade) the client's bytes, until
	// KAS ends the call; this goroutine is the stream's only reader.
	recvDone := make(chan struct{})
	go func() {
		defer close(recvDone)
		for {
			m, err := recvHTTP(s)
			if err != nil {
				bodyW.CloseWithError(err)
				if err == io.EOF { // close_send: wait for the end of the call
					for {
						if _, err := s.Recv(); err != nil {
							return
						}
					}
				}
				return
			}
			switch msg := m.GetMessage().(type) {
			case *grpctool.HttpRequest_Data_:
				bodyW.Write(msg.Data.GetData())
			case *grpctool.HttpRequest_Trailer_:
				if !upgrade {
					bodyW.Close()
				}
			case *grpctool.HttpRequest_UpgradeData_:
				bodyW.Write(msg.UpgradeData.GetData())
			}
		}
	}()
	if upgrade {
		return a.echo(s, req, recvDone)
	}
	w := &streamWriter{s: s, header: http.Header{}}
	a.handler.ServeHTTP(w, req)
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if w.err != nil {
		return w.err
	}
	if err := sendHTTP(s, &grpctool.HttpResponse{Message: &grpctool.HttpResponse_Trailer_{Trailer: &grpctool.HttpResponse_Trailer{}}}); err != nil {
		return err
	}
	return finishCall(s, recvDone)
}

// finishCall ends the agent's side of a call as agentk does: the gRPC
// trailer, the end of its stream, then waiting until KAS ends the call
// (a client that cancelled at once could lose what it sent last).
func finishCall(s agentStream, recvDone <-chan struct{}) error {
	if err := s.Send(&reversetunnelrpc.ConnectRequest{Msg: &reversetunnelrpc.ConnectRequest_Trailer{Trailer: &reversetunnelrpc.Trailer{}}}); err != nil {
		return err
	}
	if err := s.CloseSend(); err != nil {
		return err
	}
	<-recvDone
	return nil
}

// echo answers an upgrade with 101 and echoes the client's bytes.
func (a *fakeAgent) echo(s agentStream, req *http.Request, recvDone <-chan struct{}) error {
	if err := sendHTTP(s, &grpctool.HttpResponse{Message: &grpctool.HttpResponse_Header_{Header: &grpctool.HttpResponse_Header{
		Response: &prototool.HttpResponse{StatusCode: 101, Status: "101 Switching Protocols", Header: map[string]*prototool.Values{
			"Connection": {Value: []string{"Upgrade"}}, "Upgrade": {Value: []string{"echo"}}, "X-Stream-Protocol-Version": {Value: []string{"v4.channel.k8s.io"}},
		}},
	}}}); err != nil {
		return err
	}
	if err := sendHTTP(s, &grpctool.HttpResponse{Message: &grpctool.HttpResponse_Trailer_{Trailer: &grpctool.HttpResponse_Trailer{}}}); err != nil {
		return err
	}
	buf := make([]byte, 1024)
	for {
		n, err := req.Body.Read(buf)
		if n > 0 {
			out := append([]byte("echo: "), buf[:n]...)
			if err := sendHTTP(s, &grpctool.HttpResponse{Message: &grpctool.HttpResponse_UpgradeData_{UpgradeData: &grpctool.HttpResponse_UpgradeData{Data: out}}}); err != nil {
				return err
			}
		}
		if err != nil {
			break
		}
	}
	return finishCall(s, recvDone)
}

func fromValues(m map[string]*prototool.Values) url.Values {
	out := url.Values{}
	for k, v := range m {
		out[k] = v.GetValue()
	}
	return out
}

// streamWriter is the http.ResponseWriter of the fake agent: the header on
// the first write or flush, every write one data message.
type streamWriter struct {
	s           agentStream
	header      http.Header
	wroteHeader bool
	err         error
}

func (w *streamWriter) Header() http.Header { return w.header }

func (w *streamWriter) WriteHeader(code int) {
	if w.wroteHeader {
		return
	}
	w.wroteHeader = true
	hv := map[string]*prototool.Values{}
	for k, v := range w.header {
		hv[k] = &prototool.Values{Value: v}
	}
	w.err = sendHTTP(w.s, &grpctool.HttpResponse{Message: &grpctool.HttpResponse_Header_{Header: &grpctool.HttpResponse_Header{
		Response: &prototool.HttpResponse{StatusCode: int32(code), Status: fmt.Sprintf("%d %s", code, http.StatusText(code)), Header: hv},
	}}})
}

func (w *streamWriter) Write(p []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	if w.err != nil {
		return 0, w.err
	}
	if w.err = sendHTTP(w.s, &grpctool.HttpResponse{Message: &grpctool.HttpResponse_Data_{Data: &grpctool.HttpResponse_Data{Data: append([]byte(nil), p...)}}}); w.err != nil {
		return 0, w.err
	}
	return len(p), nil
}

func (w *streamWriter) Flush() { w.WriteHeader(http.StatusOK) }

var _ http.Flusher = (*streamWriter)(nil)

// digest is the credential a tunnel must remember.
func digest(token string) [sha256.Size]byte { return sha256.Sum256([]byte(token)) }

// connectHTTP2 serves agent calls with srv on an HTTPS server's own
// HTTP/2 connections, as for an agentk configured with grpcs://, and
// returns the agent side.
func connectHTTP2(t testing.TB, srv *grpctunnel.Server, adm grpctunnel.Admission) *grpc.ClientConn {
	t.Helper()
	site := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !grpctunnel.IsGRPC(r) {
			http.NotFound(w, r)
			return
		}
		srv.ServeHTTP(w, r, adm)
	}))
	site.EnableHTTP2 = true
	site.StartTLS()
	t.Cleanup(site.Close)
	cc, err := grpc.NewClient("passthrough:///"+site.Listener.Addr().String(),
		grpc.WithDefaultCallOptions(grpc.UseCompressor(gzip.Name)),
		grpc.WithStatsHandler(compressionCheck{t}),
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// compressionCheck fails the test when KAS sends the agent a compressed
// message: KAS answers tunnel streams uncompressed whatever agentk uses.
type compressionCheck struct{ t testing.TB }

func (compressionCheck) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (compressionCheck) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}
func (compressionCheck) HandleConn(context.Context, stats.ConnStats) {}

func (c compressionCheck) HandleRPC(_ context.Context, s stats.RPCStats) {
	if p, ok := s.(*stats.InPayload); ok && p.CompressedLength != p.Length {
		c.t.Errorf("the agent received a compressed message (%d bytes for %d)", p.CompressedLength, p.Length)
	}
}
