package agentk

import (
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// kubeconfigYAML builds a kubeconfig with one context "test" of cluster
// "c" and user "u", plus a context "other" of cluster "c2" (server
// https://other.example:6443) and user "u2" (token other-token).
func kubeconfigYAML(current, cluster, user string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Config
current-context: %q
preferences: {}
clusters:
- name: c
  cluster:
%s
- name: c2
  cluster:
    server: https://other.example:6443
users:
- name: u
  user:
%s
- name: u2
  user:
    token: other-token
contexts:
- name: test
  context:
    cluster: c
    user: u
    namespace: default
- name: other
  context:
    cluster: c2
    user: u2
- name: anonymous
  context:
    cluster: c
- name: dangling-user
  context:
    cluster: c
    user: missing
- name: dangling-cluster
  context:
    cluster: missing
    user: u
`, current, indent(cluster, 4), indent(user, 4))
}

func indent(s string, n int) string {
	if strings.TrimSpace(s) == "" {
		return strings.Repeat(" ", n) + "{}"
	}
	pad := strings.Repeat(" ", n)
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i, l := range lines {
		lines[i] = pad + l
	}
	return strings.Join(lines, "\n")
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func TestLoadKubeconfig(t *testing.T) {
	ca := newTestCA(t)
	certPEM, keyPEM := ca.clientCert(t, "agentk")

	type files map[string][]byte // relative to the kubeconfig's directory
	tests := []struct {
		name        string
		current     string
		context     string
		cluster     string
		user        string
		files       files
		wantErr     error  // sentinel, checked with errors.Is
		wantErrText string // part of the message
		check       func(t *testing.T, dir string, s clusterSpec)
	}{
		{
			name:    "token",
			cluster: "server: https://k8s.example:6443/",
			user:    "token: abc",
			check: func(t *testing.T, _ string, s clusterSpec) {
				wantAuth(t, s.cred, "Bearer abc")
				if got := s.server.String(); got != "https://k8s.example:6443/" {
					t.Errorf("server = %s", got)
				}
				if s.tls.RootCAs != nil || s.tls.InsecureSkipVerify {
					t.Errorf("TLS should use the system roots and verify")
				}
			},
		},
		{
			name:    "tokenFile relative to the kubeconfig wins over token",
			cluster: "server: https://k8s.example",
			user:    "token: inline\ntokenFile: secrets/token",
			files:   files{"secrets/token": []byte("  from-file\n")},
			check: func(t *testing.T, dir string, s clusterSpec) {
				wantAuth(t, s.cred, "Bearer from-file")
				if ft, ok := s.cred.(*fileToken); !ok || ft.path != filepath.Join(dir, "secrets/token") {
					t.Errorf("credential = %v, want the token file in the kubeconfig's directory", s.cred)
				}
			},
		},
		{
			name:    "basic auth",
			cluster: "server: https://k8s.example",
			user:    "username: admin\npassword: secret",
			check: func(t *testing.T, _ string, s clusterSpec) {
				wantAuth(t, s.cred, "Basic "+b64([]byte("admin:secret")))
			},
		},
		{
			name:    "server path prefix is kept",
			cluster: "server: https://rancher.example/k8s/clusters/c-1",
			user:    "token: t",
			check: func(t *testing.T, _ string, s clusterSpec) {
				if got := s.server.Path; got != "/k8s/clusters/c-1" {
					t.Errorf("server path = %q", got)
				}
			},
		},
		{
			name:    "CA data, TLS server name",
			cluster: fmt.Sprintf("server: https://10.0.0.1\ncertificate-authority-data: %s\ntls-server-name: kubernetes.default", b64(ca.certPEM)),
			check: func(t *testing.T, _ string, s clusterSpec) {
				if s.tls.RootCAs == nil || !s.tls.RootCAs.Equal(poolOf(ca.certPEM)) {
					t.Errorf("RootCAs is not the CA from the kubeconfig")
				}
				if s.tls.ServerName != "kubernetes.default" {
					t.Errorf("ServerName = %q", s.tls.ServerName)
				}
				wantAuth(t, s.cred, "")
			},
		},
		{
			name:    "CA file relative to the kubeconfig",
			cluster: "server: https://k8s.example\ncertificate-authority: pki/ca.crt",
			files:   files{"pki/ca.crt": ca.certPEM},
			check: func(t *testing.T, _ string, s clusterSpec) {
				if s.tls.RootCAs == nil || !s.tls.RootCAs.Equal(poolOf(ca.certPEM)) {
					t.Errorf("RootCAs is not the CA file")
				}
			},
		},
		{
			name:    "insecure",
			cluster: "server: https://k8s.example\ninsecure-skip-tls-verify: true",
			check: func(t *testing.T, _ string, s clusterSpec) {
				if !s.tls.InsecureSkipVerify {
					t.Errorf("InsecureSkipVerify is false")
				}
			},
		},
		{
			name:    "client certificate inline",
			cluster: "server: https://k8s.example",
			user:    fmt.Sprintf("client-certificate-data: %s\nclient-key-data: %s", b64(certPEM), b64(keyPEM)),
			check:   wantClientCert,
		},
		{
			name:    "client certificate files, relative",
			cluster: "server: https://k8s.example",
			user:    "client-certificate: pki/agentk.crt\nclient-key: pki/agentk.key",
			files:   files{"pki/agentk.crt": certPEM, "pki/agentk.key": keyPEM},
			check:   wantClientCert,
		},
		{
			name:    "context flag wins over current-context",
			context: "other",
			cluster: "server: https://k8s.example",
			user:    "token: t",
			check: func(t *testing.T, _ string, s clusterSpec) {
				if s.server.Host != "other.example:6443" {
					t.Errorf("server = %s, want the other context's", s.server)
				}
				wantAuth(t, s.cred, "Bearer other-token")
			},
		},
		{
			name:    "context without user is anonymous",
			context: "anonymous",
			cluster: "server: https://k8s.example",
			user:    "token: t",
			check: func(t *testing.T, _ string, s clusterSpec) {
				wantAuth(t, s.cred, "")
			},
		},
		{name: "missing context", context: "nope", cluster: "server: https://k8s.example", wantErrText: `context "nope" not found`},
		{name: "no current context", current: "-", cluster: "server: https://k8s.example", wantErrText: "no current-context"},
		{name: "missing user", context: "dangling-user", cluster: "server: https://k8s.example", wantErrText: `user "missing" not found`},
		{name: "missing cluster", context: "dangling-cluster", cluster: "server: https://k8s.example", wantErrText: `cluster "missing" not found`},
		{name: "no server", cluster: "insecure-skip-tls-verify: true", wantErrText: "no server URL"},
		{name: "bad server scheme", cluster: "server: ftp://k8s.example", wantErrText: "scheme must be https or http"},
		{
			name:    "exec rejected",
			cluster: "server: https://k8s.example",
			user:    "exec:\n  apiVersion: client.authentication.k8s.io/v1\n  command: aws",
			wantErr: ErrUnsupportedAuth,
		},
		{
			name:    "auth-provider rejected",
			cluster: "server: https://k8s.example",
			user:    "auth-provider:\n  name: oidc",
			wantErr: ErrUnsupportedAuth,
		},
		{name: "as rejected", cluster: "server: https://k8s.example", user: "token: t\nas: alice", wantErr: ErrUnsupportedImpersonation},
		{name: "as-groups rejected", cluster: "server: https://k8s.example", user: "token: t\nas-groups: [dev]", wantErr: ErrUnsupportedImpersonation},
		{
			name:        "CA with insecure rejected",
			cluster:     fmt.Sprintf("server: https://k8s.example\ninsecure-skip-tls-verify: true\ncertificate-authority-data: %s", b64(ca.certPEM)),
			wantErrText: "cannot be used together",
		},
		{
			name:        "certificate without key rejected",
			cluster:     "server: https://k8s.example",
			user:        fmt.Sprintf("client-certificate-data: %s", b64(certPEM)),
			wantErrText: "without client-key",
		},
		{
			name:        "token with basic auth rejected",
			cluster:     "server: https://k8s.example",
			user:        "token: t\nusername: u\npassword: p",
			wantErrText: "cannot be used together",
		},
		{
			name:        "missing token file",
			cluster:     "server: https://k8s.example",
			user:        "tokenFile: nope",
			wantErr:     os.ErrNotExist,
			wantErrText: "reading token file",
		},
		{
			name:    "empty token file",
			cluster: "server: https://k8s.example",
			user:    "tokenFile: token",
			files:   files{"token": []byte("\n")},
			wantErr: errEmptyToken,
		},
		{
			name:        "CA file without certificates",
			cluster:     "server: https://k8s.example\ncertificate-authority: ca.crt",
			files:       files{"ca.crt": []byte("not PEM")},
			wantErrText: "no PEM certificate",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			for name, data := range tt.files {
				writeFile(t, filepath.Join(dir, name), data)
			}
			current := "test"
			if tt.current == "-" {
				current = ""
			}
			path := filepath.Join(dir, "kubeconfig")
			writeFile(t, path, []byte(kubeconfigYAML(current, tt.cluster, tt.user)))

			spec, err := kubeconfigSpec(path, KubeconfigOverrides{Context: tt.context}, clockOptions{})
			if tt.wantErr != nil || tt.wantErrText != "" {
				checkError(t, err, tt.wantErr, tt.wantErrText)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, dir, spec)
		})
	}
}

func TestLoadKubeconfigErrorMessages(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "kubeconfig")
	writeFile(t, path, []byte(kubeconfigYAML("test", "server: https://k8s.example", "exec:\n  command: gke-gcloud-auth-plugin")))
	_, err := LoadKubeconfig(path, "")
	if err == nil {
		t.Fatal("no error for an exec user")
	}
	for _, want := range []string{path, `user "u"`, "not supported by agentk; use a token or client certificate"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

func TestLoadKubeconfigJSON(t *testing.T) {
	// kubectl accepts JSON kubeconfigs, and so must agentk.
	dir := t.TempDir()
	path := filepath.Join(dir, "kubeconfig")
	writeFile(t, path, []byte(`{"apiVersion":"v1","kind":"Config",
		"clusters":[{"name":"c","cluster":{"server":"https://k8s.example"}}],
		"users":[{"name":"admin","user":{"token":"json-token"}}],
		"contexts":[{"name":"admin","context":{"cluster":"c","user":"admin"}}],
		"current-context":"admin"}`))
	spec, err := kubeconfigSpec(path, KubeconfigOverrides{Context: "admin"}, clockOptions{})
	if err != nil {
		t.Fatal(err)
	}
	wantAuth(t, spec.cred, "Bearer json-token")
}

func TestKubeconfigTokenFileRotation(t *testing.T) {
	dir := t.TempDir()
	tokenPath := filepath.Join(dir, "token")
	writeFile(t, tokenPath, []byte("one\n"))
	path := filepath.Join(dir, "kubeconfig")
	writeFile(t, path, []byte(kubeconfigYAML("test", "server: https://k8s.example", "tokenFile: token")))

	clock := newFakeClock()
	spec, err := kubeconfigSpec(path, KubeconfigOverrides{}, clockOptions{now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		name    string
		write   string // new file content, "" to leave it
		remove  bool
		advance time.Duration
		refused bool // the apiserver answered 401 to the last token
		want    string
	}{
		{name: "initial", want: "Bearer one"},
		{name: "rotated file is not read again within the interval", write: "two", advance: 59 * time.Second, want: "Bearer one"},
		{name: "re-read after the interval", advance: time.Second, want: "Bearer two"},
		{name: "re-read at once after a 401", write: "three", refused: true, want: "Bearer three"},
		{name: "cached again after the re-read", write: "four", want: "Bearer three"},
		{name: "last good token kept while the file is missing", remove: true, advance: time.Hour, want: "Bearer three"},
		{name: "file back", write: "five", want: "Bearer five"},
	}
	for _, st := range steps {
		if st.write != "" {
			writeFile(t, tokenPath, []byte(st.write))
		}
		if st.remove {
			os.Remove(tokenPath)
		}
		clock.Advance(st.advance)
		if st.refused {
			spec.cred.refused()
		}
		wantAuth(t, spec.cred, st.want)
		if t.Failed() {
			t.Fatalf("step %q failed", st.name)
		}
	}
}

// TestKubeconfigClientCertificateHandshake checks that the client
// certificate and CA of a kubeconfig work against a real TLS server, and
// that the cluster's transport speaks HTTP/2 when the server offers it.
func TestKubeconfigClientCertificateHandshake(t *testing.T) {
	ca := newTestCA(t)
	certPEM, keyPEM := ca.clientCert(t, "agentk")
	var gotProto, gotCN string
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotProto = r.Proto
		gotCN = r.TLS.PeerCertificates[0].Subject.CommonName
		io.WriteString(w, `{"gitVersion":"v1.33.0"}`)
	}))
	requireClientCerts(srv, ca)
	srv.EnableHTTP2 = true
	srv.StartTLS()
	t.Cleanup(srv.Close)

	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "ca.crt"), serverCAPEM(srv))
	writeFile(t, filepath.Join(dir, "agentk.crt"), certPEM)
	writeFile(t, filepath.Join(dir, "agentk.key"), keyPEM)
	path := filepath.Join(dir, "kubeconfig")
	writeFile(t, path, []byte(kubeconfigYAML("test",
		"server: "+srv.URL+"\ncertificate-authority: ca.crt",
		"client-certificate: agentk.crt\nclient-key: agentk.key")))

	c, err := LoadKubeconfig(path, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.CloseIdleConnections)
	v, err := c.ServerVersion(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if v.GitVersion != "v1.33.0" {
		t.Errorf("version = %q", v)
	}
	if gotCN != "agentk" {
		t.Errorf("client certificate CN = %q, want agentk", gotCN)
	}
	if gotProto != "HTTP/2.0" {
		t.Errorf("protocol = %s, want HTTP/2.0", gotProto)
	}
}

func wantAuth(t *testing.T, c credential, want string) {
	t.Helper()
	got, err := c.authorization()
	if err != nil {
		t.Fatalf("authorization: %v", err)
	}
	if got != want {
		t.Errorf("Authorization = %q, want %q", got, want)
	}
}

func wantClientCert(t *testing.T, _ string, s clusterSpec) {
	t.Helper()
	if len(s.tls.Certificates) != 1 || s.tls.Certificates[0].Leaf == nil || s.tls.Certificates[0].Leaf.Subject.CommonName != "agentk" {
		t.Errorf("client certificate not loaded: %d certificates", len(s.tls.Certificates))
	}
	wantAuth(t, s.cred, "")
}

func TestKubeconfigOverrides(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t)
	writeFile(t, filepath.Join(dir, "ca.pem"), ca.certPEM)
	path := filepath.Join(dir, "kubeconfig")
	writeFile(t, path, []byte(kubeconfigYAML("test",
		"server: https://k8s.example\ncertificate-authority-data: "+b64(ca.certPEM),
		"tokenFile: token")))
	writeFile(t, filepath.Join(dir, "token"), []byte("file-token"))
	t.Chdir(dir) // override paths are relative to the working directory

	tests := []struct {
		name        string
		o           KubeconfigOverrides
		wantServer  string
		wantAuth    string
		wantCA      bool
		wantSNI     string
		wantErrText string
	}{
		{name: "none", wantServer: "https://k8s.example", wantAuth: "Bearer file-token", wantCA: true},
		{name: "--cluster and --user", o: KubeconfigOverrides{Cluster: "c2", User: "u2"}, wantServer: "https://other.example:6443", wantAuth: "Bearer other-token"},
		{name: "--context", o: KubeconfigOverrides{Context: "other"}, wantServer: "https://other.example:6443", wantAuth: "Bearer other-token"},
		{name: "--server and --token", o: KubeconfigOverrides{Server: "https://override.example", Token: "flag-token"}, wantServer: "https://override.example", wantAuth: "Bearer flag-token", wantCA: true},
		{name: "--certificate-authority relative to the working directory", o: KubeconfigOverrides{Context: "other", CertificateAuthority: "ca.pem"}, wantServer: "https://other.example:6443", wantAuth: "Bearer other-token", wantCA: true},
		{name: "--insecure-skip-tls-verify drops the kubeconfig's CA", o: KubeconfigOverrides{InsecureSkipTLSVerify: true}, wantServer: "https://k8s.example", wantAuth: "Bearer file-token"},
		{name: "--tls-server-name", o: KubeconfigOverrides{TLSServerName: "kubernetes.default"}, wantServer: "https://k8s.example", wantAuth: "Bearer file-token", wantCA: true, wantSNI: "kubernetes.default"},
		{name: "--cluster of a missing entry", o: KubeconfigOverrides{Cluster: "nope"}, wantErrText: `cluster "nope" not found`},
		{name: "--client-certificate without a key", o: KubeconfigOverrides{ClientCertificate: "ca.pem"}, wantErrText: "client-certificate given without client-key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			spec, err := kubeconfigSpec(path, tt.o, clockOptions{})
			if tt.wantErrText != "" {
				checkError(t, err, nil, tt.wantErrText)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if spec.server.String() != tt.wantServer {
				t.Errorf("server = %s, want %s", spec.server, tt.wantServer)
			}
			wantAuth(t, spec.cred, tt.wantAuth)
			if got := spec.tls.RootCAs != nil; got != tt.wantCA {
				t.Errorf("has CA = %v, want %v", got, tt.wantCA)
			}
			if spec.tls.ServerName != tt.wantSNI {
				t.Errorf("server name = %q, want %q", spec.tls.ServerName, tt.wantSNI)
			}
			if spec.tls.InsecureSkipVerify != tt.o.InsecureSkipTLSVerify {
				t.Errorf("insecure = %v", spec.tls.InsecureSkipVerify)
			}
		})
	}
}
