package gitaly

import (
	"context"
	"errors"
	"math"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	gitalypb "github.com/caddy-kas/caddy-kas/gitaly/pb"
	"github.com/caddy-kas/caddy-kas/internal/testca"
)

// stub is a Gitaly server whose answers each test sets, recording the
// metadata and requests of the calls it gets.
type stub struct {
	gitalypb.UnimplementedSmartHTTPServiceServer
	gitalypb.UnimplementedCommitServiceServer

	infoRefs       func(*gitalypb.InfoRefsRequest, gitalypb.SmartHTTPService_InfoRefsUploadPackServer) error
	treeEntry      func(*gitalypb.TreeEntryRequest, gitalypb.CommitService_TreeEntryServer) error
	getTreeEntries func(*gitalypb.GetTreeEntriesRequest, gitalypb.CommitService_GetTreeEntriesServer) error

	mu    sync.Mutex
	calls []stubCall
}

type stubCall struct {
	md  metadata.MD
	req proto.Message
}

func (s *stub) record(ctx context.Context, req proto.Message) {
	md, _ := metadata.FromIncomingContext(ctx)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls = append(s.calls, stubCall{md: md, req: req})
}

func (s *stub) Calls() []stubCall {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]stubCall(nil), s.calls...)
}

func (s *stub) InfoRefsUploadPack(req *gitalypb.InfoRefsRequest, stream gitalypb.SmartHTTPService_InfoRefsUploadPackServer) error {
	s.record(stream.Context(), req)
	if s.infoRefs == nil {
		return status.Error(codes.Unimplemented, "no InfoRefsUploadPack in this test")
	}
	return s.infoRefs(req, stream)
}

func (s *stub) TreeEntry(req *gitalypb.TreeEntryRequest, stream gitalypb.CommitService_TreeEntryServer) error {
	s.record(stream.Context(), req)
	if s.treeEntry == nil {
		return status.Error(codes.Unimplemented, "no TreeEntry in this test")
	}
	return s.treeEntry(req, stream)
}

func (s *stub) GetTreeEntries(req *gitalypb.GetTreeEntriesRequest, stream gitalypb.CommitService_GetTreeEntriesServer) error {
	s.record(stream.Context(), req)
	if s.getTreeEntries == nil {
		return status.Error(codes.Unimplemented, "no GetTreeEntries in this test")
	}
	return s.getTreeEntries(req, stream)
}

// serve serves s on lis until the test ends.
func (s *stub) serve(t *testing.T, lis net.Listener, opts ...grpc.ServerOption) {
	t.Helper()
	srv := grpc.NewServer(opts...)
	gitalypb.RegisterSmartHTTPServiceServer(srv, s)
	gitalypb.RegisterCommitServiceServer(srv, s)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
}

// startStub serves s on 127.0.0.1 and returns its tcp:// address.
func startStub(t *testing.T, s *stub) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.serve(t, lis)
	return "tcp://" + lis.Addr().String()
}

var testRepo = Repository{
	StorageName:  "default",
	RelativePath: "@hashed/6b/86/6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b.git",
	GlRepository: "project-1",
	// GitObjectDirectory and GitAlternateObjectDirectories as Rails sends
	// them for a repository outside a quarantine.
	GitAlternateObjectDirectories: []string{},
	GlProjectPath:                 "group/project",
}

