package railsapi

import (
	"context"
	"net"
	"os/exec"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/caddy-kas/caddy-kas/gitaly"
	"github.com/caddy-kas/caddy-kas/integration/fakegitaly"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/agenttrackerrpc"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/configprojectrpc"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/entity"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/event"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/notificationsrpc"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/serverinforpc"
	"github.com/caddy-kas/caddy-kas/tunnel"
)

// testSecret is the shared secret of the tests, 32 bytes as GitLab's.
var testSecret = []byte("0123456789abcdef0123456789abcdef")

// fakeConns is a fixed set of connections.
type fakeConns []tunnel.Tunnel

func (f fakeConns) All() []tunnel.Tunnel { return f }

// clients are the stubs Rails uses, connected to a test server.
type clients struct {
	tracker agenttrackerrpc.AgentTrackerClient
	notify  notificationsrpc.NotificationsClient
	info    serverinforpc.ServerInfoClient
	config  configprojectrpc.ConfigurationProjectClient
}

// start serves s on a loopback port, the way the Caddy module does, and
// returns clients for it. Cleanup stops the server.
func start(t *testing.T, s *Server) clients {
	t.Helper()
	if s.Secret == nil {
		s.Secret = testSecret
	}
	if s.Logger == nil {
		s.Logger = zaptest.NewLogger(t)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(s.ServerOptions()...)
	s.Register(g)
	served := make(chan error, 1)
	go func() { served <- g.Serve(lis) }()
	t.Cleanup(func() {
		g.Stop()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return clients{
		tracker: agenttrackerrpc.NewAgentTrackerClient(cc),
		notify:  notificationsrpc.NewNotificationsClient(cc),
		info:    serverinforpc.NewServerInfoClient(cc),
		config:  configprojectrpc.NewConfigurationProjectClient(cc),
	}
}

// railsClaims are the claims GitLab Rails puts in its tokens: its host as
// issuer, KAS as audience, a short lifetime.
func railsClaims() jwt.MapClaims {
	now := time.Now()
	return jwt.MapClaims{
		"iss": "gitlab.example.com",
		"aud": "gitlab-kas",
		"iat": now.Unix(),
		"nbf": now.Add(-5 * time.Second).Unix(),
		"exp": now.Add(time.Minute).Unix(),
		"jti": "9f3c1b2a",
	}
}

func sign(t *testing.T, m jwt.SigningMethod, key any, claims jwt.MapClaims) string {
	t.Helper()
	tok, err := jwt.NewWithClaims(m, claims).SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// railsCtx returns a context carrying the metadata Rails sends: a fresh
// HS256 token behind a lowercase "bearer", and a feature flag.
func railsCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return metadata.AppendToOutgoingContext(ctx,
		"authorization", "bearer "+sign(t, jwt.SigningMethodHS256, testSecret, railsClaims()),
		"kas-feature-some-flag", "true")
}

func wantCode(t *testing.T, err error, want codes.Code) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Fatalf("code = %v, want %v (err: %v)", got, want, err)
	}
}

func TestAuth(t *testing.T) {
	c := start(t, &Server{Version: "v0.1.0"})
	with := func(f func(jwt.MapClaims)) jwt.MapClaims {
		cl := railsClaims()
		f(cl)
		return cl
	}
	hs256 := func(cl jwt.MapClaims) string { return sign(t, jwt.SigningMethodHS256, testSecret, cl) }
	tests := []struct {
		name string
		md   []string // authorization values; none means no metadata
		want codes.Code
	}{
		{"rails token", []string{"bearer " + hs256(railsClaims())}, codes.OK},
		{"scheme in capitals", []string{"Bearer " + hs256(railsClaims())}, codes.OK},
		{"HS384", []string{"bearer " + sign(t, jwt.SigningMethodHS384, testSecret, railsClaims())}, codes.OK},
		{"HS512", []string{"bearer " + sign(t, jwt.SigningMethodHS512, testSecret, railsClaims())}, codes.OK},
		{"audience list", []string{"bearer " + hs256(with(func(c jwt.MapClaims) { c["aud"] = []string{"other", "gitlab-kas"} }))}, codes.OK},
		{"any issuer", []string{"bearer " + hs256(with(func(c jwt.MapClaims) { c["iss"] = "somebody" }))}, codes.OK},
		{"small clock skew", []string{"bearer " + hs256(with(func(c jwt.MapClaims) { c["exp"] = time.Now().Add(-5 * time.Second).Unix() }))}, codes.OK},

		{"missing", nil, codes.Unauthenticated},
		{"two values", []string{"bearer " + hs256(railsClaims()), "bearer " + hs256(railsClaims())}, codes.Unauthenticated},
		{"no scheme", []string{hs256(railsClaims())}, codes.Unauthenticated},
		{"basic scheme", []string{"Basic " + hs256(railsClaims())}, codes.Unauthenticated},
		{"empty token", []string{"bearer "}, codes.Unauthenticated},
		{"garbage", []string{"bearer not.a.jwt"}, codes.Unauthenticated},
		{"wrong secret", []string{"bearer " + sign(t, jwt.SigningMethodHS256, []byte("another secret of thirty-two byte"), railsClaims())}, codes.Unauthenticated},
		{"expired", []string{"bearer " + hs256(with(func(c jwt.MapClaims) { c["exp"] = time.Now().Add(-5 * time.Minute).Unix() }))}, codes.Unauthenticated},
		{"not yet valid", []string{"bearer " + hs256(with(func(c jwt.MapClaims) { c["nbf"] = time.Now().Add(5 * time.Minute).Unix() }))}, codes.Unauthenticated},
		{"wrong audience", []string{"bearer " + hs256(with(func(c jwt.MapClaims) { c["aud"] = "gitlab" }))}, codes.Unauthenticated},
		{"no audience", []string{"bearer " + hs256(with(func(c jwt.MapClaims) { delete(c, "aud") }))}, codes.Unauthenticated},
		{"alg none", []string{"bearer " + sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, railsClaims())}, codes.Unauthenticated},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			for _, v := range tt.md {
				ctx = metadata.AppendToOutgoingContext(ctx, "authorization", v)
			}
			resp, err := c.info.GetServerInfo(ctx, &serverinforpc.GetServerInfoRequest{})
			wantCode(t, err, tt.want)
			if tt.want == codes.Unauthenticated {
				if msg := status.Convert(err).Message(); msg != "JWT validation failed" {
					t.Errorf("message = %q", msg)
				}
				return
			}
			if v := resp.GetCurrentServerInfo().GetVersion(); v != "v0.1.0" {
				t.Errorf("version = %q", v)
			}
		})
	}
}

