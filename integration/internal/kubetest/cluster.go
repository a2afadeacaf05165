// Package kubetest is the test harness shared by the integration tests and
// the fakecluster tests: one etcd and one kube-apiserver on loopback, started
// from the binaries KUBE_TESTBIN names, child processes that log to files,
// polling helpers, and the tokens the tests make. Only tests use it.
package kubetest

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// ClusterStartTimeout bounds the wait for /readyz; the apiserver is usually
// ready in about 3 s, but a loaded CI machine can be much slower.
const ClusterStartTimeout = 2 * time.Minute

// TailLineCount is how many lines of a process's output a log tail shows.
const TailLineCount = 60

// User is one identity of the apiserver's token file.
type User struct {
	Name  string
	Group string // the one group of the user: system:masters, say
}

// Options configure StartCluster.
type Options struct {
	// Users are the identities the apiserver knows; each gets a token in
	// Cluster.Tokens and a context of its name in Cluster.Kubeconfig, whose
	// current context is the first user's.
	Users []User
	// LogPrefix starts the line StartCluster prints to stderr once the
	// apiserver is ready ("integration", say).
	LogPrefix string
	// Setup, when set, runs once the apiserver is ready and the kubeconfig
	// is written; it may create RBAC objects, say. When it fails,
	// StartCluster fails.
	Setup func(*Cluster) error
}

// Cluster is one etcd and one kube-apiserver on loopback.
type Cluster struct {
	URL        string            // https://127.0.0.1:<port>
	CAFile     string            // the apiserver's self-signed CA; its certificate is valid for 127.0.0.1, not localhost
	Kubeconfig string            // a context for each of Options.Users
	Tokens     map[string]string // the apiserver's bearer token of each user
	etcd       *Process
	apiserver  *Process
}

// StartCluster starts etcd and kube-apiserver from testbin with their state
// and logs in dir. On error it stops whatever it started and the error
// carries the tail of their logs.
func StartCluster(dir, testbin string, opts Options) (_ *Cluster, err error) {
	c := &Cluster{}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w%s", err, c.logTails())
			c.Stop()
		}
	}()

	etcdDataDir := filepath.Join(dir, "etcd")
	certDir := filepath.Join(dir, "certs")
	if err := os.MkdirAll(certDir, 0o700); err != nil {
		return nil, fmt.Errorf("create kube cluster dir: %w", err)
	}
	if err := os.Mkdir(etcdDataDir, 0o700); err != nil { // etcd refuses a data dir others can read
		return nil, fmt.Errorf("create etcd data dir: %w", err)
	}

	tokens := make(map[string]string)
	var tokenCSV strings.Builder // token,user,uid,"group"
	for _, u := range opts.Users {
		tokens[u.Name] = NewToken("the kube-apiserver token of " + u.Name)
		fmt.Fprintf(&tokenCSV, "%s,%s,%s-uid,%q\n", tokens[u.Name], u.Name, u.Name, u.Group)
	}
	tokenFile := filepath.Join(dir, "tokens.csv")
	if err := os.WriteFile(tokenFile, []byte(tokenCSV.String()), 0o600); err != nil {
		return nil, fmt.Errorf("write token file: %w", err)
	}
	saKey, saPub, err := writeServiceAccountKeys(dir)
	if err != nil {
		return nil, err
	}

	ports, err := FreeLoopbackPorts(3)
	if err != nil {
		return nil, err
	}
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	c.URL = fmt.Sprintf("https://127.0.0.1:%d", ports[2])

	env := EnvironWithout("KUBECONFIG")
	c.etcd, err = StartProcess(ProcessSpec{
		Name:   "etcd",
		Binary: filepath.Join(testbin, "etcd"),
		Args: []string{
			"--name", "kt", "--data-dir", etcdDataDir,
			"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
			"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
			"--initial-cluster", "kt=" + peerURL,
			"--unsafe-no-fsync", // the data is thrown away; fsync only makes a slow disk slower
			"--log-level", "warn",
		},
		Env:    env,
		LogDir: dir,
	})
	if err != nil {
		return nil, err
	}
	c.apiserver, err = StartProcess(ProcessSpec{
		Name:   "kube-apiserver",
		Binary: filepath.Join(testbin, "kube-apiserver"),
		Args: []string{
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
			// a loopback advertise address is invalid for the endpoint
			// reconciler, which would log an error every 10 s
			"--endpoint-reconciler-type", "none",
		},
		Env:    env,
		LogDir: dir,
	})
	if err != nil {
		return nil, err
	}

	// --cert-dir makes apiserver.crt hold the serving certificate and the
	// self-signed CA that issued it.
	c.CAFile = filepath.Join(certDir, "apiserver.crt")
	if err := c.waitReady(opts.LogPrefix); err != nil {
		return nil, err
	}

	c.Kubeconfig = filepath.Join(dir, "kubeconfig")
	var users []KubeconfigUser
	for _, u := range opts.Users {
		users = append(users, KubeconfigUser{Name: u.Name, Token: tokens[u.Name]})
	}
	if err := WriteKubeconfig(c.Kubeconfig, c.URL, c.CAFile, users); err != nil {
		return nil, err
	}
	c.Tokens = tokens
	if opts.Setup != nil {
		if err := opts.Setup(c); err != nil {
			return nil, err
		}
	}
	return c, nil
}