// newTestPool is a Pool without rate limits, closed when the test ends.
func newTestPool(t *testing.T, opts Options) *Pool {
	t.Helper()
	if opts.GlobalRateLimit == (RateLimit{}) {
		opts.GlobalRateLimit = RateLimit{PerSecond: math.Inf(1)}
	}
	if opts.PerServerRateLimit == (RateLimit{}) {
		opts.PerServerRateLimit = RateLimit{PerSecond: math.Inf(1)}
	}
	p, err := NewPool(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

func testClient(t *testing.T, p *Pool, info Info) *Client {
	t.Helper()
	c, err := p.Client(info)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Release)
	return c
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// advertise answers InfoRefsUploadPack with adv, cut into chunks of n bytes.
func advertise(adv string, n int) func(*gitalypb.InfoRefsRequest, gitalypb.SmartHTTPService_InfoRefsUploadPackServer) error {
	return func(_ *gitalypb.InfoRefsRequest, stream gitalypb.SmartHTTPService_InfoRefsUploadPackServer) error {
		for rest := adv; len(rest) > 0; {
			k := min(n, len(rest))
			if err := stream.Send(&gitalypb.InfoRefsResponse{Data: []byte(rest[:k])}); err != nil {
				return err
			}
			rest = rest[k:]
		}
		return nil
	}
}

func TestV2Token(t *testing.T) {
	// HMAC-SHA256("gitaly-secret", "1700000000"), computed independently.
	want := "v2.0f237a3e5976ca91ffd02f4257e77a41833f9fd3f88571559b15dc9be4f596c0.1700000000"
	if got := V2Token([]byte("gitaly-secret"), time.Unix(1700000000, 999)); got != want {
		t.Errorf("V2Token = %q, want %q", got, want)
	}
}

// TestWireMetadata checks what a call carries: the v2 token, the feature
// flags and the user agent, and the request KAS makes.
func TestWireMetadata(t *testing.T) {
	s := &stub{infoRefs: advertise(serviceHeader+pkt(oidA+" HEAD\x00symref=HEAD:refs/heads/main\n")+pkt(oidA+" refs/heads/main\n")+flushPkt, 7)}
	addr := startStub(t, s)
	now := time.Unix(1700000000, 0)
	p := newTestPool(t, Options{UserAgent: "gitlab-kas/v17.0.0/abcdef", Now: func() time.Time { return now }})
	c := testClient(t, p, Info{Address: addr, Token: "gitaly-secret", Features: map[string]string{
		"gitaly-feature-foo-bar": "true", "gitaly-feature-baz": "false",
	}})

	commit, err := c.DefaultBranchHead(ctxT(t), testRepo)
	if err != nil || commit != oidA {
		t.Fatalf("DefaultBranchHead = %q, %v; want %q", commit, err, oidA)
	}
	calls := s.Calls()
	if len(calls) != 1 {
		t.Fatalf("%d calls, want 1", len(calls))
	}
	md := calls[0].md
	want := map[string]string{
		"authorization":          "Bearer v2.0f237a3e5976ca91ffd02f4257e77a41833f9fd3f88571559b15dc9be4f596c0.1700000000",
		"gitaly-feature-foo-bar": "true",
		"gitaly-feature-baz":     "false",
	}
	for k, v := range want {
		if got := md.Get(k); len(got) != 1 || got[0] != v {
			t.Errorf("metadata %s = %q, want [%q]", k, got, v)
		}
	}
	if ua := md.Get("user-agent"); len(ua) != 1 || !strings.HasPrefix(ua[0], "gitlab-kas/v17.0.0/abcdef") {
		t.Errorf("user-agent %q", ua)
	}
	wantReq := &gitalypb.InfoRefsRequest{Repository: &gitalypb.Repository{
		StorageName: testRepo.StorageName, RelativePath: testRepo.RelativePath,
		GlRepository: testRepo.GlRepository, GlProjectPath: testRepo.GlProjectPath,
	}}
	if !proto.Equal(calls[0].req, wantReq) {
		t.Errorf("request %v, want %v", calls[0].req, wantReq)
	}

	// The token is made afresh for each call.
	now = now.Add(90 * time.Second)
	if _, err := c.DefaultBranchHead(ctxT(t), testRepo); err != nil {
		t.Fatal(err)
	}
	if got := s.Calls()[1].md.Get("authorization"); len(got) != 1 || !strings.HasSuffix(got[0], ".1700000090") {
		t.Errorf("second call's authorization %q, want one for the new time", got)
	}
}

// TestRepositoryWire checks that our Repository decodes the bytes of
// gitlab.agent.entity.GitalyRepository as Gitaly's (the same numbers).
func TestRepositoryWire(t *testing.T) {
	r, err := testRepo.proto()
	if err != nil {
		t.Fatal(err)
	}
	b, err := proto.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	// storage_name is field 2, relative_path 3, gl_repository 6 and
	// gl_project_path 8, all length-delimited.
	for _, tag := range []byte{2<<3 | 2, 3<<3 | 2, 6<<3 | 2, 8<<3 | 2} {
		if !strings.Contains(string(b), string([]byte{tag})) {
			t.Errorf("no tag %#x in %x", tag, b)
		}
	}
}

func TestBranchHead(t *testing.T) {
	adv := serviceHeader + pkt(oidA+" HEAD\x00symref=HEAD:refs/heads/main\n") + pkt(oidB+" refs/heads/dev\n") +
		pkt(oidA+" refs/heads/main\n") + flushPkt
	empty := serviceHeader + pkt(strings.Repeat("0", 40)+" capabilities^{}\x00agent=git\n") + flushPkt
	tests := []struct {
		name, adv, branch, want string
		err                     error
	}{
		{"default", adv, "", oidA, nil},
		{"named", adv, "dev", oidB, nil},
		{"missing branch", adv, "nope", "", ErrNotFound},
		{"empty repository", empty, "main", "", ErrEmptyRepository},
		{"empty repository, default", empty, "", "", ErrEmptyRepository},
		{"empty stream", "", "", "", ErrEmptyRepository},
		{"malformed", serviceHeader + pkt("nonsense\n") + flushPkt, "", "", ErrBadAdvertisement},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr := startStub(t, &stub{infoRefs: advertise(tt.adv, 5)})
			c := testClient(t, newTestPool(t, Options{}), Info{Address: addr, Token: "t"})
			got, err := c.BranchHead(ctxT(t), testRepo, tt.branch)
			if !errors.Is(err, tt.err) || (err == nil) != (tt.err == nil) {
				t.Fatalf("error %v, want %v", err, tt.err)
			}
			if got != tt.want {
				t.Errorf("commit %q, want %q", got, tt.want)
			}
		})
	}
}

