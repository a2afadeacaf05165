package integration

import (
	"bufio"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/integration/fakegitlab"
	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
	"github.com/caddy-kas/caddy-kas/internal/testca"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/event"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/notificationsrpc"
)

// A differential test: the same fake GitLab, the same kube-apiserver and
// the same requests, once through GitLab's own KAS and once through Caddy,
// each with GitLab's own agentk (v16.5, unchanged) of the same agent. What
// reaches the apiserver (the identity, every header) must be the same.
// Each agentk reaches the apiserver through its own recording proxy, so
// the test sees exactly what each route delivers.

const (
	// gitlabKASEnv names GitLab's KAS binary.
	gitlabKASEnv = "GITLAB_KAS_BIN"
	// gitlabKASDefault is where it is by default, relative to the
	// repository's root: next to the checkout, beside GitLab's agentk.
	gitlabKASDefault = "../shared/gitlab-agent-v16.5/kas"
	// diffKASStartTimeout bounds the wait until GitLab's KAS and Redis
	// answer.
	diffKASStartTimeout = time.Minute
	// diffProbeTimeout bounds one probe request; GitLab's KAS holds a
	// request for an agent that is not connected yet until it connects.
	diffProbeTimeout = 10 * time.Second
	// diffReadyTimeout bounds the wait until a request succeeds through
	// a newly started agentk.
	diffReadyTimeout = time.Minute
	// diffAgentPath and diffProxyPath are GitLab's paths, which Caddy
	// serves and GitLab's KAS is given too, so that both routes see the
	// same URLs.
	diffAgentPath = "/-/kubernetes-agent/"
	diffProxyPath = "/-/kubernetes-agent/k8s-proxy/"
)

// diffSkipOrFail skips t because something it needs is missing, or fails it
// under CI=true, where every test must run.
func diffSkipOrFail(t *testing.T, msg string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatal(msg + "; CI=true requires every test to run")
	}
	t.Skip(msg)
}

// gitlabKASBin returns the path of GitLab's KAS, as gitlabAgentkBin does
// for its agentk.
func gitlabKASBin(t *testing.T, s *suite) string {
	t.Helper()
	path := os.Getenv(gitlabKASEnv)
	if path == "" {
		path = filepath.Join(s.repoRoot, filepath.FromSlash(gitlabKASDefault))
	}
	if _, err := os.Stat(path); err != nil {
		diffSkipOrFail(t, fmt.Sprintf("GitLab's KAS is needed for this test: %v (set %s, or put it at %s relative to the repository)",
			err, gitlabKASEnv, gitlabKASDefault))
	}
	return path
}

// redisServerBin returns the path of redis-server, which GitLab's KAS
// requires.
func redisServerBin(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("redis-server")
	if err != nil {
		diffSkipOrFail(t, fmt.Sprintf("redis-server is needed for GitLab's KAS in this test: %v (Debian's package redis-server)", err))
	}
	return path
}

