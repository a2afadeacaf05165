package fakegitlab

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/caddy-kas/caddy-kas/integration/fakegitaly"
)

// The endpoints KAS calls, as paths on the Server.
const (
	// PathAgentInfo is GET agent_info: who the agent token belongs to.
	PathAgentInfo = "/api/v4/internal/kubernetes/agent_info"
	// PathAllowedAgents is GET allowed_agents: which agents a CI job may
	// use, authenticated by the job token alone.
	PathAllowedAgents = "/api/v4/job/allowed_agents"
	// PathAuthorizeProxyUser is POST authorize_proxy_user: whether a user's
	// session cookie or personal access token gives access to an agent.
	PathAuthorizeProxyUser = "/api/v4/internal/kubernetes/authorize_proxy_user"
	// PathUsageMetrics is POST usage_metrics: KAS's periodic usage report.
	PathUsageMetrics = "/api/v4/internal/kubernetes/usage_metrics"
	// PathAgentConfiguration is POST agent_configuration: an agent's
	// configuration file, which Rails authorizes CI jobs and users from.
	PathAgentConfiguration = "/api/v4/internal/kubernetes/agent_configuration"
)

// SecretSize is the size of the shared secret KAS and Rails use for the KAS
// to GitLab JWT: the secret file must decode to exactly this many bytes.
const SecretSize = 32

// Options configure a Server.
type Options struct {
	// Secret is the secret shared with KAS (the bytes the base64 secret file
	// decodes to), exactly SecretSize bytes. NewSecret makes one.
	Secret []byte
	// Gitaly, if set, holds the repositories of the projects added with
	// one: agent_info names its address and token for their agents.
	Gitaly *fakegitaly.Server

	// report, when set, receives each contract violation instead of the
	// test's Errorf, so that the package's own tests can provoke and
	// collect them.
	report func(msg string)
}

// TB is what a Server needs of whoever runs it: a test (*testing.T and
// *testing.B satisfy it) or a harness of its own, such as the benchmark's,
// which runs GitLab's KAS in front of a Server. Fatalf must not return
// (testing.T ends the test's goroutine), Errorf receives contract
// violations, Cleanup functions run when the run ends.
type TB interface {
	Helper()
	Errorf(format string, args ...any)
	Fatalf(format string, args ...any)
	Cleanup(f func())
	TempDir() string
}

// Server is a running GitLab Rails stand-in; see the package documentation.
type Server struct {
	// URL is the base URL of the Server, such as http://127.0.0.1:41234,
	// with no trailing slash: the GitLab address to give KAS.
	URL string

	t      TB
	secret []byte
	report func(msg string)
	// lateOutput receives the violations reported after the test ended.
	lateOutput io.Writer
	srv        *httptest.Server
	caFile     string // empty unless the Server speaks TLS
	caPEM      []byte

	// reportMu guards closed, and is held while a violation is reported so
	// that no report reaches the test after its Cleanup began.
	reportMu sync.Mutex
	closed   bool

	gitaly *fakegitaly.Server // nil without Options.Gitaly

	// mu guards everything below: GitLab's groups, projects, users and
	// their credentials, agents, jobs and the configurations KAS posted,
	// and what the Server recorded.
	mu       sync.Mutex
	groups   []Group
	projects []Project
	users    []User
	members  []member
	pats     []personalAccessToken
	sessions []*session
	agents   []*agentToken
	jobs     map[string]Job         // by job token
	configs  map[int64]*agentConfig // by agent id, the last valid one posted
	posted   []PostedConfiguration
	calls    map[string]int // by path, requests that met the contract
	usage    []UsageReport
	failures map[string]int // by path, status to answer instead
	pages    *Pages         // nil until ServePages
}

// Start starts a plain HTTP Server on 127.0.0.1 that is closed when the
// test ends.
func Start(t TB, opts Options) *Server {
	t.Helper()
	return start(t, opts, false)
}