func TestReadFile(t *testing.T) {
	content := []byte(strings.Repeat("ci_access: {}\n", 100))
	blob := func(chunk int) func(*gitalypb.TreeEntryRequest, gitalypb.CommitService_TreeEntryServer) error {
		return func(req *gitalypb.TreeEntryRequest, stream gitalypb.CommitService_TreeEntryServer) error {
			if req.MaxSize > 0 && int64(len(content)) > req.MaxSize {
				return status.Errorf(codes.FailedPrecondition, "object size (%d) is bigger than the maximum allowed size (%d)", len(content), req.MaxSize)
			}
			msg := &gitalypb.TreeEntryResponse{Type: gitalypb.TreeEntryResponse_BLOB, Oid: oidC, Size: int64(len(content)), Mode: 0o100644}
			for off := 0; off == 0 || off < len(content); off += chunk {
				msg.Data = content[off:min(off+chunk, len(content))]
				if err := stream.Send(msg); err != nil {
					return err
				}
				msg = &gitalypb.TreeEntryResponse{}
			}
			return nil
		}
	}
	send := func(msgs ...*gitalypb.TreeEntryResponse) func(*gitalypb.TreeEntryRequest, gitalypb.CommitService_TreeEntryServer) error {
		return func(_ *gitalypb.TreeEntryRequest, stream gitalypb.CommitService_TreeEntryServer) error {
			for _, m := range msgs {
				if err := stream.Send(m); err != nil {
					return err
				}
			}
			return nil
		}
	}
	fail := func(c codes.Code) func(*gitalypb.TreeEntryRequest, gitalypb.CommitService_TreeEntryServer) error {
		return func(*gitalypb.TreeEntryRequest, gitalypb.CommitService_TreeEntryServer) error {
			return status.Error(c, "stub failure")
		}
	}
	tests := []struct {
		name   string
		answer func(*gitalypb.TreeEntryRequest, gitalypb.CommitService_TreeEntryServer) error
		limit  int64
		want   []byte
		err    error
		code   codes.Code // wrapped gRPC code, when not OK
	}{
		{"one message", blob(1 << 20), MaxConfigFileSize, content, nil, codes.OK},
		{"chunks", blob(100), MaxConfigFileSize, content, nil, codes.OK},
		{"exactly the limit", blob(100), int64(len(content)), content, nil, codes.OK},
		{"empty file", send(&gitalypb.TreeEntryResponse{Type: gitalypb.TreeEntryResponse_BLOB, Oid: oidC}), 10, []byte{}, nil, codes.OK},
		{"over the limit", blob(100), int64(len(content)) - 1, nil, ErrFileTooLarge, codes.FailedPrecondition},
		{"not found", fail(codes.NotFound), 10, nil, ErrNotFound, codes.NotFound},
		{"empty stream", send(), 10, nil, ErrNotFound, codes.OK},
		{"empty message", send(&gitalypb.TreeEntryResponse{}), 10, nil, ErrNotFound, codes.OK},
		{"a tree", send(&gitalypb.TreeEntryResponse{Type: gitalypb.TreeEntryResponse_TREE, Oid: oidC}), 10, nil, ErrNotFound, codes.OK},
		{"size over the limit despite max_size", send(&gitalypb.TreeEntryResponse{Type: gitalypb.TreeEntryResponse_BLOB, Oid: oidC, Size: 11}), 10, nil, ErrFileTooLarge, codes.OK},
		{"unavailable", fail(codes.Unavailable), 10, nil, ErrUnavailable, codes.Unavailable},
		{"overloaded", fail(codes.ResourceExhausted), 10, nil, ErrUnavailable, codes.ResourceExhausted},
		{"token refused", fail(codes.Unauthenticated), 10, nil, ErrUnauthenticated, codes.Unauthenticated},
		{"permission denied", fail(codes.PermissionDenied), 10, nil, ErrUnauthenticated, codes.PermissionDenied},
		{"internal", fail(codes.Internal), 10, nil, nil, codes.Internal},
		{"short content", send(&gitalypb.TreeEntryResponse{Type: gitalypb.TreeEntryResponse_BLOB, Oid: oidC, Size: 5, Data: []byte("abc")}), 10, nil, nil, codes.OK},
		{"long content", send(&gitalypb.TreeEntryResponse{Type: gitalypb.TreeEntryResponse_BLOB, Oid: oidC, Size: 2, Data: []byte("abc")}), 10, nil, nil, codes.OK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := &stub{treeEntry: tt.answer}
			c := testClient(t, newTestPool(t, Options{}), Info{Address: startStub(t, s), Token: "t"})
			got, err := c.ReadFile(ctxT(t), testRepo, oidA, ".gitlab/agents/a/config.yaml", tt.limit)
			if tt.want != nil {
				if err != nil || string(got) != string(tt.want) {
					t.Fatalf("ReadFile = %d bytes, %v; want %d bytes", len(got), err, len(tt.want))
				}
			} else {
				if err == nil {
					t.Fatalf("ReadFile = %d bytes, want an error", len(got))
				}
				if tt.err != nil && !errors.Is(err, tt.err) {
					t.Errorf("error %q, want one wrapping %q", err, tt.err)
				}
				if st, _ := status.FromError(err); tt.code != codes.OK && st.Code() != tt.code {
					t.Errorf("error %q has code %v, want %v", err, st.Code(), tt.code)
				}
				if msg := err.Error(); msg != strings.ToLower(msg[:1])+msg[1:] || !strings.Contains(msg, "config.yaml") {
					t.Errorf("error %q should start in lowercase and name the path", msg)
				}
			}
			if calls := s.Calls(); len(calls) == 1 {
				want := &gitalypb.TreeEntryRequest{Revision: []byte(oidA), Path: []byte(".gitlab/agents/a/config.yaml"), MaxSize: tt.limit}
				got := proto.Clone(calls[0].req).(*gitalypb.TreeEntryRequest)
				got.Repository = nil
				if !proto.Equal(got, want) {
					t.Errorf("request %v, want %v", got, want)
				}
			}
		})
	}
}

