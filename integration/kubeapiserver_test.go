package integration

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
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

// kubeClusterStartTimeout bounds the wait for /readyz; the apiserver is
// usually ready in about 3 s, but a loaded CI machine can be much slower.
const kubeClusterStartTimeout = 2 * time.Minute

// Identities the apiserver knows from its token file.
const (
	// adminUser is in system:masters; agent 1's agentk talks to the cluster
	// as this user, so it may impersonate.
	adminUser = "admin"
	// aliceUser is in group dev and has no rights of her own.
	aliceUser = "alice"
	// agentTwoUser is in system:masters too; agent 2's agentk uses it, so
	// `auth whoami` tells which agent a request went through.
	agentTwoUser = "agent-two"
)

// viewersGroup may read ConfigMaps and Namespaces through readerRole, so
// that a request impersonated as alice in groups dev and viewers may read but
// not write.
const (
	viewersGroup = "viewers"
	readerRole   = "kas-it-reader"
)

// kubeCluster is one etcd and one kube-apiserver on loopback, shared by all
// tests of the package.
type kubeCluster struct {
	url        string            // https://127.0.0.1:<port>
	caFile     string            // the apiserver's self-signed CA; its certificate is valid for 127.0.0.1, not localhost
	kubeconfig string            // contexts adminUser, aliceUser and agentTwoUser
	tokens     map[string]string // the apiserver's bearer token of each user
	etcd       *process
	apiserver  *process
}

// startKubeCluster starts etcd and kube-apiserver from testbin with their
// state in dir. On error it stops whatever it started and the error carries
// the tail of their logs.
func startKubeCluster(dir, testbin, kubectlBin string) (_ *kubeCluster, err error) {
	c := &kubeCluster{}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w%s", err, c.logTails())
			c.stop()
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

	identities := []struct{ name, group string }{
		{adminUser, "system:masters"},
		{aliceUser, "dev"},
		{agentTwoUser, "system:masters"},
	}
	tokens := make(map[string]string)
	var tokenCSV strings.Builder // token,user,uid,"group"
	for _, id := range identities {
		tokens[id.name] = newToken("the kube-apiserver token of " + id.name)
		fmt.Fprintf(&tokenCSV, "%s,%s,%s-uid,%q\n", tokens[id.name], id.name, id.name, id.group)
	}
	tokenFile := filepath.Join(dir, "tokens.csv")
	if err := os.WriteFile(tokenFile, []byte(tokenCSV.String()), 0o600); err != nil {
		return nil, fmt.Errorf("write token file: %w", err)
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
	c.url = fmt.Sprintf("https://127.0.0.1:%d", ports[2])

	env := environWithout("KUBECONFIG")
	c.etcd, err = startProcess(processSpec{
		name:   "etcd",
		binary: filepath.Join(testbin, "etcd"),
		args: []string{
			"--name", "kt", "--data-dir", etcdDataDir,
			"--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
			"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
			"--initial-cluster", "kt=" + peerURL,
			"--unsafe-no-fsync", // the data is thrown away; fsync only makes a slow disk slower
			"--log-level", "warn",
		},
		env:    env,
		logDir: dir,
	})
	if err != nil {
		return nil, err
	}
	c.apiserver, err = startProcess(processSpec{
		name:   "kube-apiserver",
		binary: filepath.Join(testbin, "kube-apiserver"),
		args: []string{
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
		env:    env,
		logDir: dir,
	})
	if err != nil {
		return nil, err
	}

	// --cert-dir makes apiserver.crt hold the serving certificate and the
	// self-signed CA that issued it.
	c.caFile = filepath.Join(certDir, "apiserver.crt")
	if err := c.waitReady(); err != nil {
		return nil, err
	}

	c.kubeconfig = filepath.Join(dir, "kubeconfig")
	var users []kubeconfigUser
	for _, id := range identities {
		users = append(users, kubeconfigUser{name: id.name, token: tokens[id.name]})
	}
	if err := writeKubeconfig(c.kubeconfig, c.url, c.caFile, users); err != nil {
		return nil, err
	}

	// The built-in clusterrole view is empty here: its rules are aggregated
	// by the controller-manager, which does not run. So bring a reader role.
	admin := kubectl{bin: kubectlBin, kubeconfig: c.kubeconfig, context: adminUser, home: filepath.Join(dir, "kubectl-home")}
	for _, args := range [][]string{
		{"create", "clusterrole", readerRole, "--verb", "get,list,watch", "--resource", "configmaps,namespaces"},
		{"create", "clusterrolebinding", readerRole, "--clusterrole", readerRole, "--group", viewersGroup},
	} {
		if r := admin.run(args...); r.err != nil {
			return nil, fmt.Errorf("grant group %s read access: %w", viewersGroup, r.err)
		}
	}
	c.tokens = tokens
	return c, nil
}

func (c *kubeCluster) waitReady() error {
	start := time.Now()
	err := eventually(kubeClusterStartTimeout, func() error {
		for _, p := range []*process{c.etcd, c.apiserver} {
			if !p.running() {
				return permanent(p.exitError())
			}
		}
		return checkReadyz(c.url, c.caFile)
	})
	if err != nil {
		return fmt.Errorf("kube-apiserver is not ready: %w", err)
	}
	fmt.Fprintf(os.Stderr, "integration: kube-apiserver ready at %s after %s\n", c.url, time.Since(start).Round(100*time.Millisecond))
	return nil
}

func checkReadyz(url, caFile string) error {
	pool, err := certPoolFromFile(caFile)
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
		return fmt.Errorf("/readyz answered %s: %s", resp.Status, lastLines(string(body), 5))
	}
	return nil
}

// stop stops the apiserver before etcd, so the apiserver never sees its
// storage vanish. It is safe on a partly started cluster.
func (c *kubeCluster) stop() {
	for _, p := range []*process{c.apiserver, c.etcd} {
		if p != nil {
			p.stop(stopGrace)
		}
	}
}

func (c *kubeCluster) logTails() string {
	var b strings.Builder
	for _, p := range []*process{c.etcd, c.apiserver} {
		if p == nil {
			continue
		}
		fmt.Fprintf(&b, "\n--- last %d lines of %s stderr ---\n%s", tailLineCount, p.name, redact(lastLines(strings.TrimSpace(p.stderr()), tailLineCount)))
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

func certPoolFromFile(path string) (*x509.CertPool, error) {
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

// environWithout is this process's environment less the named variables,
// so that a developer's KUBECONFIG or AGENTK_TOKEN never reaches a child.
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