// StartTLS starts an HTTPS Server on 127.0.0.1 with the httptest
// certificate (valid for 127.0.0.1); CAFile names a PEM file with the
// certificate to trust. It is closed when the test ends.
func StartTLS(t TB, opts Options) *Server {
	t.Helper()
	return start(t, opts, true)
}

func start(t TB, opts Options, useTLS bool) *Server {
	t.Helper()
	if len(opts.Secret) != SecretSize {
		t.Fatalf("fakegitlab: the KAS secret is %d bytes, it must be exactly %d", len(opts.Secret), SecretSize)
	}
	s := &Server{
		t:          t,
		secret:     append([]byte(nil), opts.Secret...),
		report:     opts.report,
		lateOutput: os.Stderr,
		gitaly:     opts.Gitaly,
		jobs:       make(map[string]Job),
		configs:    make(map[int64]*agentConfig),
		calls:      make(map[string]int),
		failures:   make(map[string]int),
	}
	handler := http.HandlerFunc(s.serveHTTP)
	if useTLS {
		s.srv = httptest.NewTLSServer(handler)
		s.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.srv.Certificate().Raw})
		s.caFile = filepath.Join(t.TempDir(), "gitlab-ca.pem")
		if err := os.WriteFile(s.caFile, s.caPEM, 0o600); err != nil {
			s.srv.Close()
			t.Fatalf("fakegitlab: write the CA file: %v", err)
		}
	} else {
		s.srv = httptest.NewServer(handler)
	}
	s.URL = s.srv.URL
	t.Cleanup(s.shutdown)
	return s
}

// shutdown stops reporting to the test, then closes the server, which waits
// for the requests in flight.
func (s *Server) shutdown() {
	s.reportMu.Lock()
	s.closed = true
	s.reportMu.Unlock()
	s.srv.Close()
}

// CAFile is the path of a PEM file with the CA certificate of a Server
// started with StartTLS, or "" for a plain HTTP one.
func (s *Server) CAFile() string { return s.caFile }

// CAPEM is the content of CAFile, or nil for a plain HTTP Server.
func (s *Server) CAPEM() []byte { return append([]byte(nil), s.caPEM...) }

// Client is an HTTP client that trusts the Server's certificate.
func (s *Server) Client() *http.Client { return s.srv.Client() }

// NewSecret returns a new KAS shared secret and the path of a file in
// t.TempDir() with its base64, as Omnibus GitLab writes it: the secret is
// 32 hex digits (16 random bytes hex encoded, SecretSize bytes in all) and
// the file holds their strict base64 encoding with no trailing newline.
func NewSecret(t TB) (secret []byte, file string) {
	t.Helper()
	raw := make([]byte, SecretSize/2)
	_, _ = rand.Read(raw) // crypto/rand.Read never fails on supported platforms
	secret = []byte(hex.EncodeToString(raw))
	file = filepath.Join(t.TempDir(), "gitlab-kas-secret")
	if err := os.WriteFile(file, []byte(base64.StdEncoding.EncodeToString(secret)), 0o600); err != nil {
		t.Fatalf("fakegitlab: write the secret file: %v", err)
	}
	return secret, file
}

// Calls reports how many requests to path met the contract, whatever the
// Server answered them (an unknown token or an injected failure included).
func (s *Server) Calls(path string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls[path]
}