func TestReadFileArguments(t *testing.T) {
	c := testClient(t, newTestPool(t, Options{}), Info{Address: "tcp://127.0.0.1:1", Token: "t"})
	for _, tt := range []struct {
		name               string
		repo               Repository
		commit, path       string
		limit              int64
		wantErrMentionning string
	}{
		{"no storage", Repository{RelativePath: "x.git"}, oidA, "f", 1, "storage"},
		{"no commit", testRepo, "", "f", 1, "revision"},
		{"no path", testRepo, oidA, "", 1, "path"},
		{"no limit", testRepo, oidA, "f", 0, "limit"},
	} {
		_, err := c.ReadFile(ctxT(t), tt.repo, tt.commit, tt.path, tt.limit)
		if err == nil || !strings.Contains(err.Error(), tt.wantErrMentionning) {
			t.Errorf("%s: error %v, want one about %s", tt.name, err, tt.wantErrMentionning)
		}
	}
}

func TestListDir(t *testing.T) {
	entries := []*gitalypb.TreeEntry{
		{Oid: oidA, Path: []byte(".gitlab/agents/a"), Type: gitalypb.TreeEntry_TREE, Mode: 0o40000},
		{Oid: oidB, Path: []byte(".gitlab/agents/a/config.yaml"), Type: gitalypb.TreeEntry_BLOB, Mode: 0o100644},
		{Oid: oidC, Path: []byte(".gitlab/agents/b"), Type: gitalypb.TreeEntry_TREE, Mode: 0o40000},
		{Oid: oidT, Path: []byte(".gitlab/agents/b/config.yaml"), Type: gitalypb.TreeEntry_TREE, Mode: 0o40000},
		{Oid: oidA, Path: []byte(".gitlab/agents/b/config.yaml/x"), Type: gitalypb.TreeEntry_BLOB, Mode: 0o100644},
		{Oid: oidB, Path: []byte(".gitlab/agents/c-1"), Type: gitalypb.TreeEntry_TREE, Mode: 0o40000},
		{Oid: oidC, Path: []byte(".gitlab/agents/c-1/config.yaml"), Type: gitalypb.TreeEntry_BLOB, Mode: 0o100755},
		{Oid: oidA, Path: []byte(".gitlab/agents/Upper/config.yaml"), Type: gitalypb.TreeEntry_BLOB, Mode: 0o100644},
		{Oid: oidA, Path: []byte(".gitlab/agents/d/config.yml"), Type: gitalypb.TreeEntry_BLOB, Mode: 0o100644},
		{Oid: oidA, Path: []byte(".gitlab/agents/e/f/config.yaml"), Type: gitalypb.TreeEntry_BLOB, Mode: 0o100644},
		{Oid: oidA, Path: []byte(".gitlab/agents/sub"), Type: gitalypb.TreeEntry_COMMIT, Mode: 0o160000},
		{Oid: oidB, Path: []byte(".gitlab/agents/link/config.yaml"), Type: gitalypb.TreeEntry_BLOB, Mode: 0o120000},
	}
	s := &stub{getTreeEntries: func(req *gitalypb.GetTreeEntriesRequest, stream gitalypb.CommitService_GetTreeEntriesServer) error {
		if string(req.Path) != AgentsDir {
			return status.Error(codes.InvalidArgument, "invalid revision or path")
		}
		// In batches of five, as Gitaly sends them in batches.
		for i := 0; i < len(entries); i += 5 {
			if err := stream.Send(&gitalypb.GetTreeEntriesResponse{Entries: entries[i:min(i+5, len(entries))]}); err != nil {
				return err
			}
		}
		return nil
	}}
	c := testClient(t, newTestPool(t, Options{}), Info{Address: startStub(t, s), Token: "t"})

	got, err := c.ListDir(ctxT(t), testRepo, "HEAD", AgentsDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(entries) {
		t.Fatalf("%d entries, want %d", len(got), len(entries))
	}
	if want := (TreeEntry{Path: ".gitlab/agents/sub", Type: EntrySubmodule, OID: oidA, Mode: 0o160000}); got[10] != want {
		t.Errorf("entry %+v, want %+v", got[10], want)
	}
	want := &gitalypb.GetTreeEntriesRequest{Revision: []byte("HEAD"), Path: []byte(AgentsDir), Recursive: true}
	req := proto.Clone(s.Calls()[0].req).(*gitalypb.GetTreeEntriesRequest)
	req.Repository = nil
	if !proto.Equal(req, want) {
		t.Errorf("request %v, want %v", req, want)
	}

	files, err := c.AgentConfigFiles(ctxT(t), testRepo, "refs/heads/main")
	if err != nil {
		t.Fatal(err)
	}
	wantFiles := []AgentConfigFile{
		{Path: ".gitlab/agents/a/config.yaml", AgentName: "a"},
		{Path: ".gitlab/agents/c-1/config.yaml", AgentName: "c-1"},
		// A symbolic link is a blob to Gitaly; GitLab's KAS lists it too.
		{Path: ".gitlab/agents/link/config.yaml", AgentName: "link"},
	}
	if !reflect.DeepEqual(files, wantFiles) {
		t.Errorf("AgentConfigFiles = %+v, want %+v", files, wantFiles)
	}

	if _, err := c.ListDir(ctxT(t), testRepo, "HEAD", "nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("ListDir of a missing path: %v, want ErrNotFound", err)
	}
}

func TestAgentConfigFilesNone(t *testing.T) {
	for _, code := range []codes.Code{codes.InvalidArgument, codes.NotFound} {
		s := &stub{getTreeEntries: func(*gitalypb.GetTreeEntriesRequest, gitalypb.CommitService_GetTreeEntriesServer) error {
			return status.Error(code, "no such path")
		}}
		c := testClient(t, newTestPool(t, Options{}), Info{Address: startStub(t, s), Token: "t"})
		files, err := c.AgentConfigFiles(ctxT(t), testRepo, "HEAD")
		if err != nil || files != nil {
			t.Errorf("%v: AgentConfigFiles = %v, %v; want none", code, files, err)
		}
	}
	s := &stub{getTreeEntries: func(*gitalypb.GetTreeEntriesRequest, gitalypb.CommitService_GetTreeEntriesServer) error {
		return status.Error(codes.Unavailable, "down")
	}}
	c := testClient(t, newTestPool(t, Options{}), Info{Address: startStub(t, s), Token: "t"})
	if _, err := c.AgentConfigFiles(ctxT(t), testRepo, "HEAD"); !errors.Is(err, ErrUnavailable) {
		t.Errorf("AgentConfigFiles with Gitaly down: %v, want ErrUnavailable", err)
	}
}

func TestAgentNameFromPath(t *testing.T) {
	for path, want := range map[string]string{
		".gitlab/agents/a/config.yaml":            "a",
		".gitlab/agents/my-agent-1/config.yaml":   "my-agent-1",
		".gitlab/agents/-a/config.yaml":           "",
		".gitlab/agents/a-/config.yaml":           "",
		".gitlab/agents/A/config.yaml":            "",
		".gitlab/agents/a.b/config.yaml":          "",
		".gitlab/agents/a/config.yml":             "",
		".gitlab/agents/a/b/config.yaml":          "",
		"x/.gitlab/agents/a/config.yaml":          "",
		".gitlab/agents/a/config.yaml/":           "",
		".gitlab/agents/a/config.yaml\n":          "",
		AgentConfigPath("x0"):                     "x0",
		".gitlab/agents/" + "a" + "/config.yaml ": "",
	} {
		got, ok := AgentNameFromPath(path)
		if got != want || ok != (want != "") {
			t.Errorf("AgentNameFromPath(%q) = %q, %v; want %q", path, got, ok, want)
		}
	}
}

// TestAddresses reaches the same stub at each kind of address.
func TestAddresses(t *testing.T) {
	adv := serviceHeader + pkt(oidA+" HEAD\n") + flushPkt
	dir, err := os.MkdirTemp("", "gitaly")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	sock := filepath.Join(dir, "gitaly.sock")
	unixLis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	(&stub{infoRefs: advertise(adv, 100)}).serve(t, unixLis)

	tcpAddr := startStub(t, &stub{infoRefs: advertise(adv, 100)})

	ca, err := testca.New("gitaly test CA")
	if err != nil {
		t.Fatal(err)
	}
	tlsLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	(&stub{infoRefs: advertise(adv, 100)}).serve(t, tlsLis, grpc.Creds(credentials.NewServerTLSFromCert(&ca.Server)))
	tlsAddr := "tls://" + tlsLis.Addr().String()

	tests := []struct {
		name    string
		address string
		extra   bool // trust the test CA
		err     error
	}{
		{"tcp", tcpAddr, false, nil},
		{"dns", "dns:///" + strings.TrimPrefix(tcpAddr, "tcp://"), false, nil},
		{"unix:/path", "unix:" + sock, false, nil},
		{"unix:///path", "unix://" + sock, false, nil},
		{"tls with the extra CA", tlsAddr, true, nil},
		{"tls as localhost", "tls://localhost:" + strconv.Itoa(tlsLis.Addr().(*net.TCPAddr).Port), true, nil},
		{"tls without trusting the CA", tlsAddr, false, ErrUnavailable},
		{"plaintext to a TLS server", "tcp://" + strings.TrimPrefix(tlsAddr, "tls://"), false, ErrUnavailable},
		{"nothing listening", "tcp://127.0.0.1:1", false, ErrUnavailable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := Options{}
			if tt.extra {
				opts.ExtraRootCAs = ca.Pool
			}
			c := testClient(t, newTestPool(t, opts), Info{Address: tt.address, Token: "t"})
			commit, err := c.DefaultBranchHead(ctxT(t), testRepo)
			if !errors.Is(err, tt.err) || (err == nil) != (tt.err == nil) {
				t.Fatalf("error %v, want %v", err, tt.err)
			}
			if tt.err == nil && commit != oidA {
				t.Errorf("commit %q", commit)
			}
		})
	}
}

