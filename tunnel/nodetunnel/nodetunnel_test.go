package nodetunnel_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"

	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel/h2tunneltest"
	"github.com/caddy-kas/caddy-kas/tunnel/nodetunnel"
)

var secret = bytes.Repeat([]byte("k"), nodetunnel.SecretSize)

const agentID = 7

// node is a test node: a store of its own tunnels and its private
// listener, plain HTTP/2 on loopback.
type node struct {
	store  *tunnel.Store
	server *nodetunnel.Server
	url    string
}

func newNode(t *testing.T) *node {
	t.Helper()
	n := &node{store: tunnel.NewStore()}
	n.server = &nodetunnel.Server{Secret: secret, Local: n.store}
	srv := httptest.NewServer(h2c.NewHandler(n.server, &http2.Server{}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { n.store.Close() })
	n.url = "grpc://" + strings.TrimPrefix(srv.URL, "http://")
	return n
}

// connect gives the node a tunnel of the agent whose cluster is h.
func (n *node) connect(t *testing.T, h http.Handler) *h2tunneltest.Pair {
	t.Helper()
	p := h2tunneltest.NewPair(t, h, h2tunneltest.Options{Agent: tunnel.AgentInfo{ID: agentID}})
	remove := n.store.Add(p.KAS)
	t.Cleanup(remove)
	return p
}

// registry is a NodeLister the test sets.
type registry struct {
	mu      sync.Mutex // guards urls and changed
	urls    []string
	changed chan struct{}
}

func newRegistry(urls ...string) *registry {
	return &registry{urls: urls, changed: make(chan struct{})}
}

func (r *registry) Nodes(context.Context, int64) ([]string, <-chan struct{}, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.urls...), r.changed, nil
}

func (r *registry) set(urls ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.urls = urls
	close(r.changed)
	r.changed = make(chan struct{})
}

// forwarder is a node without tunnels that forwards to others.
func forwarder(reg nodetunnel.NodeLister) *tunnel.Router {
	f := &nodetunnel.Finder{Nodes: reg, Client: &nodetunnel.Client{Secret: secret}}
	return &tunnel.Router{Local: tunnel.NewStore(), Remote: f.Find}
}

func find(t *testing.T, r *tunnel.Router) tunnel.Tunnel {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	tun, err := r.Find(ctx, agentID)
	if err != nil {
		t.Fatal(err)
	}
	return tun
}

// cluster answers as the test needs: /echo echoes the body, /stream
// writes a line, flushed, each time the test asks for one, /whoami the
// identity the agent got.
type cluster struct {
	lines chan string
}

func (c *cluster) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	req, err := h2tunnel.DecodeRequest(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	switch {
	case req.Upgrade != "":
		h2tunnel.SetSwitched(w.Header(), "chosen")
		w.WriteHeader(http.StatusOK)
		http.NewResponseController(w).Flush()
		io.Copy(w, r.Body)
	case r.URL.Path == "/echo":
		w.Header().Set("X-Method", r.Method)
		io.Copy(w, r.Body)
	case r.URL.Path == "/stream":
		w.WriteHeader(http.StatusOK)
		http.NewResponseController(w).Flush()
		for line := range c.lines {
			io.WriteString(w, line+"\n")
			http.NewResponseController(w).Flush()
		}
	case r.URL.Path == "/whoami":
		json.NewEncoder(w).Encode(struct {
			ID    *identity.Identity
			Query string
		}{req.Identity, r.URL.RawQuery})
	default:
		http.NotFound(w, r)
	}
}

func TestForwardedRequests(t *testing.T) {
	b := newNode(t)
	c := &cluster{lines: make(chan string)}
	b.connect(t, c)
	a := forwarder(newRegistry(b.url))

	t.Run("large bodies both ways", func(t *testing.T) {
		body := make([]byte, 5<<20)
		rand.Read(body)
		for _, length := range []int64{int64(len(body)), -1} {
			req, _ := http.NewRequest(http.MethodPut, "http://agent/echo", bytes.NewReader(body))
			req.ContentLength = length
			resp, err := find(t, a).RoundTrip(&tunnel.Request{HTTP: req})
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || !bytes.Equal(got, body) || resp.Header.Get("X-Method") != http.MethodPut {
				t.Fatalf("length %d: echo of %d bytes: got %d, %v, %v", length, len(body), len(got), err, resp.Header)
			}
		}
	})

	t.Run("identity and query", func(t *testing.T) {
		id := &identity.Identity{Username: "gitlab:user:maria", Groups: []string{"gitlab:user"}, Extra: map[string][]string{"agent.gitlab.com/id": {"7"}}}
		req, _ := http.NewRequest(http.MethodGet, "http://agent/whoami?watch=1&x=%2F", nil)
		resp, err := find(t, a).RoundTrip(&tunnel.Request{HTTP: req, Identity: id})
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var got struct {
			ID    *identity.Identity
			Query string
		}
		if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
			t.Fatal(err)
		}
		if got.ID == nil || got.ID.Username != id.Username || got.ID.Extra["agent.gitlab.com/id"][0] != "7" || got.Query != "watch=1&x=%2F" {
			t.Errorf("the agent got %+v", got)
		}
	})

	t.Run("each flushed line arrives at once", func(t *testing.T) {
		defer close(c.lines) // ends the cluster's stream
		req, _ := http.NewRequest(http.MethodGet, "http://agent/stream", nil)
		resp, err := find(t, a).RoundTrip(&tunnel.Request{HTTP: req})
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		buf := make([]byte, 64)
		for _, line := range []string{"ADDED", "MODIFIED"} {
			c.lines <- line // the next line is written only after this one was read
			n, err := io.ReadAtLeast(resp.Body, buf, len(line)+1)
			if err != nil || string(buf[:n]) != line+"\n" {
				t.Fatalf("got %q, %v; want %q", buf[:n], err, line)
			}
		}
	})

	t.Run("upgrade", func(t *testing.T) {
		clientBytes, toAgent := io.Pipe()
		req, _ := http.NewRequest(http.MethodPost, "http://agent/exec", clientBytes)
		resp, err := find(t, a).RoundTrip(&tunnel.Request{HTTP: req, Upgrade: "offered"})
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "chosen" {
			t.Fatalf("switched answer %s %v", resp.Status, resp.Header)
		}
		go func() {
			io.WriteString(toAgent, "ping")
			toAgent.Close() // the half-close reaches the cluster
		}()
		if b, err := io.ReadAll(resp.Body); err != nil || string(b) != "ping" {
			t.Errorf("switched body %q, %v", b, err)
		}
	})
}

