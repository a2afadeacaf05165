package fakegitaly

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	gitalypb "github.com/caddy-kas/caddy-kas/gitaly/pb"
)

// The methods the Server serves, as gRPC full method names.
const (
	MethodInfoRefsUploadPack = "/gitaly.SmartHTTPService/InfoRefsUploadPack"
	MethodTreeEntry          = "/gitaly.CommitService/TreeEntry"
	MethodGetTreeEntries     = "/gitaly.CommitService/GetTreeEntries"
)

// DefaultStorage is the storage name of the repositories a Server holds
// unless Options.StorageName says otherwise.
const DefaultStorage = "default"

// tokenValidity is how far the time in a v2 token may be from the
// Server's clock, either way, as Gitaly allows.
const tokenValidity = 30 * time.Second

// Options configure a Server.
type Options struct {
	// Token is Gitaly's shared secret; required.
	Token string
	// StorageName is the name of the Server's one storage; empty means
	// DefaultStorage.
	StorageName string
	// ChunkSize is the most bytes of an advertisement or a blob sent in one
	// message; zero means 50, small enough to cut pkt-lines apart.
	ChunkSize int
	// BatchSize is the most entries of a listing sent in one message; zero
	// means 3.
	BatchSize int
	// Now tells the time for checking tokens; nil means time.Now.
	Now func() time.Time

	// report, when set, receives each contract violation instead of the
	// test's Errorf, so that the package's own tests can provoke and
	// collect them.
	report func(msg string)
}

// Call is a call the Server got.
type Call struct {
	// Method is the gRPC full method name, e.g. MethodTreeEntry.
	Method string
	// Metadata is the call's incoming metadata, authorization included.
	Metadata metadata.MD
}

// Server is a running Gitaly stand-in; see the package documentation.
type Server struct {
	t          testing.TB
	token      []byte
	storage    string
	storageDir string
	chunkSize  int
	batchSize  int
	now        func() time.Time
	report     func(msg string)
	lateOutput io.Writer
	address    string
	srv        *grpc.Server

	// reportMu guards closed, and is held while a violation is reported so
	// that no report reaches the test after its Cleanup began.
	reportMu sync.Mutex
	closed   bool

	// mu guards the repositories, the calls, the failures and the delay.
	mu       sync.Mutex
	repos    map[string]*Repo // by relative path
	calls    []Call
	failures map[string]error // by method
	delay    time.Duration    // before every answer
}

// Start starts a Server on 127.0.0.1; its Address is tcp://127.0.0.1:port.
// It is stopped when the test ends.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("fakegitaly: listen: %v", err)
	}
	return start(t, opts, lis, "tcp://"+lis.Addr().String())
}

// StartUnix starts a Server on a unix socket; its Address is
// unix:/path/to/socket. It is stopped when the test ends.
func StartUnix(t testing.TB, opts Options) *Server {
	t.Helper()
	// A short directory of its own: t.TempDir() may be too long a path
	// for a socket.
	dir, err := os.MkdirTemp("", "fakegitaly")
	if err != nil {
		t.Fatalf("fakegitaly: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	sock := filepath.Join(dir, "gitaly.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatalf("fakegitaly: listen: %v", err)
	}
	return start(t, opts, lis, "unix:"+sock)
}

func start(t testing.TB, opts Options, lis net.Listener, address string) *Server {
	t.Helper()
	if opts.Token == "" {
		_ = lis.Close()
		t.Fatal("fakegitaly: Options.Token is required")
	}
	s := &Server{
		t:          t,
		token:      []byte(opts.Token),
		storage:    opts.StorageName,
		storageDir: filepath.Join(t.TempDir(), "storage"),
		chunkSize:  opts.ChunkSize,
		batchSize:  opts.BatchSize,
		now:        opts.Now,
		report:     opts.report,
		lateOutput: os.Stderr,
		address:    address,
		repos:      make(map[string]*Repo),
		failures:   make(map[string]error),
	}
	if s.storage == "" {
		s.storage = DefaultStorage
	}
	if s.chunkSize <= 0 {
		s.chunkSize = 50
	}
	if s.batchSize <= 0 {
		s.batchSize = 3
	}
	if s.now == nil {
		s.now = time.Now
	}
	if err := os.MkdirAll(s.storageDir, 0o755); err != nil {
		t.Fatalf("fakegitaly: %v", err)
	}
	s.srv = grpc.NewServer(
		grpc.ChainUnaryInterceptor(s.unaryInterceptor),
		grpc.ChainStreamInterceptor(s.streamInterceptor),
		grpc.UnknownServiceHandler(s.unknown),
	)
	gitalypb.RegisterSmartHTTPServiceServer(s.srv, &smartHTTP{s: s})
	gitalypb.RegisterCommitServiceServer(s.srv, &commitService{s: s})
	go func() { _ = s.srv.Serve(lis) }()
	t.Cleanup(s.shutdown)
	return s
}

// shutdown stops reporting to the test, then stops the server.
func (s *Server) shutdown() {
	s.reportMu.Lock()
	s.closed = true
	s.reportMu.Unlock()
	s.srv.Stop()
}

// Address is the Server's address as gitaly_info gives it:
// tcp://127.0.0.1:port or unix:/path.
func (s *Server) Address() string { return s.address }

// Token is the Server's shared secret.
func (s *Server) Token() string { return string(s.token) }

// StorageName is the name of the Server's storage.
func (s *Server) StorageName() string { return s.storage }

// Calls lists the calls the Server got, in order, those refused included.
func (s *Server) Calls() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Call, len(s.calls))
	for i, c := range s.calls {
		out[i] = Call{Method: c.Method, Metadata: c.Metadata.Copy()}
	}
	return out
}