// diffStartRedis starts a Redis on a free loopback port that keeps nothing on
// disk, and returns its address once it answers PING.
func diffStartRedis(t *testing.T, bin, dir string) string {
	t.Helper()
	port := mustFreeLoopbackPorts(t, 1)[0]
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	p := startOwnedProcess(t, kubetest.ProcessSpec{
		Name:   "redis-server",
		Binary: bin,
		Args:   []string{"--bind", "127.0.0.1", "--port", fmt.Sprint(port), "--save", "", "--appendonly", "no", "--dir", dir},
		Env:    kubetest.EnvironWithout(),
		LogDir: dir,
	})
	err := kubetest.Eventually(diffKASStartTimeout, func() error {
		if !p.Running() {
			return kubetest.Permanent(p.ExitError())
		}
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return err
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(conn, "PING\r\n"); err != nil {
			return err
		}
		line, err := bufio.NewReader(conn).ReadString('\n')
		if err != nil {
			return err
		}
		if line != "+PONG\r\n" {
			return fmt.Errorf("PING answered %q", line)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("redis-server did not start: %v", err)
	}
	return addr
}

// gitlabKAS is one running GitLab's KAS.
type gitlabKAS struct {
	proc *kubetest.Process
	// agentURL is where agentk dials in (WebSocket, plain: ws://).
	agentURL string
	// proxyURL is the Kubernetes API as kubectl sees it, over HTTPS with
	// a certificate of caFile.
	proxyURL string
	caFile   string
	// apiAddress is its gRPC API for GitLab Rails (plain-text).
	apiAddress string
}

// gitlabKASConfig is its configuration file: the least GitLab's KAS needs
// to serve agents over WebSocket and the Kubernetes API proxy, with
// GitLab's paths, TLS on the Kubernetes API (kubectl sends no credentials
// over plain HTTP), and short shutdown periods.
const gitlabKASConfig = `gitlab:
  address: %[1]q
  external_url: %[2]q
  authentication_secret_file: %[3]q
agent:
  listen: {network: tcp, address: %[4]q, websocket: true, listen_grace_period: 0.1s}
  configuration: {poll_period: 300s}
  kubernetes_api:
    listen: {address: %[5]q, certificate_file: %[6]q, key_file: %[7]q, listen_grace_period: 0.1s, shutdown_grace_period: 1s}
    url_path_prefix: %[8]q
observability:
  listen: {address: %[9]q}
  logging: {level: info, grpc_level: error}
redis:
  server: {address: %[10]q}
  key_prefix: gitlab-kas
api:
  listen: {address: %[11]q, authentication_secret_file: %[3]q, listen_grace_period: 0.1s}
private_api:
  listen: {address: %[12]q, authentication_secret_file: %[13]q, listen_grace_period: 0.1s}
`

// startGitLabKAS starts GitLab's KAS in front of the fake GitLab of e, with
// the secret e shares with it, and waits until it is ready.
func startGitLabKAS(t *testing.T, bin, dir string, e *gitlabEnv, ca *testca.CA, caFile, redisAddr string) *gitlabKAS {
	t.Helper()
	ports := mustFreeLoopbackPorts(t, 5)
	addr := func(i int) string { return fmt.Sprintf("127.0.0.1:%d", ports[i]) }
	agentAddr, proxyAddr, observabilityAddr, apiAddr, privateAddr := addr(0), addr(1), addr(2), addr(3), addr(4)

	certFile := writeSecretFile(t, dir, "kas-k8s-proxy.crt", string(ca.CertPEM))
	keyFile := writeSecretFile(t, dir, "kas-k8s-proxy.key", string(ca.KeyPEM))
	private := make([]byte, 32)
	_, _ = rand.Read(private)
	privateSecret := base64.StdEncoding.EncodeToString(private)
	kubetest.NoteSecret(privateSecret, "GitLab's KAS private API secret file")
	privateFile := writeSecretFile(t, dir, "kas-private-api.secret", privateSecret)
	config := fmt.Sprintf(gitlabKASConfig, e.gitlab.URL, glExternalURL, e.secretFile, agentAddr, proxyAddr,
		certFile, keyFile, diffProxyPath, observabilityAddr, redisAddr, apiAddr, privateAddr, privateFile)
	configFile := writeSecretFile(t, dir, "kas.yaml", config)

	k := &gitlabKAS{
		apiAddress: apiAddr,
		agentURL:   "ws://" + agentAddr + diffAgentPath,
		proxyURL:   fmt.Sprintf("https://localhost:%d%s", ports[1], diffProxyPath),
		caFile:     caFile,
	}
	k.proc = startOwnedProcess(t, kubetest.ProcessSpec{
		Name:   "gitlab-kas",
		Binary: bin,
		Args:   []string{"--configuration-file", configFile},
		Env:    append(kubetest.EnvironWithout("KUBECONFIG", "OWN_PRIVATE_API_URL"), "OWN_PRIVATE_API_URL=grpc://"+privateAddr),
		LogDir: dir,
	})
	client := &http.Client{Timeout: 5 * time.Second}
	defer client.CloseIdleConnections()
	err := kubetest.Eventually(diffKASStartTimeout, func() error {
		if !k.proc.Running() {
			return kubetest.Permanent(k.proc.ExitError())
		}
		resp, err := client.Get("http://" + observabilityAddr + "/readiness")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("/readiness answered %s", resp.Status)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("GitLab's KAS did not start: %v", err)
	}
	return k
}

// diffSeen is what a recorder received from agentk: what the
// apiserver then gets.
type diffSeen struct {
	method, path, rawQuery string
	contentLength          int64
	transferEncoding       []string
	header                 http.Header
}

// diffRecorder is an HTTPS reverse proxy in front of the apiserver that
// records every request it forwards.
type diffRecorder struct {
	url  string
	mu   sync.Mutex
	seen []diffSeen
}

// diffStartRecorder starts a recorder in front of the suite's apiserver,
// with a serving certificate of ca. It is closed when t ends, which waits
// for the requests in flight: start the agentk that uses it after it, so
// that agentk is stopped first.
func diffStartRecorder(t *testing.T, s *suite, ca *testca.CA) *diffRecorder {
	t.Helper()
	target, err := url.Parse(s.cluster.URL)
	if err != nil {
		t.Fatal(err)
	}
	pool, err := kubetest.CertPoolFromFile(s.cluster.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	transport := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}
	t.Cleanup(transport.CloseIdleConnections)
	rec := &diffRecorder{}
	proxy := &httputil.ReverseProxy{
		Rewrite:       func(pr *httputil.ProxyRequest) { pr.SetURL(target) },
		Transport:     transport,
		FlushInterval: -1,
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec.mu.Lock()
		rec.seen = append(rec.seen, diffSeen{
			method: r.Method, path: r.URL.Path, rawQuery: r.URL.RawQuery,
			contentLength: r.ContentLength, transferEncoding: slices.Clone(r.TransferEncoding),
			header: r.Header.Clone(),
		})
		rec.mu.Unlock()
		proxy.ServeHTTP(w, r)
	}))
	srv.EnableHTTP2 = true // as the apiserver: agentk's client-go speaks HTTP/2 to it
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{ca.Server}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	rec.url = srv.URL
	return rec
}

// mark is where the requests recorded from now on start.
func (r *diffRecorder) mark() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.seen)
}