// SetFailure makes the endpoint at path answer every request that meets the
// contract with status (such as 500 or 503) and a Rails-style error body,
// until SetFailure(path, 0) resets it.
func (s *Server) SetFailure(path string, status int) {
	if _, ok := endpoints[path]; !ok {
		s.t.Fatalf("fakegitlab: SetFailure for %q, which is not an endpoint of the Server", path)
	}
	if status != 0 && (status < 400 || status > 599) {
		s.t.Fatalf("fakegitlab: SetFailure with status %d, want 0 or an error status", status)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if status == 0 {
		delete(s.failures, path)
	} else {
		s.failures[path] = status
	}
}

// endpoint is what the Server serves at one path.
type endpoint struct {
	method string
	// internal endpoints require the KAS JWT; the others must not get it.
	internal bool
	handle   func(s *Server, w http.ResponseWriter, r *http.Request)
}

var endpoints = map[string]endpoint{
	PathAgentInfo:          {method: http.MethodGet, internal: true, handle: (*Server).agentInfo},
	PathAllowedAgents:      {method: http.MethodGet, internal: false, handle: (*Server).allowedAgents},
	PathAuthorizeProxyUser: {method: http.MethodPost, internal: true, handle: (*Server).authorizeProxyUser},
	PathUsageMetrics:       {method: http.MethodPost, internal: true, handle: (*Server).usageMetrics},
	PathAgentConfiguration: {method: http.MethodPost, internal: true, handle: (*Server).agentConfiguration},
}

// kasJWTHeader carries the KAS to GitLab JWT (kas-spec §2.2).
const kasJWTHeader = "Gitlab-Kas-Api-Request"

func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	if strings.HasPrefix(r.URL.Path, PathPages) {
		s.servePage(w, r) // a browser's, not KAS's: no contract to check
		return
	}
	ep, ok := endpoints[r.URL.Path]
	if !ok {
		s.violation(r, "KAS called a path GitLab Rails does not serve to it")
		writeMessage(w, http.StatusNotFound, "404 Not Found")
		return
	}
	if r.Method != ep.method {
		s.violation(r, "wrong method: the endpoint takes %s", ep.method)
		w.Header().Set("Allow", ep.method)
		writeMessage(w, http.StatusMethodNotAllowed, "405 Method Not Allowed")
		return
	}
	if r.URL.RawQuery != "" {
		// None of the endpoints takes query parameters from KAS.
		s.violation(r, "unexpected query string (%d bytes); the endpoint takes none", len(r.URL.RawQuery))
	}
	if ep.internal {
		// Rails checks the JWT before anything else (kas-spec §2.2).
		if err := s.verifyKASJWT(r.Header.Values(kasJWTHeader)); err != nil {
			s.violation(r, "%v", err)
			writeMessage(w, http.StatusUnauthorized, "KAS JWT authentication invalid")
			return
		}
	} else if _, present := r.Header[http.CanonicalHeaderKey(kasJWTHeader)]; present {
		// kas-spec §2.5: no KAS JWT is sent with the job token. Rails would
		// ignore it, so the request is answered as usual.
		s.violation(r, "the %s header must not be sent to this endpoint", kasJWTHeader)
	}
	ep.handle(s, w, r)
}

// accept counts a request to path that met the contract and answers it
// with the injected failure, if any; it reports whether the handler should
// go on.
func (s *Server) accept(w http.ResponseWriter, path string) bool {
	s.mu.Lock()
	s.calls[path]++
	status := s.failures[path]
	s.mu.Unlock()
	if status != 0 {
		writeMessage(w, status, fmt.Sprintf("%d %s", status, http.StatusText(status)))
		return false
	}
	return true
}

// violation reports a request that breaks the contract: to the test with
// Errorf, or to the report hook of the package's own tests. Once the test's
// Cleanup has begun it goes to the standard error instead, since the test
// can no longer fail.
func (s *Server) violation(r *http.Request, format string, args ...any) {
	msg := fmt.Sprintf("fakegitlab: %s %s: %s", r.Method, r.URL.Path, fmt.Sprintf(format, args...))
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

// writeMessage answers with a Rails error body {"message": msg}.
func writeMessage(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"message": msg})
}

// writeValidationError answers 400 with the body Rails' parameter
// validation gives, {"error": msg}.
func writeValidationError(w http.ResponseWriter, msg string) {
	writeJSON(w, http.StatusBadRequest, map[string]string{"error": msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		http.Error(w, "fakegitlab: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}