// Every service is behind the authentication, not just the one TestAuth
// uses.
func TestAuthAllServices(t *testing.T) {
	c := start(t, &Server{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	calls := map[string]func() error{
		"tracker": func() error {
			_, err := c.tracker.GetConnectedAgentsByAgentIDs(ctx, &agenttrackerrpc.GetConnectedAgentsByAgentIDsRequest{AgentIds: []int64{1}})
			return err
		},
		"count": func() error {
			_, err := c.tracker.CountAgentsByAgentVersions(ctx, &agenttrackerrpc.CountAgentsByAgentVersionsRequest{})
			return err
		},
		"notify": func() error {
			_, err := c.notify.GitPushEvent(ctx, &notificationsrpc.GitPushEventRequest{})
			return err
		},
		"config": func() error {
			_, err := c.config.ListAgentConfigFiles(ctx, &configprojectrpc.ListAgentConfigFilesRequest{})
			return err
		},
	}
	for name, call := range calls {
		t.Run(name, func(t *testing.T) { wantCode(t, call(), codes.Unauthenticated) })
	}
}

// A server without a secret refuses everything rather than accepting
// tokens signed with an empty key.
func TestAuthNoSecret(t *testing.T) {
	c := start(t, &Server{Secret: []byte{}})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "bearer "+sign(t, jwt.SigningMethodHS256, []byte{}, railsClaims()))
	_, err := c.info.GetServerInfo(ctx, &serverinforpc.GetServerInfoRequest{})
	wantCode(t, err, codes.Unauthenticated)
}

// fakeStream is the part of a server stream the interceptor looks at.
type fakeStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s fakeStream) Context() context.Context { return s.ctx }

