package fakegitaly

import (
	"context"
	"errors"
	"io"
	"math"
	"os"
	"os/exec"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/caddy-kas/caddy-kas/gitaly"
	gitalypb "github.com/caddy-kas/caddy-kas/gitaly/pb"
)

const testToken = "gitaly-shared-secret"

// violations collects what a Server reports instead of failing the test.
type violations struct {
	mu   sync.Mutex
	msgs []string
}

func (v *violations) report(msg string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.msgs = append(v.msgs, msg)
}

// take returns the reports so far and forgets them.
func (v *violations) take() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := v.msgs
	v.msgs = nil
	return out
}

func requireGit(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("git"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("git is not on PATH; the Gitaly double answers from real git repositories")
		}
		t.Skip("git is not on PATH; the Gitaly double answers from real git repositories")
	}
}

// env is a Server with one repository and a gitaly client for it.
type env struct {
	srv    *Server
	repo   *Repo
	grepo  gitaly.Repository
	pool   *gitaly.Pool
	client *gitaly.Client
}

func newEnv(t *testing.T, opts Options, start func(testing.TB, Options) *Server) *env {
	t.Helper()
	requireGit(t)
	if opts.Token == "" {
		opts.Token = testToken
	}
	srv := start(t, opts)
	repo := srv.AddRepository(RepoOptions{GlRepository: "project-7", GlProjectPath: "group/agents"})
	pool, err := gitaly.NewPool(gitaly.Options{
		UserAgent:          "caddy-kas-test",
		GlobalRateLimit:    gitaly.RateLimit{PerSecond: math.Inf(1)},
		PerServerRateLimit: gitaly.RateLimit{PerSecond: math.Inf(1)},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pool.Close() })
	client, err := pool.Client(gitaly.Info{
		Address:  srv.Address(),
		Token:    srv.Token(),
		Features: map[string]string{"gitaly-feature-some-flag": "true"},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.Release)
	return &env{srv: srv, repo: repo, pool: pool, client: client, grepo: gitaly.Repository{
		StorageName:   repo.StorageName,
		RelativePath:  repo.RelativePath,
		GlRepository:  repo.GlRepository,
		GlProjectPath: repo.GlProjectPath,
	}}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestReadAgentConfig(t *testing.T) {
	e := newEnv(t, Options{}, Start)
	ctx := ctxT(t)
	config := "ci_access:\n  projects:\n    - id: group/app\n"
	e.repo.WriteFile(".gitlab/agents/prod/config.yaml", config)
	e.repo.WriteFile(".gitlab/agents/staging-2/config.yaml", "")
	e.repo.WriteFile(".gitlab/agents/Bad_Name/config.yaml", "x: 1\n")
	e.repo.WriteFile(".gitlab/agents/notes/README.md", "not an agent\n")
	e.repo.WriteFile(".gitlab/agents/deep/er/config.yaml", "x: 1\n")
	e.repo.WriteFile("README.md", "hello\n")
	commit := e.repo.Commit("agents")

	head, err := e.client.DefaultBranchHead(ctx, e.grepo)
	if err != nil || head != commit {
		t.Fatalf("DefaultBranchHead = %q, %v; want %q", head, err, commit)
	}
	if head, err := e.client.BranchHead(ctx, e.grepo, "main"); err != nil || head != commit {
		t.Errorf("BranchHead(main) = %q, %v; want %q", head, err, commit)
	}
	if _, err := e.client.BranchHead(ctx, e.grepo, "nope"); !errors.Is(err, gitaly.ErrNotFound) {
		t.Errorf("BranchHead(nope): %v, want ErrNotFound", err)
	}

	got, err := e.client.ReadFile(ctx, e.grepo, head, gitaly.AgentConfigPath("prod"), gitaly.MaxConfigFileSize)
	if err != nil || string(got) != config {
		t.Fatalf("ReadFile = %q, %v; want %q", got, err, config)
	}
	if got, err := e.client.ReadFile(ctx, e.grepo, head, gitaly.AgentConfigPath("staging-2"), gitaly.MaxConfigFileSize); err != nil || len(got) != 0 {
		t.Errorf("ReadFile of an empty file = %q, %v", got, err)
	}

	files, err := e.client.AgentConfigFiles(ctx, e.grepo, "HEAD")
	if err != nil {
		t.Fatal(err)
	}
	want := []gitaly.AgentConfigFile{
		{Path: ".gitlab/agents/prod/config.yaml", AgentName: "prod"},
		{Path: ".gitlab/agents/staging-2/config.yaml", AgentName: "staging-2"},
	}
	if !reflect.DeepEqual(files, want) {
		t.Errorf("AgentConfigFiles = %+v, want %+v", files, want)
	}

	entries, err := e.client.ListDir(ctx, e.grepo, commit, ".gitlab")
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, en := range entries {
		paths = append(paths, en.Type.String()+" "+en.Path)
	}
	wantPaths := []string{
		"tree .gitlab/agents",
		"tree .gitlab/agents/Bad_Name", "blob .gitlab/agents/Bad_Name/config.yaml",
		"tree .gitlab/agents/deep", "tree .gitlab/agents/deep/er", "blob .gitlab/agents/deep/er/config.yaml",
		"tree .gitlab/agents/notes", "blob .gitlab/agents/notes/README.md",
		"tree .gitlab/agents/prod", "blob .gitlab/agents/prod/config.yaml",
		"tree .gitlab/agents/staging-2", "blob .gitlab/agents/staging-2/config.yaml",
	}
	if !reflect.DeepEqual(paths, wantPaths) {
		t.Errorf("ListDir(.gitlab) =\n%q\nwant\n%q", paths, wantPaths)
	}
	if oid := e.repo.Git("rev-parse", commit+":.gitlab/agents/prod/config.yaml"); entries[9].OID != oid || entries[9].Mode != 0o100644 {
		t.Errorf("entry %+v, want oid %s and mode 100644", entries[9], oid)
	}

	// Every call carried the client's feature flag and user agent.
	calls := e.srv.Calls()
	if len(calls) != 7 {
		t.Errorf("%d calls, want 7", len(calls))
	}
	for _, c := range calls {
		if v := c.Metadata.Get("gitaly-feature-some-flag"); len(v) != 1 || v[0] != "true" {
			t.Errorf("%s: feature flag %q", c.Method, v)
		}
		if ua := c.Metadata.Get("user-agent"); len(ua) != 1 || !strings.HasPrefix(ua[0], "caddy-kas-test") {
			t.Errorf("%s: user agent %q", c.Method, ua)
		}
	}
}

func TestRepositoryChanges(t *testing.T) {
	e := newEnv(t, Options{}, Start)
	ctx := ctxT(t)
	e.repo.WriteFile(".gitlab/agents/a/config.yaml", "v: 1\n")
	first := e.repo.Commit("first")
	if head, err := e.client.DefaultBranchHead(ctx, e.grepo); err != nil || head != first {
		t.Fatalf("head %q, %v; want %q", head, err, first)
	}

	e.repo.WriteFile(".gitlab/agents/a/config.yaml", "v: 2\n")
	e.repo.WriteFile(".gitlab/agents/b/config.yaml", "v: 1\n")
	second := e.repo.Commit("second")
	head, err := e.client.DefaultBranchHead(ctx, e.grepo)
	if err != nil || head != second || head == first {
		t.Fatalf("head after a new commit %q, %v; want %q", head, err, second)
	}
	for commit, want := range map[string]string{first: "v: 1\n", second: "v: 2\n"} {
		if got, err := e.client.ReadFile(ctx, e.grepo, commit, ".gitlab/agents/a/config.yaml", 100); err != nil || string(got) != want {
			t.Errorf("at %s: %q, %v; want %q", commit, got, err, want)
		}
	}
	if files, err := e.client.AgentConfigFiles(ctx, e.grepo, "refs/heads/main"); err != nil || len(files) != 2 {
		t.Errorf("AgentConfigFiles = %v, %v; want a and b", files, err)
	}

	e.repo.Remove(".gitlab/agents/a")
	third := e.repo.Commit("third")
	if _, err := e.client.ReadFile(ctx, e.grepo, third, ".gitlab/agents/a/config.yaml", 100); !errors.Is(err, gitaly.ErrNotFound) {
		t.Errorf("removed file: %v, want ErrNotFound", err)
	}
	files, err := e.client.AgentConfigFiles(ctx, e.grepo, third)
	if want := []gitaly.AgentConfigFile{{Path: ".gitlab/agents/b/config.yaml", AgentName: "b"}}; err != nil || !reflect.DeepEqual(files, want) {
		t.Errorf("AgentConfigFiles after removal = %v, %v; want %v", files, err, want)
	}
}

func TestMissing(t *testing.T) {
	e := newEnv(t, Options{}, Start)
	ctx := ctxT(t)
	e.repo.WriteFile("README.md", "no agents here\n")
	commit := e.repo.Commit("readme")

	for _, path := range []string{".gitlab/agents/a/config.yaml", "README.md/x", ".gitlab"} {
		if _, err := e.client.ReadFile(ctx, e.grepo, commit, path, 100); !errors.Is(err, gitaly.ErrNotFound) {
			t.Errorf("ReadFile(%s): %v, want ErrNotFound", path, err)
		}
	}
	e.repo.WriteFile(".gitlab/agents/a/config.yaml/oops", "a directory where the file should be\n")
	commit = e.repo.Commit("dir")
	if _, err := e.client.ReadFile(ctx, e.grepo, commit, ".gitlab/agents/a/config.yaml", 100); !errors.Is(err, gitaly.ErrNotFound) {
		t.Errorf("ReadFile of a directory: %v, want ErrNotFound", err)
	}
	if _, err := e.client.ReadFile(ctx, e.grepo, strings.Repeat("1", 40), "README.md", 100); !errors.Is(err, gitaly.ErrNotFound) {
		t.Errorf("ReadFile at an unknown commit: %v, want ErrNotFound", err)
	}
	if _, err := e.client.ListDir(ctx, e.grepo, commit, "nope"); !errors.Is(err, gitaly.ErrNotFound) {
		t.Errorf("ListDir of a missing directory: %v, want ErrNotFound", err)
	}
	if _, err := e.client.ListDir(ctx, e.grepo, commit, "README.md"); !errors.Is(err, gitaly.ErrNotFound) {
		t.Errorf("ListDir of a file: %v, want ErrNotFound", err)
	}
	if _, err := e.client.ListDir(ctx, e.grepo, "refs/heads/nope", "."); !errors.Is(err, gitaly.ErrNotFound) {
		t.Errorf("ListDir at a missing branch: %v, want ErrNotFound", err)
	}
	if files, err := e.client.AgentConfigFiles(ctx, e.grepo, "HEAD"); err != nil || len(files) != 0 {
		t.Errorf("AgentConfigFiles = %v, %v; want none", files, err)
	}
	if entries, err := e.client.ListDir(ctx, e.grepo, "HEAD", "."); err != nil || len(entries) != 6 {
		t.Errorf("ListDir of the root = %v, %v; want 6 entries", entries, err)
	}
}

func TestFileOverLimit(t *testing.T) {
	e := newEnv(t, Options{ChunkSize: 4096}, Start)
	ctx := ctxT(t)
	full := strings.Repeat("#", gitaly.MaxConfigFileSize)
	e.repo.WriteFile(".gitlab/agents/full/config.yaml", full)
	e.repo.WriteFile(".gitlab/agents/over/config.yaml", full+"\n")
	commit := e.repo.Commit("big")

	if got, err := e.client.ReadFile(ctx, e.grepo, commit, ".gitlab/agents/full/config.yaml", gitaly.MaxConfigFileSize); err != nil || string(got) != full {
		t.Errorf("a file of exactly the limit: %d bytes, %v", len(got), err)
	}
	_, err := e.client.ReadFile(ctx, e.grepo, commit, ".gitlab/agents/over/config.yaml", gitaly.MaxConfigFileSize)
	if !errors.Is(err, gitaly.ErrFileTooLarge) {
		t.Fatalf("a file over the limit: %v, want ErrFileTooLarge", err)
	}
	if st, _ := status.FromError(err); st.Code() != codes.FailedPrecondition {
		t.Errorf("code %v, want FailedPrecondition from the server", st.Code())
	}
}

func TestEmptyRepository(t *testing.T) {
	e := newEnv(t, Options{}, Start)
	ctx := ctxT(t)
	if _, err := e.client.DefaultBranchHead(ctx, e.grepo); !errors.Is(err, gitaly.ErrEmptyRepository) {
		t.Errorf("DefaultBranchHead of an empty repository: %v, want ErrEmptyRepository", err)
	}
	if _, err := e.client.BranchHead(ctx, e.grepo, "main"); !errors.Is(err, gitaly.ErrEmptyRepository) {
		t.Errorf("BranchHead of an empty repository: %v, want ErrEmptyRepository", err)
	}
	if files, err := e.client.AgentConfigFiles(ctx, e.grepo, "HEAD"); err != nil || len(files) != 0 {
		t.Errorf("AgentConfigFiles of an empty repository = %v, %v", files, err)
	}

	// HEAD's branch unborn while main exists: main is the default branch.
	commit := e.repo.Commit("first")
	e.repo.Git("symbolic-ref", "HEAD", "refs/heads/gone")
	if head, err := e.client.DefaultBranchHead(ctx, e.grepo); err != nil || head != commit {
		t.Errorf("DefaultBranchHead with HEAD unborn = %q, %v; want main's %q", head, err, commit)
	}
	e.repo.Git("branch", "-m", "main", "other")
	if _, err := e.client.DefaultBranchHead(ctx, e.grepo); !errors.Is(err, gitaly.ErrNotFound) {
		t.Errorf("DefaultBranchHead with neither HEAD, main nor master: %v, want ErrNotFound", err)
	}
}

func TestUnixSocket(t *testing.T) {
	e := newEnv(t, Options{}, StartUnix)
	if !strings.HasPrefix(e.srv.Address(), "unix:/") {
		t.Fatalf("address %q", e.srv.Address())
	}
	e.repo.WriteFile(".gitlab/agents/a/config.yaml", "{}\n")
	commit := e.repo.Commit("a")
	if head, err := e.client.DefaultBranchHead(ctxT(t), e.grepo); err != nil || head != commit {
		t.Errorf("DefaultBranchHead over a unix socket = %q, %v", head, err)
	}
}

func TestSetFailure(t *testing.T) {
	e := newEnv(t, Options{}, Start)
	ctx := ctxT(t)
	commit := e.repo.Commit("first")
	e.srv.SetFailure(MethodInfoRefsUploadPack, status.Error(codes.Unavailable, "gitaly is restarting"))
	if _, err := e.client.DefaultBranchHead(ctx, e.grepo); !errors.Is(err, gitaly.ErrUnavailable) {
		t.Errorf("with an injected failure: %v, want ErrUnavailable", err)
	}
	e.srv.SetFailure(MethodInfoRefsUploadPack, nil)
	if head, err := e.client.DefaultBranchHead(ctx, e.grepo); err != nil || head != commit {
		t.Errorf("after the failure: %q, %v", head, err)
	}
}

func TestTokenRefused(t *testing.T) {
	var v violations
	e := newEnv(t, Options{report: v.report}, Start)
	ctx := ctxT(t)
	e.repo.Commit("first")

	tests := []struct {
		name string
		opts gitaly.Options
		info gitaly.Info
		want string
	}{
		{"wrong token", gitaly.Options{}, gitaly.Info{Address: e.srv.Address(), Token: "not-the-secret"}, "HMAC does not match"},
		{"token from the past", gitaly.Options{Now: func() time.Time { return time.Now().Add(-time.Minute) }},
			gitaly.Info{Address: e.srv.Address(), Token: testToken}, "ago, more than the 30s"},
		{"token from the future", gitaly.Options{Now: func() time.Time { return time.Now().Add(time.Minute) }},
			gitaly.Info{Address: e.srv.Address(), Token: testToken}, "in the future, more than the 30s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pool, err := gitaly.NewPool(tt.opts)
			if err != nil {
				t.Fatal(err)
			}
			defer pool.Close()
			c, err := pool.Client(tt.info)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Release()
			_, err = c.DefaultBranchHead(ctx, e.grepo)
			if !errors.Is(err, gitaly.ErrUnauthenticated) {
				t.Errorf("error %v, want ErrUnauthenticated", err)
			}
			if st, _ := status.FromError(err); st.Code() != codes.PermissionDenied {
				t.Errorf("code %v, want PermissionDenied", st.Code())
			}
			msgs := v.take()
			if len(msgs) != 1 || !strings.Contains(msgs[0], tt.want) {
				t.Errorf("violations %q, want one about %q", msgs, tt.want)
			}
			for _, m := range msgs {
				if strings.Contains(m, testToken) || strings.Contains(m, tt.info.Token) {
					t.Errorf("violation shows the token: %s", m)
				}
			}
		})
	}

	// A call without any token.
	cc := rawConn(t, e.srv)
	stream, err := gitalypb.NewSmartHTTPServiceClient(cc).InfoRefsUploadPack(ctx, &gitalypb.InfoRefsRequest{Repository: repoProto(e.repo)})
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("no token: %v, want Unauthenticated", err)
	}
	if msgs := v.take(); len(msgs) != 1 || !strings.Contains(msgs[0], "no authorization") {
		t.Errorf("violations %q, want one about the missing token", msgs)
	}
	// The client's own token is fine.
	if _, err := e.client.DefaultBranchHead(ctx, e.grepo); err != nil {
		t.Error(err)
	}
	if msgs := v.take(); len(msgs) != 0 {
		t.Errorf("violations for a good call: %q", msgs)
	}
}