func TestBadAddresses(t *testing.T) {
	p := newTestPool(t, Options{})
	for _, addr := range []string{
		"", "127.0.0.1:8075", "gitaly:8075", "tcp:127.0.0.1:8075", "tcp://", "tcp://gitaly", "tcp://:8075",
		"tls://gitaly", "unix:", "unix://", "unix://relative/sock", "http://gitaly:8075", "grpc://gitaly:8075",
	} {
		if c, err := p.Client(Info{Address: addr, Token: "t"}); err == nil {
			c.Release()
			t.Errorf("address %q accepted", addr)
		}
	}
	if p.Conns() != 0 {
		t.Errorf("%d connections after refusals", p.Conns())
	}
}

func TestFeatureKeys(t *testing.T) {
	p := newTestPool(t, Options{})
	for _, features := range []map[string]string{
		{"authorization": "Bearer x"},
		{"Authorization": "Bearer x"},
		{"grpc-timeout": "1S"},
		{"gitaly feature": "true"},
		{"gitaly-feature-x": "line\nbreak"},
		{"gitaly-feature-x-bin": "true"},
		{"": "true"},
		{"gitaly-feature-x": "true", "Gitaly-Feature-X": "false"},
	} {
		if c, err := p.Client(Info{Address: "tcp://127.0.0.1:1", Token: "t", Features: features}); err == nil {
			c.Release()
			t.Errorf("features %q accepted", features)
		}
	}
	// Uppercase keys are sent lowercase, as gRPC sends every key.
	pairs, err := featureMetadata(map[string]string{"Gitaly-Feature-B": "true", "gitaly-feature-a": "false"})
	if want := []string{"gitaly-feature-a", "false", "gitaly-feature-b", "true"}; err != nil || !reflect.DeepEqual(pairs, want) {
		t.Errorf("featureMetadata = %q, %v; want %q", pairs, err, want)
	}
}