// SetFailure makes method (a Method* constant) answer err, such as
// status.Error(codes.Unavailable, "..."), to every call that meets the
// contract, until SetFailure(method, nil) resets it.
func (s *Server) SetFailure(method string, err error) {
	switch method {
	case MethodInfoRefsUploadPack, MethodTreeEntry, MethodGetTreeEntries:
	default:
		s.t.Fatalf("fakegitaly: SetFailure for %q, which the Server does not serve", method)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err == nil {
		delete(s.failures, method)
	} else {
		s.failures[method] = err
	}
}

func (s *Server) failure(method string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.failures[method]
}

// violation reports a call that breaks the contract: to the test with
// Errorf, or to the report hook of the package's own tests. Once the test's
// Cleanup has begun it goes to the standard error instead, since the test
// can no longer fail.
func (s *Server) violation(method, format string, args ...any) {
	msg := fmt.Sprintf("fakegitaly: %s: %s", method, fmt.Sprintf(format, args...))
	s.reportMu.Lock()
	defer s.reportMu.Unlock()
	switch {
	case s.closed:
		fmt.Fprintf(s.lateOutput, "%s (after the test ended)\n", msg)
	case s.report != nil:
		s.report(msg)
	default:
		s.t.Errorf("%s", msg)
	}
}

func (s *Server) unaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	// None of the methods served is unary; this guards against one added
	// to the protos but not to the contract.
	if err := s.admit(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	s.violation(info.FullMethod, "a unary method outside the contract")
	return nil, status.Error(codes.Unimplemented, "not served by fakegitaly")
}

func (s *Server) streamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if err := s.admit(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	s.mu.Lock()
	delay := s.delay
	s.mu.Unlock()
	if delay > 0 {
		// A slow Gitaly: the answer comes late, or not at all if the
		// caller gives up first.
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-ss.Context().Done():
			t.Stop()
			return status.FromContextError(ss.Context().Err()).Err()
		}
	}
	return handler(srv, ss)
}

// SetDelay makes every call wait d before it is answered, as a slow or
// overloaded Gitaly does; zero answers at once again.
func (s *Server) SetDelay(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.delay = d
}

// unknown answers any method the Server does not serve. The stream
// interceptor has admitted the call already.
func (s *Server) unknown(_ any, ss grpc.ServerStream) error {
	method, _ := grpc.Method(ss.Context())
	s.violation(method, "a method outside the contract (KAS calls only InfoRefsUploadPack, TreeEntry and GetTreeEntries)")
	return status.Errorf(codes.Unimplemented, "unknown method %s", method)
}

// admit records a call and checks its token.
func (s *Server) admit(ctx context.Context, method string) error {
	md, _ := metadata.FromIncomingContext(ctx)
	s.mu.Lock()
	s.calls = append(s.calls, Call{Method: method, Metadata: md.Copy()})
	s.mu.Unlock()

	values := md.Get("authorization")
	if len(values) == 0 {
		s.violation(method, "no authorization metadata")
		return status.Error(codes.Unauthenticated, "authentication required")
	}
	if len(values) > 1 {
		s.violation(method, "%d authorization values, want one", len(values))
		return status.Error(codes.Unauthenticated, "authentication required")
	}
	if reason := s.checkToken(values[0]); reason != "" {
		s.violation(method, "authorization refused: %s", reason)
		return status.Error(codes.PermissionDenied, "permission denied")
	}
	return nil
}

// checkToken checks a v2 token, returning why it is refused or "". The
// reason never shows the token.
func (s *Server) checkToken(value string) string {
	scheme, token, ok := strings.Cut(value, " ")
	if !ok || scheme != "Bearer" {
		return `want "Bearer <token>"`
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 || parts[0] != "v2" {
		return `want a v2 token "v2.<hmac>.<time>"`
	}
	mac, err := hex.DecodeString(parts[1])
	if err != nil || len(parts[1]) != 2*sha256.Size || strings.ToLower(parts[1]) != parts[1] {
		return "the HMAC is not 64 lowercase hex digits"
	}
	issued, err := strconv.ParseInt(parts[2], 10, 64)
	if err != nil || strconv.FormatInt(issued, 10) != parts[2] {
		return "the time is not a decimal unix time"
	}
	h := hmac.New(sha256.New, s.token)
	h.Write([]byte(parts[2]))
	if !hmac.Equal(mac, h.Sum(nil)) {
		return "the HMAC does not match the token"
	}
	switch skew := s.now().Sub(time.Unix(issued, 0)).Round(time.Second); {
	case skew > tokenValidity:
		return fmt.Sprintf("issued %v ago, more than the %v Gitaly allows", skew, tokenValidity)
	case skew < -tokenValidity:
		return fmt.Sprintf("issued %v in the future, more than the %v Gitaly allows", -skew, tokenValidity)
	}
	return ""
}