func TestAgentMovesOrIsNowhere(t *testing.T) {
	b, c := newNode(t), newNode(t)
	reg := newRegistry(b.url, c.url) // b's entry is stale: only c has a tunnel
	c.connect(t, &cluster{})
	a := forwarder(reg)
	for range 5 { // whatever the order the finder tries them in
		tun := find(t, a)
		if got := tun.(*nodetunnel.Remote).Node(); got != c.url {
			t.Fatalf("routed to %s, want %s", got, c.url)
		}
		tun.Close()
	}

	// No node has one: Find waits until ctx ends.
	reg.set(b.url)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, err := a.Find(ctx, agentID); !errors.Is(err, tunnel.ErrNoConnection) {
		t.Fatalf("Find with no tunnel anywhere: %v", err)
	}

	// An agent that connects to b while a request waits is found at once
	// the registry says so.
	found := make(chan tunnel.Tunnel, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		tun, _ := a.Find(ctx, agentID)
		found <- tun
	}()
	b.connect(t, &cluster{})
	reg.set(b.url)
	tun := <-found
	if tun == nil || tun.(*nodetunnel.Remote).Node() != b.url {
		t.Fatalf("found %v", tun)
	}
	tun.Close()
}

func TestDeadNodeCostsAStagger(t *testing.T) {
	c := newNode(t)
	c.connect(t, &cluster{})
	// A node that is gone: nothing listens there any more.
	gone := httptest.NewServer(http.NotFoundHandler())
	goneURL := "grpc://" + strings.TrimPrefix(gone.URL, "http://")
	gone.Close()
	a := forwarder(newRegistry(goneURL, c.url))
	for range 3 {
		find(t, a).Close()
	}
}

func TestServerRefuses(t *testing.T) {
	b := newNode(t)
	b.connect(t, &cluster{})
	other := bytes.Repeat([]byte("x"), nodetunnel.SecretSize)
	for _, tc := range []struct {
		name   string
		secret []byte
		agent  int64
		want   string
	}{
		{"wrong secret", other, agentID, "refused: 401"},
		{"agent it does not hold", secret, agentID + 1, "no tunnel"},
	} {
		cl := &nodetunnel.Client{Secret: tc.secret}
		_, err := cl.Open(context.Background(), b.url, tc.agent)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
	// An expired token.
	cl := &nodetunnel.Client{Secret: secret, Now: func() time.Time { return time.Now().Add(-time.Minute) }}
	if _, err := cl.Open(context.Background(), b.url, agentID); err == nil || !strings.Contains(err.Error(), "401") {
		t.Errorf("expired token: %v", err)
	}
	// No token at all.
	u := "http://" + strings.TrimPrefix(b.url, "grpc://") + nodetunnel.Path
	tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}}
	req, _ := http.NewRequest(http.MethodPost, u, http.NoBody)
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("no token: %s", resp.Status)
	}
}

// TestForwardedOverTLS: nodes that serve their private listener with TLS
// (grpcs://) and a unix socket (unix://) forward the same way.
func TestForwardedOverTLS(t *testing.T) {
	store := tunnel.NewStore()
	t.Cleanup(func() { store.Close() })
	srv := httptest.NewUnstartedServer(&nodetunnel.Server{Secret: secret, Local: store})
	srv.EnableHTTP2 = true
	srv.StartTLS()
	t.Cleanup(srv.Close)
	p := h2tunneltest.NewPair(t, &cluster{}, h2tunneltest.Options{Agent: tunnel.AgentInfo{ID: agentID}})
	t.Cleanup(store.Add(p.KAS))

	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate())
	f := &nodetunnel.Finder{
		Nodes:  newRegistry("grpcs://" + strings.TrimPrefix(srv.URL, "https://")),
		Client: &nodetunnel.Client{Secret: secret, TLS: &tls.Config{RootCAs: roots, ServerName: "example.com"}},
	}
	a := &tunnel.Router{Local: tunnel.NewStore(), Remote: f.Find}
	req, _ := http.NewRequest(http.MethodPost, "http://agent/echo", strings.NewReader("over tls"))
	resp, err := find(t, a).RoundTrip(&tunnel.Request{HTTP: req})
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "over tls" {
		t.Errorf("echo over TLS: %q", body)
	}

	// A unix socket.
	dir, err := os.MkdirTemp("", "nodetunnel")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "private.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	us := &http.Server{Handler: h2c.NewHandler(&nodetunnel.Server{Secret: secret, Local: store}, &http2.Server{})}
	go us.Serve(lis)
	t.Cleanup(func() { us.Close() })
	f.Nodes = newRegistry("unix://" + sock)
	req, _ = http.NewRequest(http.MethodPost, "http://agent/echo", strings.NewReader("over a socket"))
	resp, err = find(t, a).RoundTrip(&tunnel.Request{HTTP: req})
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "over a socket" {
		t.Errorf("echo over a unix socket: %q", body)
	}
}