// TestPoolSharing checks that Clients of one address and token share a
// connection that closes after the idle timeout once all are released.
func TestPoolSharing(t *testing.T) {
	adv := serviceHeader + pkt(oidA+" HEAD\n") + flushPkt
	s := &stub{infoRefs: advertise(adv, 100)}
	addr := startStub(t, s)
	p := newTestPool(t, Options{IdleTimeout: 100 * time.Millisecond})

	a := testClient(t, p, Info{Address: addr, Token: "one", Features: map[string]string{"gitaly-feature-a": "true"}})
	b := testClient(t, p, Info{Address: addr, Token: "one", Features: map[string]string{"gitaly-feature-b": "true"}})
	other := testClient(t, p, Info{Address: addr, Token: "two"})
	if a.conn != b.conn || a.conn == other.conn || p.Conns() != 2 {
		t.Fatalf("%d connections; a and b share: %v, a and other: %v", p.Conns(), a.conn == b.conn, a.conn == other.conn)
	}
	if a.conn.server != other.conn.server {
		t.Error("two tokens for one address have separate per-server limits")
	}
	// Each Client sends its own feature flags on the shared connection.
	for _, c := range []*Client{a, b} {
		if _, err := c.DefaultBranchHead(ctxT(t), testRepo); err != nil {
			t.Fatal(err)
		}
	}
	calls := s.Calls()
	if calls[0].md.Get("gitaly-feature-b") != nil || calls[1].md.Get("gitaly-feature-a") != nil ||
		calls[0].md.Get("gitaly-feature-a") == nil || calls[1].md.Get("gitaly-feature-b") == nil {
		t.Errorf("feature flags leaked between clients: %v, %v", calls[0].md, calls[1].md)
	}

	other.Release()
	a.Release()
	a.Release() // twice is harmless
	if _, err := a.DefaultBranchHead(ctxT(t), testRepo); !errors.Is(err, ErrClosed) {
		t.Errorf("call after Release: %v, want ErrClosed", err)
	}
	// b still uses the shared connection: it must survive the idle timeout.
	time.Sleep(300 * time.Millisecond)
	if p.Conns() != 1 {
		t.Fatalf("%d connections, want b's only", p.Conns())
	}
	if _, err := b.DefaultBranchHead(ctxT(t), testRepo); err != nil {
		t.Fatal(err)
	}

	// Released and taken up again within the idle timeout: the same one.
	shared := b.conn
	b.Release()
	c := testClient(t, p, Info{Address: addr, Token: "one"})
	if c.conn != shared {
		t.Error("a connection within its idle timeout was not reused")
	}
	time.Sleep(300 * time.Millisecond)
	if p.Conns() != 1 {
		t.Fatalf("%d connections while c uses one", p.Conns())
	}

	// Released for good: closed after the idle timeout.
	c.Release()
	deadline := time.Now().Add(5 * time.Second)
	for p.Conns() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections long after the last release", p.Conns())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if len(p.servers) != 0 {
		t.Errorf("%d per-server limits left", len(p.servers))
	}
	d := testClient(t, p, Info{Address: addr, Token: "one"})
	if d.conn == shared {
		t.Error("a closed connection was handed out")
	}
	if _, err := d.DefaultBranchHead(ctxT(t), testRepo); err != nil {
		t.Fatal(err)
	}
}