// only returns the one request since mark with the method and path, and
// fails t unless there is exactly one. (agentk makes requests of its own,
// to other paths.)
func (r *diffRecorder) only(t *testing.T, route string, mark int, method, path string) diffSeen {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	var found []diffSeen
	for _, s := range r.seen[mark:] {
		if s.method == method && s.path == path {
			found = append(found, s)
		}
	}
	if len(found) != 1 {
		t.Fatalf("through %s the apiserver got %d requests %s %s, want 1", route, len(found), method, path)
	}
	return found[0]
}

// diffRoute is one way to the apiserver: a server (GitLab's KAS or Caddy),
// GitLab's agentk connected to it, and the recorder that agentk reaches
// the apiserver through.
type diffRoute struct {
	name       string
	proxyURL   string
	caFile     string
	recorder   *diffRecorder
	agentk     *kubetest.Process
	dir        string
	client     *http.Client
	kubectlBin string
}

// diffStartGitLabAgentk starts GitLab's agentk for the agent of e, dialing
// kasURL (with caFile for wss://) and reaching the apiserver through rec
// as adminUser, who may impersonate.
func diffStartGitLabAgentk(t *testing.T, s *suite, e *gitlabEnv, name, dir, kasURL, caFile string, rec *diffRecorder, recCAFile string) *kubetest.Process {
	t.Helper()
	kubeconfig := filepath.Join(dir, name+".kubeconfig")
	err := kubetest.WriteKubeconfig(kubeconfig, rec.url, recCAFile,
		[]kubetest.KubeconfigUser{{Name: adminUser, Token: s.cluster.Tokens[adminUser]}})
	if err != nil {
		t.Fatal(err)
	}
	args := []string{
		"--kas-address", kasURL,
		"--token-file", writeSecretFile(t, dir, name+".token", e.agentToken),
		"--kubeconfig", kubeconfig,
		"--cache-dir", filepath.Join(dir, name+"-cache"),
		"--observability-listen-address", fmt.Sprintf("127.0.0.1:%d", mustFreeLoopbackPorts(t, 1)[0]),
	}
	if caFile != "" {
		args = append(args, "--ca-cert-file", caFile)
	}
	return startOwnedProcess(t, kubetest.ProcessSpec{
		Name:   name,
		Binary: gitlabAgentkBin(t, s),
		Args:   args,
		Env: append(kubetest.EnvironWithout("KUBECONFIG", "POD_NAMESPACE", "POD_NAME", "SERVICE_ACCOUNT_NAME"),
			"POD_NAMESPACE=kas-it", "POD_NAME="+name, "SERVICE_ACCOUNT_NAME=gitlab-agent"),
		LogDir: dir,
	})
}