func TestAuthStream(t *testing.T) {
	// No method of the internal API streams yet, so the stream interceptor
	// is called directly.
	var stream grpc.StreamServerInterceptor = (&authenticator{secret: testSecret, log: zaptest.NewLogger(t)}).stream
	info := &grpc.StreamServerInfo{FullMethod: "/test.Service/Stream"}
	tok := sign(t, jwt.SigningMethodHS256, testSecret, railsClaims())
	tests := []struct {
		name string
		md   metadata.MD
		want codes.Code
	}{
		{"valid", metadata.Pairs("authorization", "bearer "+tok), codes.OK},
		{"missing", metadata.MD{}, codes.Unauthenticated},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			called := false
			ctx := metadata.NewIncomingContext(context.Background(), tt.md)
			err := stream(nil, fakeStream{ctx: ctx}, info, func(any, grpc.ServerStream) error {
				called = true
				return nil
			})
			wantCode(t, err, tt.want)
			if called != (tt.want == codes.OK) {
				t.Errorf("handler called = %v", called)
			}
		})
	}
}

func TestGetServerInfo(t *testing.T) {
	c := start(t, &Server{Version: "v0.1.0", GitRef: "0123abcd"})
	resp, err := c.info.GetServerInfo(railsCtx(t), &serverinforpc.GetServerInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	si := resp.GetCurrentServerInfo()
	if si.GetVersion() != "v0.1.0" || si.GetGitRef() != "0123abcd" {
		t.Errorf("server info = %v", si)
	}
}

func TestGitPushEvent(t *testing.T) {
	type push struct {
		id   int64
		path string
	}
	var (
		mu     sync.Mutex
		pushes []push
	)
	c := start(t, &Server{OnGitPush: func(id int64, path string) {
		mu.Lock()
		defer mu.Unlock()
		pushes = append(pushes, push{id, path})
	}})
	tests := []struct {
		name string
		req  *notificationsrpc.GitPushEventRequest
		want codes.Code
	}{
		{"valid", &notificationsrpc.GitPushEventRequest{Event: &event.GitPushEvent{Project: &event.Project{Id: 7, FullPath: "group/sub/project"}}}, codes.OK},
		{"no event", &notificationsrpc.GitPushEventRequest{}, codes.InvalidArgument},
		{"no project", &notificationsrpc.GitPushEventRequest{Event: &event.GitPushEvent{}}, codes.InvalidArgument},
		{"zero id", &notificationsrpc.GitPushEventRequest{Event: &event.GitPushEvent{Project: &event.Project{FullPath: "group/project"}}}, codes.InvalidArgument},
		{"negative id", &notificationsrpc.GitPushEventRequest{Event: &event.GitPushEvent{Project: &event.Project{Id: -1, FullPath: "group/project"}}}, codes.InvalidArgument},
		{"no path", &notificationsrpc.GitPushEventRequest{Event: &event.GitPushEvent{Project: &event.Project{Id: 7}}}, codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mu.Lock()
			pushes = nil
			mu.Unlock()
			_, err := c.notify.GitPushEvent(railsCtx(t), tt.req)
			wantCode(t, err, tt.want)
			mu.Lock()
			defer mu.Unlock()
			p := tt.req.GetEvent().GetProject()
			switch {
			case tt.want == codes.OK && (len(pushes) != 1 || pushes[0] != push{p.GetId(), p.GetFullPath()}):
				t.Errorf("OnGitPush calls = %v, want one for %d %q", pushes, p.GetId(), p.GetFullPath())
			case tt.want != codes.OK && len(pushes) != 0:
				t.Errorf("OnGitPush called for an invalid request: %v", pushes)
			}
		})
	}
}

// Without OnGitPush, a push is still answered.
func TestGitPushEventNoCallback(t *testing.T) {
	c := start(t, &Server{})
	req := &notificationsrpc.GitPushEventRequest{Event: &event.GitPushEvent{Project: &event.Project{Id: 7, FullPath: "g/p"}}}
	if _, err := c.notify.GitPushEvent(railsCtx(t), req); err != nil {
		t.Fatal(err)
	}
}

