package agentk

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeAPIServer is a TLS "kube-apiserver" that accepts one bearer token at
// a time and records the tokens it saw.
type fakeAPIServer struct {
	srv *httptest.Server

	mu    sync.Mutex // guards valid and seen
	valid string
	seen  []string
}

func newFakeAPIServer(t *testing.T, valid string) *fakeAPIServer {
	f := &fakeAPIServer{valid: valid}
	f.srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		token, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		f.mu.Lock()
		f.seen = append(f.seen, token)
		ok := token == f.valid
		f.mu.Unlock()
		if !ok {
			http.Error(w, "Unauthorized", http.StatusUnauthorized)
			return
		}
		io.WriteString(w, `{"gitVersion":"v1.32.13"}`)
	}))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeAPIServer) rotate(valid string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.valid = valid
}

func (f *fakeAPIServer) lastSeen() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.seen[len(f.seen)-1]
}

// serviceAccountDir writes a fake service account mount for srv.
func serviceAccountDir(t *testing.T, srv *httptest.Server, token string) string {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "ca.crt"), serverCAPEM(srv))
	writeFile(t, filepath.Join(dir, "token"), []byte(token))
	writeFile(t, filepath.Join(dir, "namespace"), []byte("agentk"))
	return dir
}

func hostPort(t *testing.T, rawURL string) (string, string) {
	u, err := url.Parse(rawURL)
	if err != nil {
		t.Fatal(err)
	}
	host, port, err := net.SplitHostPort(u.Host)
	if err != nil {
		t.Fatal(err)
	}
	return host, port
}

func TestInClusterTokenRotation(t *testing.T) {
	api := newFakeAPIServer(t, "sa-1")
	dir := serviceAccountDir(t, api.srv, "sa-1\n")
	host, port := hostPort(t, api.srv.URL)
	clock := newFakeClock()
	c, err := inCluster(dir, host, port, clockOptions{now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.CloseIdleConnections)
	if want := "https://" + net.JoinHostPort(host, port); c.Server() != want {
		t.Errorf("server = %s, want %s", c.Server(), want)
	}

	get := func() (int, string) {
		t.Helper()
		req, _ := http.NewRequestWithContext(context.Background(), http.MethodGet, c.Server()+"/version", nil)
		req.Header.Set("Authorization", "Bearer from-the-caller")
		resp, err := c.RoundTripper().RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode, api.lastSeen()
	}

	steps := []struct {
		name      string
		kubelet   string        // kubelet writes a new token
		apiserver string        // the apiserver now accepts only this token
		advance   time.Duration // time passes
		want      int
		wantToken string
	}{
		{name: "initial token; the caller's is replaced", want: 200, wantToken: "sa-1"},
		{name: "kubelet rotates; old token still valid and cached", kubelet: "sa-2", advance: 30 * time.Second, want: 200, wantToken: "sa-1"},
		{name: "a minute later the new token is read", advance: 30 * time.Second, apiserver: "sa-2", want: 200, wantToken: "sa-2"},
		{name: "token revoked early: one 401", kubelet: "sa-3", apiserver: "sa-3", want: 401, wantToken: "sa-2"},
		{name: "re-read at once after the 401", want: 200, wantToken: "sa-3"},
	}
	for _, st := range steps {
		if st.kubelet != "" {
			writeFile(t, filepath.Join(dir, "token"), []byte(st.kubelet+"\n"))
		}
		if st.apiserver != "" {
			api.rotate(st.apiserver)
		}
		clock.Advance(st.advance)
		code, token := get()
		if code != st.want || token != st.wantToken {
			t.Fatalf("%s: status %d with token %q, want %d with %q", st.name, code, token, st.want, st.wantToken)
		}
	}
}

func TestInClusterErrors(t *testing.T) {
	api := newFakeAPIServer(t, "t")
	tests := []struct {
		name       string
		host, port string
		setup      func(dir string)
		wantErr    error
		wantText   string
	}{
		{name: "not in a cluster", wantErr: ErrNotInCluster},
		{name: "no CA", host: "10.0.0.1", port: "443", setup: func(dir string) {}, wantText: "reading the cluster CA"},
		{
			name: "no token", host: "10.0.0.1", port: "443",
			setup:    func(dir string) { writeFile(t, filepath.Join(dir, "ca.crt"), serverCAPEM(api.srv)) },
			wantText: "reading token file",
		},
		{
			name: "IPv6 service address", host: "fd00::1", port: "443",
			setup: func(dir string) {
				writeFile(t, filepath.Join(dir, "ca.crt"), serverCAPEM(api.srv))
				writeFile(t, filepath.Join(dir, "token"), []byte("t"))
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if tt.setup != nil {
				tt.setup(dir)
			}
			c, err := InCluster(dir, tt.host, tt.port)
			if tt.wantErr == nil && tt.wantText == "" {
				if err != nil {
					t.Fatal(err)
				}
				if c.Server() != "https://[fd00::1]:443" {
					t.Errorf("server = %s", c.Server())
				}
				return
			}
			checkError(t, err, tt.wantErr, tt.wantText)
		})
	}
}