// newDiffRoute is the route through the server at proxyURL (whose
// certificate caFile holds the CA of), agentk and rec.
func newDiffRoute(t *testing.T, s *suite, name, proxyURL, caFile, dir string, rec *diffRecorder, agentk *kubetest.Process) *diffRoute {
	t.Helper()
	pool, err := kubetest.CertPoolFromFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	transport := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}
	t.Cleanup(transport.CloseIdleConnections)
	return &diffRoute{name: name, proxyURL: proxyURL, caFile: caFile, recorder: rec, agentk: agentk, dir: dir,
		client: &http.Client{Timeout: httpTimeout, Transport: transport}, kubectlBin: s.kubectlBin}
}

// waitRouted waits until a GET of the cluster's /version with the
// authorization header probe succeeds through the route.
func (r *diffRoute) waitRouted(t *testing.T, probe string) {
	t.Helper()
	client := &http.Client{Timeout: diffProbeTimeout, Transport: r.client.Transport}
	err := kubetest.Eventually(diffReadyTimeout, func() error {
		if !r.agentk.Running() {
			return kubetest.Permanent(r.agentk.ExitError())
		}
		req, err := http.NewRequest(http.MethodGet, r.proxyURL+"version", nil)
		if err != nil {
			return kubetest.Permanent(err)
		}
		req.Header.Set("Authorization", probe)
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "gitVersion") {
			return fmt.Errorf("GET version: %s %s", resp.Status, kubetest.Redact(string(body)))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("no request succeeded through %s and GitLab's agentk: %v", r.name, err)
	}
}

// kubectl returns a kubectl that reaches the agent through the route with
// the bearer token token.
func (r *diffRoute) kubectl(t *testing.T, token string) kubectl {
	t.Helper()
	path := filepath.Join(r.dir, "kubectl-"+kubetest.RandomHex(4)+".kubeconfig")
	if err := kubetest.WriteKubeconfig(path, r.proxyURL, r.caFile, []kubetest.KubeconfigUser{{Name: "user", Token: token}}); err != nil {
		t.Fatal(err)
	}
	home := filepath.Join(r.dir, "kubectl-home")
	if err := os.MkdirAll(home, 0o700); err != nil {
		t.Fatal(err)
	}
	return kubectl{bin: r.kubectlBin, kubeconfig: path, home: home}
}

// whoami runs `kubectl auth whoami -o json` through the route and returns
// its output and the request the apiserver got.
func (r *diffRoute) whoami(t *testing.T, token string, extraArgs ...string) (string, diffSeen) {
	t.Helper()
	mark := r.recorder.mark()
	out := r.kubectl(t, token).mustRun(t, append([]string{"auth", "whoami", "-o", "json"}, extraArgs...)...)
	return out, r.recorder.only(t, r.name, mark, http.MethodPost, "/"+selfReviewPath)
}

// diffQuery is the plain client's query: a parameter for the apiserver,
// and a credential parameter that both servers remove.
var diffQuery = fmt.Sprintf("pretty=true&gitlab-agent-id=%d", glAgentID)

// review sends a SelfSubjectReview as a plain HTTP client would, with
// headers of its own beside the credential, and returns the request the
// apiserver got.
func (r *diffRoute) review(t *testing.T, token string) diffSeen {
	t.Helper()
	mark := r.recorder.mark()
	req, err := http.NewRequest(http.MethodPost, r.proxyURL+selfReviewPath+"?"+diffQuery, strings.NewReader(selfReviewObject))
	if err != nil {
		t.Fatal(err)
	}
	req.Header = http.Header{
		"Authorization":       {"Bearer " + token},
		"Content-Type":        {"application/json"},
		"Accept":              {"application/json, */*"},
		"User-Agent":          {"differential-test/1.0"},
		"X-Differential-Test": {"one", "two"},
		"Cookie":              {"_gitlab_kas=not-used-with-a-token"},
		"X-Forwarded-For":     {"203.0.113.7"},
	}
	resp, err := r.client.Do(req)
	if err != nil {
		t.Fatalf("%s: %v", r.name, err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("%s: SelfSubjectReview answered %s: %s", r.name, resp.Status, kubetest.Redact(string(body)))
	}
	return r.recorder.only(t, r.name, mark, http.MethodPost, "/"+selfReviewPath)
}

// diffExcludedHeaders are the request headers that are not compared
// between the two routes, and why. Everything else that reaches the
// apiserver must be the same, names and values.
var diffExcludedHeaders = map[string]string{
	// Compared separately (diffVia): each element but the one naming the
	// server must be the same. GitLab's KAS adds its own element,
	// "gRPC/1.0 gitlab-kas/<version>/<commit>", before agentk's; Caddy adds
	// none, so only agentk's reaches the apiserver.
	"Via": "names the server the request passed through",
	// Compared separately (and never printed): both agentk use the same
	// kubeconfig user.
	"Authorization": "agentk's own credential toward the apiserver",
	// Connection-level (hop-by-hop): they describe agentk's connection to
	// the apiserver, not the request.
	"Connection":        "connection-level",
	"Keep-Alive":        "connection-level",
	"Proxy-Connection":  "connection-level",
	"Te":                "connection-level",
	"Trailer":           "connection-level",
	"Transfer-Encoding": "connection-level",
	"Upgrade":           "connection-level",
	// W3C trace context: fresh ids on every request.
	"Traceparent": "trace ids",
	"Tracestate":  "trace ids",
	// kubectl makes a fresh id for every invocation, so two runs of the
	// same command never share it.
	"Kubectl-Session": "a random id per kubectl invocation",
	// A deliberate difference, checked apart (compare): GitLab's KAS passes
	// the client's own forwarding headers on, Caddy removes them, so that
	// no client chooses the addresses the apiserver's audit log records as
	// the request's source (README, k8s_proxy).
	"X-Forwarded-For":   "client-supplied forwarding header, removed by Caddy",
	"X-Forwarded-Host":  "client-supplied forwarding header, removed by Caddy",
	"X-Forwarded-Proto": "client-supplied forwarding header, removed by Caddy",
	"X-Real-Ip":         "client-supplied forwarding header, removed by Caddy",
	"Forwarded":         "client-supplied forwarding header, removed by Caddy",
}

// diffPair is the two routes the test compares.
type diffPair struct {
	kas, caddy *diffRoute
	// agentkAuth is the Authorization both agentk send to the apiserver.
	agentkAuth string
}

// compare reports every difference between what the apiserver got through
// the two routes.
func (p diffPair) compare(t *testing.T, what string, kas, caddy diffSeen) {
	t.Helper()
	kasRoute, caddyRoute := p.kas, p.caddy
	if kas.method != caddy.method || kas.path != caddy.path || kas.rawQuery != caddy.rawQuery {
		t.Errorf("%s: the apiserver got %s %s?%s through %s, %s %s?%s through %s", what,
			kas.method, kas.path, kas.rawQuery, kasRoute.name, caddy.method, caddy.path, caddy.rawQuery, caddyRoute.name)
	}
	if kas.contentLength != caddy.contentLength || !slices.Equal(kas.transferEncoding, caddy.transferEncoding) {
		t.Errorf("%s: body framing: Content-Length %d, Transfer-Encoding %q through %s; %d, %q through %s", what,
			kas.contentLength, kas.transferEncoding, kasRoute.name, caddy.contentLength, caddy.transferEncoding, caddyRoute.name)
	}
	if a, b := kas.header.Values("Authorization"), caddy.header.Values("Authorization"); len(a) != 1 || !slices.Equal(a, b) ||
		a[0] != p.agentkAuth {
		t.Errorf("%s: agentk's credential toward the apiserver is not the same through both routes (%d and %d Authorization headers)",
			what, len(a), len(b))
	}
	if a, b := diffVia(kas.header.Values("Via"), "gitlab-kas/"), diffVia(caddy.header.Values("Via"), "caddy"); !slices.Equal(a, b) {
		t.Errorf("%s: Via without the server's own element: %q through %s, %q through %s", what, a, kasRoute.name, b, caddyRoute.name)
	}
	for _, k := range []string{"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-Ip", "Forwarded"} {
		if v := caddy.header.Values(k); len(v) > 0 {
			t.Errorf("%s: the client's %s %q reached the apiserver through %s", what, k, v, caddyRoute.name)
		}
	}
	names := map[string]bool{}
	for k := range kas.header {
		names[k] = true
	}
	for k := range caddy.header {
		names[k] = true
	}
	var diffs []string
	for _, k := range slices.Sorted(maps.Keys(names)) {
		if _, excluded := diffExcludedHeaders[k]; excluded {
			continue
		}
		a, b := kas.header[k], caddy.header[k]
		if !slices.Equal(a, b) {
			diffs = append(diffs, fmt.Sprintf("  %s: %s %q, %s %q", k, kasRoute.name, a, caddyRoute.name, b))
		}
	}
	if len(diffs) > 0 {
		t.Errorf("%s: the apiserver got different headers:\n%s", what, kubetest.Redact(strings.Join(diffs, "\n")))
	}
}

// diffVia lists the elements of Via headers, less those whose
// received-by part (RFC 9110 §7.6.3: "<protocol> <received-by>") starts
// with server, case-insensitively.
func diffVia(values []string, server string) []string {
	var out []string
	for _, v := range values {
		for _, element := range strings.Split(v, ",") {
			element = strings.TrimSpace(element)
			fields := strings.Fields(element)
			if len(fields) >= 2 && strings.HasPrefix(strings.ToLower(fields[1]), server) {
				continue
			}
			out = append(out, element)
		}
	}
	return out
}

// TestDifferentialGitLabKAS compares, case by case, what the apiserver
// gets through GitLab's KAS and through Caddy, both with GitLab's agentk
// of the same agent, for CI jobs and users with every access_as.
func TestDifferentialGitLabKAS(t *testing.T) {
	t.Parallel()
	s := requireGitLabAgentk(t)
	kasBin := gitlabKASBin(t, s)
	redisBin := redisServerBin(t)

	e := startGitLabEnv(t, s, gitlabEnvOptions{noAgentk: true})
	dir := testDir(t, s)
	ca, err := testca.New("differential test CA")
	if err != nil {
		t.Fatal(err)
	}
	caFile := writeSecretFile(t, dir, "ca.crt", string(ca.CAPEM))

	// Recorders first: they close after the agentk that use them stop.
	kasRec, caddyRec := diffStartRecorder(t, s, ca), diffStartRecorder(t, s, ca)
	redisAddr := diffStartRedis(t, redisBin, dir)
	gkas := startGitLabKAS(t, kasBin, dir, e, ca, caFile, redisAddr)
	kasRoute := newDiffRoute(t, s, "GitLab's KAS", gkas.proxyURL, gkas.caFile, dir, kasRec,
		diffStartGitLabAgentk(t, s, e, "gitlab-agentk-kas", dir, gkas.agentURL, "", kasRec, caFile))
	caddyRoute := newDiffRoute(t, s, "Caddy", e.caddy.proxyURL(), e.caddy.rootCAFile(), dir, caddyRec,
		diffStartGitLabAgentk(t, s, e, "gitlab-agentk-caddy", dir, e.caddy.agentURL(), e.caddy.rootCAFile(), caddyRec, caFile))

	pair := diffPair{kas: kasRoute, caddy: caddyRoute, agentkAuth: "Bearer " + s.cluster.Tokens[adminUser]}

	// A job of the agent's own project may use it without any
	// configuration (Rails authorizes it implicitly).
	probe := fakegitlab.Job{Token: kubetest.NewToken("probe job token"), JobID: 3999, PipelineID: 500, ProjectID: glProjectID,
		Username: glDeployBot.Username}
	e.gitlab.AddJob(probe)
	for _, r := range []*diffRoute{kasRoute, caddyRoute} {
		r.waitRouted(t, fmt.Sprintf("Bearer ci:%d:%s", glAgentID, probe.Token))
	}
	kasRails := newRailsClient(t, gkas.apiAddress, e.secret)

	// setConfig commits a configuration, tells both agent servers of the
	// push as Rails does, and waits until each has posted it to GitLab:
	// the same body, which is also the one the configuration's author
	// meant.
	setConfig := func(t *testing.T, content string) {
		t.Helper()
		before := len(e.gitlab.PostedConfigurations())
		e.repo.WriteFile(glConfigPath, content)
		commit := e.repo.Commit("change the agent's configuration")
		for _, rails := range []*railsClient{e.rails, kasRails} {
			_, err := notificationsrpc.NewNotificationsClient(rails.conn).GitPushEvent(rails.ctx(t, nil, "gitlab-kas"),
				&notificationsrpc.GitPushEventRequest{Event: &event.GitPushEvent{Project: &event.Project{Id: glProjectID, FullPath: glProjectPath}}})
			if err != nil {
				t.Fatalf("GitPushEvent: %v", err)
			}
		}
		// Both post the configuration of the new commit; GitLab's KAS
		// also posts the one it read when its agentk connected, and ours
		// may still be posting that one: look for the new one.
		want := railsBody(t, content)
		var ours, theirs []byte
		var seen []string
		err := kubetest.Eventually(60*time.Second, func() error {
			ours, theirs, seen = nil, nil, nil
			for _, p := range e.gitlab.PostedConfigurations()[before:] {
				seen = append(seen, p.UserAgent+": "+string(p.Body))
				if !jsonEqual(p.Body, want) {
					continue
				}
				if strings.HasPrefix(p.UserAgent, "gitlab-kas/") {
					theirs = p.Body
				} else {
					ours = p.Body
				}
			}
			if ours == nil || theirs == nil {
				return fmt.Errorf("commit %s: posted by caddy-kas: %t, by GitLab's KAS: %t", commit, ours != nil, theirs != nil)
			}
			return nil
		})
		if err != nil {
			t.Fatalf("%v; want both to post %s; posted:\n%s", err, want, strings.Join(seen, "\n"))
		}
	}
	ciConfig := func(accessAs string) string {
		c := "ci_access:\n  projects:\n  - id: " + glAppProjectPath + "\n    default_namespace: default\n"
		if accessAs != "" {
			c += "    access_as: " + accessAs + "\n"
		}
		return c
	}
	userConfig := func(accessAs string) string {
		return "user_access:\n  access_as: " + accessAs + "\n  projects: [{id: " + glProjectPath + "}]\n  groups: [{id: " + glGroupPath + "}]\n"
	}
	ciToken := func(name string) string {
		j := fakegitlab.Job{
			Token: kubetest.NewToken("ci job token: " + name), JobID: 4001, PipelineID: 501, ProjectID: glAppProjectID,
			Username:    glDeployBot.Username,
			Environment: &fakegitlab.Environment{Name: "production", Tier: "production", Slug: "prod"},
		}
		e.gitlab.AddJob(j)
		return fmt.Sprintf("ci:%d:%s", glAgentID, j.Token)
	}
	userToken := func(name string) string {
		pat := kubetest.NewToken("personal access token: " + name)
		e.gitlab.AddPersonalAccessToken(glMaria.Username, pat, "k8s_proxy")
		return patToken(glAgentID, pat)
	}
	tests := []struct {
		name     string
		config   string
		token    func(string) string
		as       []string // kubectl flags of client impersonation
		wantUser string   // Impersonate-User at the apiserver; empty: none
	}{
		{name: "CI access_as ci_job", config: ciConfig("{ci_job: {}}"), token: ciToken, wantUser: "gitlab:ci_job:4001"},
		{name: "CI access_as impersonate", config: ciConfig(`{impersonate: {username: ci-deployer, uid: u-1, groups: [deployers, auditors], extra: [{key: team, val: [platform, sre]}, {key: example.com/scope, val: ["a b"]}]}}`),
			token: ciToken, wantUser: "ci-deployer"},
		{name: "CI access_as agent", config: ciConfig("{agent: {}}"), token: ciToken},
		{name: "CI access_as absent", config: ciConfig(""), token: ciToken},
		{name: "CI access_as agent with kubectl --as", config: ciConfig("{agent: {}}"), token: ciToken,
			as: []string{"--as", aliceUser, "--as-group", "dev", "--as-group", viewersGroup, "--as-uid", "alice-uid"}, wantUser: aliceUser},
		{name: "user access_as user via PAT", config: userConfig("{user: {}}"), token: userToken, wantUser: "gitlab:user:maria"},
		{name: "user access_as agent via PAT", config: userConfig("{agent: {}}"), token: userToken},
		{name: "user access_as agent via PAT with kubectl --as", config: userConfig("{agent: {}}"), token: userToken,
			as: []string{"--as", aliceUser, "--as-group", viewersGroup}, wantUser: aliceUser},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			setConfig(t, tt.config)
			token := tt.token(tt.name)
			kasOut, kasSeen := kasRoute.whoami(t, token, tt.as...)
			caddyOut, caddySeen := caddyRoute.whoami(t, token, tt.as...)
			if a, b := diffWhoamiOutput(t, kasOut), diffWhoamiOutput(t, caddyOut); !reflect.DeepEqual(a, b) {
				t.Errorf("kubectl auth whoami -o json (creationTimestamp aside):\nthrough %s:\n%s\nthrough %s:\n%s",
					kasRoute.name, kasOut, caddyRoute.name, caddyOut)
			}
			// Not vacuous: the identity is the one the case is about.
			for _, seen := range []diffSeen{kasSeen, caddySeen} {
				if got := seen.header.Get("Impersonate-User"); got != tt.wantUser {
					t.Errorf("the apiserver got Impersonate-User %q, want %q", got, tt.wantUser)
				}
			}
			pair.compare(t, "kubectl auth whoami", kasSeen, caddySeen)
			if len(tt.as) > 0 {
				return // a plain client does not impersonate
			}
			kasSeen, caddySeen = kasRoute.review(t, token), caddyRoute.review(t, token)
			pair.compare(t, "a plain client's SelfSubjectReview", kasSeen, caddySeen)
		})
	}
}

// diffWhoamiOutput decodes the output of kubectl auth whoami -o
// json less metadata.creationTimestamp, which the apiserver sets to the
// second of the request.
func diffWhoamiOutput(t *testing.T, out string) map[string]any {
	t.Helper()
	var review map[string]any
	if err := json.Unmarshal([]byte(out), &review); err != nil {
		t.Fatalf("decode kubectl auth whoami output: %v\n%s", err, out)
	}
	if metadata, ok := review["metadata"].(map[string]any); ok {
		delete(metadata, "creationTimestamp")
	}
	return review
}