// rawConn is a connection to srv without the gitaly client, to make calls
// the client would not.
func rawConn(t *testing.T, srv *Server) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+strings.TrimPrefix(srv.Address(), "tcp://"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

func repoProto(r *Repo) *gitalypb.Repository {
	return &gitalypb.Repository{StorageName: r.StorageName, RelativePath: r.RelativePath, GlRepository: r.GlRepository, GlProjectPath: r.GlProjectPath}
}

// TestContractViolations makes, with a good token, the calls KAS must not
// make, and checks that each is answered as Gitaly would and reported.
func TestContractViolations(t *testing.T) {
	var v violations
	e := newEnv(t, Options{report: v.report}, Start)
	e.repo.WriteFile("f", "x\n")
	commit := e.repo.Commit("first")
	ctx := metadata.AppendToOutgoingContext(ctxT(t), "authorization", "Bearer "+gitaly.V2Token([]byte(testToken), time.Now()))
	cc := rawConn(t, e.srv)
	smart := gitalypb.NewSmartHTTPServiceClient(cc)
	commitSvc := gitalypb.NewCommitServiceClient(cc)
	good := repoProto(e.repo)
	withRepo := func(f func(*gitalypb.Repository)) *gitalypb.Repository {
		r := repoProto(e.repo)
		f(r)
		return r
	}
	// recv runs a server-streaming call to its end and returns its error.
	recv := func(stream interface{ RecvMsg(any) error }, err error) error {
		if err != nil {
			return err
		}
		for {
			if err := stream.RecvMsg(new(emptypb.Empty)); err != nil {
				if errors.Is(err, io.EOF) {
					return nil
				}
				return err
			}
		}
	}
	infoRefs := func(req *gitalypb.InfoRefsRequest) error { return recv(smart.InfoRefsUploadPack(ctx, req)) }
	treeEntry := func(req *gitalypb.TreeEntryRequest) error { return recv(commitSvc.TreeEntry(ctx, req)) }
	treeEntries := func(req *gitalypb.GetTreeEntriesRequest) error { return recv(commitSvc.GetTreeEntries(ctx, req)) }

	tests := []struct {
		name string
		call func() error
		code codes.Code
		want string // in the violation
	}{
		{"no repository", func() error { return infoRefs(&gitalypb.InfoRefsRequest{}) }, codes.InvalidArgument, "no repository"},
		{"no storage", func() error {
			return infoRefs(&gitalypb.InfoRefsRequest{Repository: withRepo(func(r *gitalypb.Repository) { r.StorageName = "" })})
		}, codes.InvalidArgument, "without storage_name"},
		{"wrong storage", func() error {
			return infoRefs(&gitalypb.InfoRefsRequest{Repository: withRepo(func(r *gitalypb.Repository) { r.StorageName = "other" })})
		}, codes.InvalidArgument, `storage "other"`},
		{"wrong relative path", func() error {
			return infoRefs(&gitalypb.InfoRefsRequest{Repository: withRepo(func(r *gitalypb.Repository) { r.RelativePath = "@hashed/x.git" })})
		}, codes.NotFound, `relative path "@hashed/x.git"`},
		{"wrong gl_repository", func() error {
			return infoRefs(&gitalypb.InfoRefsRequest{Repository: withRepo(func(r *gitalypb.Repository) { r.GlRepository = "project-8" })})
		}, codes.OK, `"project-8"`},
		{"object directory", func() error {
			return infoRefs(&gitalypb.InfoRefsRequest{Repository: withRepo(func(r *gitalypb.Repository) { r.GitObjectDirectory = "objects/tmp" })})
		}, codes.OK, "object directories"},
		{"git protocol", func() error {
			return infoRefs(&gitalypb.InfoRefsRequest{Repository: good, GitProtocol: "version=2"})
		}, codes.OK, "git_protocol"},
		{"git config options", func() error {
			return infoRefs(&gitalypb.InfoRefsRequest{Repository: good, GitConfigOptions: []string{"a=b"}})
		}, codes.OK, "git_config_options"},
		{"tree entry without revision", func() error {
			return treeEntry(&gitalypb.TreeEntryRequest{Repository: good, Path: []byte("f"), MaxSize: 10})
		}, codes.InvalidArgument, "no revision"},
		{"tree entry with an option-like revision", func() error {
			return treeEntry(&gitalypb.TreeEntryRequest{Repository: good, Revision: []byte("--all"), Path: []byte("f"), MaxSize: 10})
		}, codes.InvalidArgument, "starts with '-'"},
		{"tree entry with a path in the revision", func() error {
			return treeEntry(&gitalypb.TreeEntryRequest{Repository: good, Revision: []byte("HEAD:f"), Path: []byte("f"), MaxSize: 10})
		}, codes.InvalidArgument, "':'"},
		{"tree entry without path", func() error {
			return treeEntry(&gitalypb.TreeEntryRequest{Repository: good, Revision: []byte(commit), MaxSize: 10})
		}, codes.InvalidArgument, "no path"},
		{"tree entry without max_size", func() error {
			return treeEntry(&gitalypb.TreeEntryRequest{Repository: good, Revision: []byte(commit), Path: []byte("f")})
		}, codes.OK, "no max_size"},
		{"tree entry with limit", func() error {
			return treeEntry(&gitalypb.TreeEntryRequest{Repository: good, Revision: []byte(commit), Path: []byte("f"), MaxSize: 10, Limit: 1})
		}, codes.OK, "limit 1"},
		{"tree entries without path", func() error {
			return treeEntries(&gitalypb.GetTreeEntriesRequest{Repository: good, Revision: []byte(commit), Recursive: true})
		}, codes.InvalidArgument, "no path"},
		{"tree entries sorted", func() error {
			return treeEntries(&gitalypb.GetTreeEntriesRequest{Repository: good, Revision: []byte(commit), Path: []byte("."), Sort: gitalypb.GetTreeEntriesRequest_TREES_FIRST})
		}, codes.OK, "sort"},
		{"tree entries paged", func() error {
			return treeEntries(&gitalypb.GetTreeEntriesRequest{Repository: good, Revision: []byte(commit), Path: []byte("."), PaginationParams: &gitalypb.PaginationParameter{Limit: 1}})
		}, codes.Unimplemented, "pagination_params"},
		{"tree entries without flat paths", func() error {
			return treeEntries(&gitalypb.GetTreeEntriesRequest{Repository: good, Revision: []byte(commit), Path: []byte("."), SkipFlatPaths: true})
		}, codes.OK, "skip_flat_paths"},
		{"unknown method", func() error {
			return cc.Invoke(ctx, "/gitaly.RepositoryService/RepositoryExists", &emptypb.Empty{}, &emptypb.Empty{})
		}, codes.Unimplemented, "outside the contract"},
		{"unknown streaming method", func() error {
			return recv(cc.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/gitaly.CommitService/ListFiles"))
		}, codes.Unimplemented, "outside the contract"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := len(e.srv.Calls())
			err := tt.call()
			if status.Code(err) != tt.code {
				t.Errorf("answer %v, want code %v", err, tt.code)
			}
			msgs := v.take()
			if len(msgs) != 1 || !strings.Contains(msgs[0], tt.want) {
				t.Errorf("violations %q, want one about %q", msgs, tt.want)
			}
			if n := len(e.srv.Calls()) - before; n != 1 {
				t.Errorf("%d calls recorded, want 1", n)
			}
		})
	}
}