func (c *Cluster) waitReady(logPrefix string) error {
	start := time.Now()
	err := Eventually(ClusterStartTimeout, func() error {
		for _, p := range []*Process{c.etcd, c.apiserver} {
			if !p.Running() {
				return Permanent(p.ExitError())
			}
		}
		return checkReadyz(c.URL, c.CAFile)
	})
	if err != nil {
		return fmt.Errorf("kube-apiserver is not ready: %w", err)
	}
	fmt.Fprintf(os.Stderr, "%s: kube-apiserver ready at %s after %s\n", logPrefix, c.URL, time.Since(start).Round(100*time.Millisecond))
	return nil
}

func checkReadyz(url, caFile string) error {
	pool, err := CertPoolFromFile(caFile)
	if err != nil {
		return err
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
		return fmt.Errorf("/readyz answered %s: %s", resp.Status, LastLines(string(body), 5))
	}
	return nil
}

// Stop stops the apiserver before etcd, so the apiserver never sees its
// storage vanish. It is safe on a partly started cluster.
func (c *Cluster) Stop() {
	for _, p := range []*Process{c.apiserver, c.etcd} {
		if p != nil {
			p.Stop(StopGrace)
		}
	}
}

func (c *Cluster) logTails() string {
	var b strings.Builder
	for _, p := range []*Process{c.etcd, c.apiserver} {
		if p == nil {
			continue
		}
		fmt.Fprintf(&b, "\n--- last %d lines of %s stderr ---\n%s", TailLineCount, p.Name, Redact(LastLines(strings.TrimSpace(p.Stderr()), TailLineCount)))
	}
	return b.String()
}

// writeServiceAccountKeys writes the key pair the apiserver signs and checks
// service account tokens with; the tests use none, but the apiserver
// refuses to start without it.
func writeServiceAccountKeys(dir string) (keyFile, pubFile string, err error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return "", "", fmt.Errorf("generate service account key: %w", err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return "", "", fmt.Errorf("marshal service account public key: %w", err)
	}
	keyFile = filepath.Join(dir, "sa.key")
	pubFile = filepath.Join(dir, "sa.pub")
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub})
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		return "", "", fmt.Errorf("write service account key: %w", err)
	}
	if err := os.WriteFile(pubFile, pubPEM, 0o600); err != nil {
		return "", "", fmt.Errorf("write service account public key: %w", err)
	}
	return keyFile, pubFile, nil
}

// CertPoolFromFile is a pool of the PEM certificates in the file at path.
func CertPoolFromFile(path string) (*x509.CertPool, error) {
	pemBytes, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read CA certificate: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemBytes) {
		return nil, errors.New("no certificate in " + filepath.Base(path))
	}
	return pool, nil
}

// KubeconfigUser is one user (and the context of the same name) of a
// kubeconfig.
type KubeconfigUser struct {
	Name  string
	Token string
}

// WriteKubeconfig writes a kubeconfig with one cluster and a context per
// user; the first user's context is the current one. It is JSON, which
// every kubeconfig reader accepts, so no YAML quoting can go wrong.
func WriteKubeconfig(path, server, caFile string, users []KubeconfigUser) error {
	type named struct {
		Name    string         `json:"name"`
		Cluster map[string]any `json:"cluster,omitempty"`
		User    map[string]any `json:"user,omitempty"`
		Context map[string]any `json:"context,omitempty"`
	}
	config := struct {
		APIVersion     string  `json:"apiVersion"`
		Kind           string  `json:"kind"`
		Clusters       []named `json:"clusters"`
		Users          []named `json:"users"`
		Contexts       []named `json:"contexts"`
		CurrentContext string  `json:"current-context"`
	}{
		APIVersion: "v1",
		Kind:       "Config",
		Clusters:   []named{{Name: "cluster", Cluster: map[string]any{"server": server, "certificate-authority": caFile}}},
	}
	for _, u := range users {
		config.Users = append(config.Users, named{Name: u.Name, User: map[string]any{"token": u.Token}})
		config.Contexts = append(config.Contexts, named{Name: u.Name, Context: map[string]any{"cluster": "cluster", "user": u.Name}})
	}
	if len(users) > 0 {
		config.CurrentContext = users[0].Name
	}
	b, err := json.MarshalIndent(config, "", "  ")
	if err != nil {
		return fmt.Errorf("encode kubeconfig: %w", err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	return nil
}