func TestPoolClose(t *testing.T) {
	addr := startStub(t, &stub{infoRefs: advertise(serviceHeader+pkt(oidA+" HEAD\n")+flushPkt, 100)})
	p := newTestPool(t, Options{})
	c := testClient(t, p, Info{Address: addr, Token: "t"})
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.DefaultBranchHead(ctxT(t), testRepo); !errors.Is(err, ErrClosed) {
		t.Errorf("call after Close: %v, want ErrClosed", err)
	}
	if _, err := p.Client(Info{Address: addr, Token: "t"}); !errors.Is(err, ErrClosed) {
		t.Errorf("Client after Close: %v, want ErrClosed", err)
	}
	c.Release() // after Close: harmless
	if err := p.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// TestConcurrentUse shares clients among goroutines, for the race detector.
func TestConcurrentUse(t *testing.T) {
	addr := startStub(t, &stub{infoRefs: advertise(serviceHeader+pkt(oidA+" HEAD\n")+flushPkt, 3)})
	p := newTestPool(t, Options{IdleTimeout: time.Millisecond})
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 10 {
				c, err := p.Client(Info{Address: addr, Token: []string{"a", "b"}[i%2]})
				if err != nil {
					t.Error(err)
					return
				}
				if _, err := c.DefaultBranchHead(ctxT(t), testRepo); err != nil {
					t.Error(err)
				}
				c.Release()
			}
		}()
	}
	wg.Wait()
}

