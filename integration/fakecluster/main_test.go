package fakecluster_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"k8s.io/klog/v2"
)

// The tests start one etcd and one kube-apiserver for the package, from the
// directory KUBE_TESTBIN names, with the same flags as the integration
// harness in the parent directory (integration/kubeapiserver_test.go), and
// point the real kubectl straight at a fakecluster.Cluster in front of it.

// apiserverStartTimeout bounds the wait for /readyz; a loaded CI machine can
// be much slower than the usual few seconds.
const apiserverStartTimeout = 2 * time.Minute

// stopGrace is how long a process may take to exit after SIGTERM.
const stopGrace = 10 * time.Second

// kubeAPIServer is the package's etcd and kube-apiserver on loopback.
type kubeAPIServer struct {
	url        string // https://127.0.0.1:<port>
	caFile     string // the apiserver's self-signed CA
	adminToken string // user admin in group system:masters
	aliceToken string // user alice in group dev, with no rights of her own
	etcd       *process
	apiserver  *process
}

var (
	shared     *kubeAPIServer
	skipReason string
)

// requireAPIServer returns the package's apiserver or skips t.
func requireAPIServer(t *testing.T) *kubeAPIServer {
	t.Helper()
	// go test caches results keyed on the environment variables tests read,
	// but only inside tests: read them here so a skipped run's cached
	// result does not stand in for a real one.
	_, _ = os.Getenv("KUBE_TESTBIN"), os.Getenv("CI")
	if skipReason != "" {
		t.Skip(skipReason)
	}
	return shared
}

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	flag.Parse()
	// The Kubernetes libraries log through klog to stderr, among others an
	// error each time a client closes a stream connection, as a real
	// apiserver does. FAKECLUSTER_KLOG=1 keeps those logs.
	if os.Getenv("FAKECLUSTER_KLOG") == "" {
		klog.LogToStderr(false)
		klog.SetOutput(io.Discard)
	}
	testbin := os.Getenv("KUBE_TESTBIN")
	switch {
	case testbin == "" && os.Getenv("CI") == "true":
		fmt.Fprintln(os.Stderr, "fakecluster: KUBE_TESTBIN is not set, but CI=true requires these tests to run; "+
			"hack/test.sh builds kube-apiserver and etcd and sets it")
		return 1
	case testbin == "":
		skipReason = "KUBE_TESTBIN is not set; hack/test.sh builds kube-apiserver and etcd and runs these tests"
		return m.Run()
	case testing.Short():
		skipReason = "these tests start a real kube-apiserver; skipped in -short mode"
		return m.Run()
	}
	if _, err := exec.LookPath("kubectl"); err != nil {
		fmt.Fprintf(os.Stderr, "fakecluster: these tests drive the real kubectl, and none is on PATH: %v\n", err)
		return 1
	}
	dir, err := os.MkdirTemp("", "fakecluster-test-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "fakecluster: %v\n", err)
		return 1
	}
	defer os.RemoveAll(dir)
	s, err := startKubeAPIServer(dir, testbin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "fakecluster: %v\n", err)
		return 1
	}
	defer s.stop()
	shared = s
	return m.Run()
}