func TestListAgentConfigFiles(t *testing.T) {
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("git is not installed")
	}
	g := fakegitaly.Start(t, fakegitaly.Options{Token: "gitaly-secret"})
	pool, err := gitaly.NewPool(gitaly.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pool.Close() })
	c := start(t, &Server{Gitaly: pool})

	agents := g.AddRepository(fakegitaly.RepoOptions{GlRepository: "project-1", GlProjectPath: "group/project"})
	for path, content := range map[string]string{
		".gitlab/agents/prod/config.yaml":      "ci_access: {}\n",
		".gitlab/agents/staging-2/config.yaml": "",
		".gitlab/agents/Upper/config.yaml":     "", // not a DNS label
		".gitlab/agents/dev/config.yml":        "", // not config.yaml
		".gitlab/agents/nested/x/config.yaml":  "",
		".gitlab/agents/nofile/README.md":      "",
		"config.yaml":                          "",
	} {
		agents.WriteFile(path, content)
	}
	agents.Commit("agents")
	agents.Git("checkout", "--quiet", "-b", "other")
	agents.WriteFile(".gitlab/agents/only-on-other/config.yaml", "")
	agents.Commit("another agent on another branch")
	agents.Git("checkout", "--quiet", "main")
	empty := g.AddRepository(fakegitaly.RepoOptions{GlRepository: "project-2", GlProjectPath: "group/empty"})
	none := g.AddRepository(fakegitaly.RepoOptions{GlRepository: "project-3", GlProjectPath: "group/none"})
	none.WriteFile("README.md", "no agents here")
	none.Commit("readme")

	repo := func(r *fakegitaly.Repo, f func(*entity.GitalyRepository)) *entity.GitalyRepository {
		pr := &entity.GitalyRepository{StorageName: r.StorageName, RelativePath: r.RelativePath, GlRepository: r.GlRepository, GlProjectPath: r.GlProjectPath}
		if f != nil {
			f(pr)
		}
		return pr
	}
	info := &entity.GitalyInfo{Address: g.Address(), Token: g.Token(), Features: map[string]string{"gitaly-feature-foo": "true"}}
	tests := []struct {
		name string
		req  *configprojectrpc.ListAgentConfigFilesRequest
		want codes.Code
		// files are the agent names listed, in Gitaly's order.
		files []string
	}{
		{"default branch", &configprojectrpc.ListAgentConfigFilesRequest{Repository: repo(agents, nil), GitalyInfo: info}, codes.OK, []string{"prod", "staging-2"}},
		{"named branch", &configprojectrpc.ListAgentConfigFilesRequest{Repository: repo(agents, nil), GitalyInfo: info, DefaultBranch: "other"}, codes.OK, []string{"only-on-other", "prod", "staging-2"}},
		{"empty repository", &configprojectrpc.ListAgentConfigFilesRequest{Repository: repo(empty, nil), GitalyInfo: info}, codes.OK, nil},
		{"no agents directory", &configprojectrpc.ListAgentConfigFilesRequest{Repository: repo(none, nil), GitalyInfo: info}, codes.OK, nil},
		{"no repository", &configprojectrpc.ListAgentConfigFilesRequest{GitalyInfo: info}, codes.InvalidArgument, nil},
		{"no storage", &configprojectrpc.ListAgentConfigFilesRequest{Repository: repo(agents, func(r *entity.GitalyRepository) { r.StorageName = "" }), GitalyInfo: info}, codes.InvalidArgument, nil},
		{"no relative path", &configprojectrpc.ListAgentConfigFilesRequest{Repository: repo(agents, func(r *entity.GitalyRepository) { r.RelativePath = "" }), GitalyInfo: info}, codes.InvalidArgument, nil},
		{"no gl_repository", &configprojectrpc.ListAgentConfigFilesRequest{Repository: repo(agents, func(r *entity.GitalyRepository) { r.GlRepository = "" }), GitalyInfo: info}, codes.InvalidArgument, nil},
		{"no project path", &configprojectrpc.ListAgentConfigFilesRequest{Repository: repo(agents, func(r *entity.GitalyRepository) { r.GlProjectPath = "" }), GitalyInfo: info}, codes.InvalidArgument, nil},
		{"no gitaly info", &configprojectrpc.ListAgentConfigFilesRequest{Repository: repo(agents, nil)}, codes.InvalidArgument, nil},
		{"no gitaly address", &configprojectrpc.ListAgentConfigFilesRequest{Repository: repo(agents, nil), GitalyInfo: &entity.GitalyInfo{Token: "secret"}}, codes.InvalidArgument, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := c.config.ListAgentConfigFiles(railsCtx(t), tt.req)
			wantCode(t, err, tt.want)
			var got []string
			for _, f := range resp.GetConfigFiles() {
				got = append(got, f.GetAgentName())
				if want := ".gitlab/agents/" + f.GetAgentName() + "/config.yaml"; f.GetName() != want {
					t.Errorf("name %q, want %q", f.GetName(), want)
				}
			}
			if !slices.Equal(got, tt.files) {
				t.Errorf("agents %v, want %v", got, tt.files)
			}
		})
	}
}