func TestRateLimit(t *testing.T) {
	s := &stub{infoRefs: advertise(serviceHeader+pkt(oidA+" HEAD\n")+flushPkt, 100)}
	addr := startStub(t, s)
	p, err := NewPool(Options{
		GlobalRateLimit:    RateLimit{PerSecond: math.Inf(1)},
		PerServerRateLimit: RateLimit{PerSecond: 0.01, Burst: 2},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	c := testClient(t, p, Info{Address: addr, Token: "a"})
	// Another token for the same server shares its limit.
	c2 := testClient(t, p, Info{Address: addr, Token: "b"})
	for _, c := range []*Client{c, c2} {
		if _, err := c.DefaultBranchHead(ctxT(t), testRepo); err != nil {
			t.Fatal(err)
		}
	}
	// The burst is spent and the next token is 100 s away: a call that
	// may wait for one second fails at once, without reaching Gitaly.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	start := time.Now()
	if _, err := c2.DefaultBranchHead(ctx, testRepo); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("third call: %v, want DeadlineExceeded", err)
	}
	if took := time.Since(start); took > 500*time.Millisecond {
		t.Errorf("refused after %v, want at once", took)
	}
	if n := len(s.Calls()); n != 2 {
		t.Errorf("%d calls reached Gitaly, want 2", n)
	}

	if _, err := NewPool(Options{GlobalRateLimit: RateLimit{PerSecond: 1}}); err == nil {
		t.Error("a rate limit without a burst accepted")
	}
}

func TestLimiterWaits(t *testing.T) {
	l := newLimiter(RateLimit{PerSecond: 50, Burst: 1})
	start := time.Now()
	for range 3 {
		if err := waitLimit(context.Background(), l); err != nil {
			t.Fatal(err)
		}
	}
	// One at once, two more at 50 per second: about 40 ms.
	if took := time.Since(start); took < 30*time.Millisecond || took > 2*time.Second {
		t.Errorf("three calls took %v, want about 40ms", took)
	}
	// A cancelled wait gives its token back.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	before := l.Tokens()
	if err := waitLimit(ctx, l); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled wait: %v", err)
	}
	if after := l.Tokens(); after < before-0.001 {
		t.Errorf("tokens %v after a cancelled wait, were %v", after, before)
	}
}

func TestInfoString(t *testing.T) {
	if s := (Info{Address: "tcp://g:1", Token: "sekrit"}).String(); strings.Contains(s, "sekrit") {
		t.Errorf("Info.String shows the token: %s", s)
	}
}

// TestErrorMessages checks that errors start in lowercase, as Go errors do.
func TestErrorMessages(t *testing.T) {
	lower := regexp.MustCompile(`^[a-z]`)
	for _, err := range []error{ErrNotFound, ErrFileTooLarge, ErrEmptyRepository, ErrUnavailable, ErrUnauthenticated, ErrClosed, ErrBadAdvertisement} {
		if !lower.MatchString(err.Error()) {
			t.Errorf("%q", err)
		}
	}
}