// startKubeAPIServer starts etcd and kube-apiserver from testbin with their
// state in dir. On error it stops what it started; the error carries the
// tail of their logs.
func startKubeAPIServer(dir, testbin string) (_ *kubeAPIServer, err error) {
	s := &kubeAPIServer{}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w%s", err, s.logTails())
			s.stop()
		}
	}()
	etcdDataDir := filepath.Join(dir, "etcd")
	certDir := filepath.Join(dir, "certs")
	if err := os.MkdirAll(certDir, 0o700); err != nil {
		return nil, err
	}
	if err := os.Mkdir(etcdDataDir, 0o700); err != nil { // etcd refuses a data dir others can read
		return nil, err
	}
	s.adminToken, s.aliceToken = randomHex(16), randomHex(16)
	tokenFile := filepath.Join(dir, "tokens.csv")
	tokens := fmt.Sprintf("%s,admin,admin-uid,\"system:masters\"\n%s,alice,alice-uid,\"dev\"\n", s.adminToken, s.aliceToken)
	if err := os.WriteFile(tokenFile, []byte(tokens), 0o600); err != nil {
		return nil, err
	}
	saKey, saPub, err := writeServiceAccountKeys(dir)
	if err != nil {
		return nil, err
	}
	ports, err := freeLoopbackPorts(3)
	if err != nil {
		return nil, err
	}
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	s.url = fmt.Sprintf("https://127.0.0.1:%d", ports[2])
	env := environWithout("KUBECONFIG")

	s.etcd, err = startProcess("etcd", filepath.Join(testbin, "etcd"), dir, env,
		"--name", "kt", "--data-dir", etcdDataDir,
		"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "kt="+peerURL,
		"--unsafe-no-fsync",
		"--log-level", "warn",
	)
	if err != nil {
		return nil, err
	}
	s.apiserver, err = startProcess("kube-apiserver", filepath.Join(testbin, "kube-apiserver"), dir, env,
		"--etcd-servers", etcdURL,
		"--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
		"--secure-port", fmt.Sprint(ports[2]),
		"--cert-dir", certDir,
		"--token-auth-file", tokenFile,
		"--authorization-mode", "RBAC",
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", saPub,
		"--service-account-signing-key-file", saKey,
		"--service-cluster-ip-range", "10.0.0.0/24",
		"--endpoint-reconciler-type", "none",
	)
	if err != nil {
		return nil, err
	}
	// --cert-dir makes apiserver.crt hold the self-signed serving certificate
	s.caFile = filepath.Join(certDir, "apiserver.crt")

	start := time.Now()
	deadline := start.Add(apiserverStartTimeout)
	for {
		for _, p := range []*process{s.etcd, s.apiserver} {
			if !p.running() {
				return nil, fmt.Errorf("%s exited: %v", p.name, p.waitErr)
			}
		}
		err := checkReadyz(s.url, s.caFile)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("kube-apiserver is not ready after %s: %w", apiserverStartTimeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	fmt.Fprintf(os.Stderr, "fakecluster: kube-apiserver ready at %s after %s\n", s.url, time.Since(start).Round(100*time.Millisecond))
	return s, nil
}

func checkReadyz(url, caFile string) error {
	pemBytes, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemBytes) {
		return errors.New("no certificate in the apiserver's CA file yet")
	}
	client := &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	defer client.CloseIdleConnections()
	resp, err := client.Get(url + "/readyz")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/readyz answered %s: %s", resp.Status, body)
	}
	return nil
}

// stop stops the apiserver before etcd.
func (s *kubeAPIServer) stop() {
	for _, p := range []*process{s.apiserver, s.etcd} {
		if p != nil {
			p.stop()
		}
	}
}

func (s *kubeAPIServer) logTails() string {
	var b strings.Builder
	for _, p := range []*process{s.etcd, s.apiserver} {
		if p != nil {
			fmt.Fprintf(&b, "\n--- last lines of %s stderr ---\n%s", p.name, lastLines(readFile(p.stderrPath), 40))
		}
	}
	return b.String()
}

func writeServiceAccountKeys(dir string) (keyFile, pubFile string, err error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return "", "", err
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return "", "", err
	}
	keyFile, pubFile = filepath.Join(dir, "sa.key"), filepath.Join(dir, "sa.pub")
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), 0o600); err != nil {
		return "", "", err
	}
	if err := os.WriteFile(pubFile, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o600); err != nil {
		return "", "", err
	}
	return keyFile, pubFile, nil
}

// process is a child process whose output goes to files.
type process struct {
	name       string
	cmd        *exec.Cmd
	stdoutPath string
	stderrPath string
	exited     chan struct{}
	waitErr    error
}

func startProcess(name, binary, logDir string, env []string, args ...string) (*process, error) {
	p := &process{
		name:       name,
		stdoutPath: filepath.Join(logDir, name+".stdout"),
		stderrPath: filepath.Join(logDir, name+".stderr"),
		exited:     make(chan struct{}),
	}
	stdout, err := os.Create(p.stdoutPath)
	if err != nil {
		return nil, err
	}
	defer stdout.Close()
	stderr, err := os.Create(p.stderrPath)
	if err != nil {
		return nil, err
	}
	defer stderr.Close()
	p.cmd = exec.Command(binary, args...)
	p.cmd.Env = env
	p.cmd.Stdout, p.cmd.Stderr = stdout, stderr
	p.cmd.SysProcAttr = childProcAttr()
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

func (p *process) running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM, then SIGKILL after stopGrace, and waits for the exit.
func (p *process) stop() {
	if !p.running() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(stopGrace):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

func readFile(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("<%v>", err)
	}
	return string(b)
}

func lastLines(text string, n int) string {
	lines := strings.Split(strings.TrimSpace(text), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func freeLoopbackPorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// environWithout is this process's environment less the named variables.
func environWithout(names ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		drop := false
		for _, n := range names {
			drop = drop || name == n
		}
		if !drop {
			env = append(env, kv)
		}
	}
	return env
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// uniqueName is prefix with a random suffix; namespaces never finish
// deleting without a controller-manager, so each test makes new ones.
func uniqueName(prefix string) string { return prefix + "-" + randomHex(4) }

// within is a context that ends after d or with t.
func within(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
