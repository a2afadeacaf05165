package agentk

import (
	"bufio"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/kubeproxy"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel/h2tunneltest"
)

// switchingUpstream is an "apiserver" that switches protocols the way the
// kubelet's streaming server does: a 101, then its own protocol on the raw
// connection. Upgrade "echo" answers each line and says "bye" when the
// client half-closes; "sink" answers the SHA-256 of everything the client
// sent once it half-closes; "refuse" is a 400, as an apiserver that does
// not speak WebSocket answers.
type switchingUpstream struct {
	srv *httptest.Server

	mu      sync.Mutex // guards headers
	headers []http.Header
}

func newSwitchingUpstream(t *testing.T) *switchingUpstream {
	u := &switchingUpstream{}
	// Like a real apiserver it offers HTTP/2; upgrades must still go out
	// over HTTP/1.1.
	u.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		u.headers = append(u.headers, r.Header.Clone())
		u.mu.Unlock()
		mode := r.Header.Get("Upgrade")
		if mode == "refuse" || r.Header.Get("Connection") != "Upgrade" {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusBadRequest)
			io.WriteString(w, `{"kind":"Status","code":400,"message":"upgrade refused"}`)
			return
		}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Errorf("upstream hijack: %v", err)
			return
		}
		defer conn.Close()
		fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n", mode)
		brw.Flush()
		switch mode {
		case "echo":
			for {
				line, err := brw.ReadString('\n')
				if err != nil {
					break // the client half-closed
				}
				brw.WriteString("echo: " + line)
				brw.Flush()
			}
			brw.WriteString("bye\n")
			brw.Flush()
		case "sink":
			h := sha256.New()
			io.Copy(h, brw)
			fmt.Fprintf(brw, "%x\n", h.Sum(nil))
			brw.Flush()
		}
	}))
	u.srv.EnableHTTP2 = true
	u.srv.StartTLS()
	t.Cleanup(u.srv.Close)
	return u
}

func (u *switchingUpstream) lastHeader() http.Header {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.headers[len(u.headers)-1]
}

// upgradePath is kubectl -> k8s proxy -> tunnel -> agentk -> upstream, all
// in-process but over real loopback connections.
type upgradePath struct {
	proxyAddr string
	upstream  *switchingUpstream
	agent     *h2tunneltest.Pair
}

func newUpgradePath(t *testing.T) *upgradePath {
	up := newSwitchingUpstream(t)
	server, err := parseServerURL(up.srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	tlsConfig := up.srv.Client().Transport.(*http.Transport).TLSClientConfig.Clone()
	c := newCluster(clusterSpec{server: server, tls: tlsConfig, cred: staticToken("agentk-token")})
	t.Cleanup(c.CloseIdleConnections)
	agent := h2tunneltest.NewPair(t, newProxy(c, zap.NewNop(), newMetrics()), h2tunneltest.Options{Agent: tunnel.AgentInfo{ID: 1}})
	store := tunnel.NewStore()
	t.Cleanup(store.Add(agent.KAS))
	auth, err := kubeproxy.NewStaticAuthenticator([]kubeproxy.User{
		{Name: "plain", Token: "plain-token", Agents: []int64{1}},
		{Name: "dev", Token: "dev-token", Agents: []int64{1}, Impersonate: &identity.Identity{Username: "alice", Groups: []string{"dev"}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	proxy := httptest.NewServer(&kubeproxy.Proxy{Prefix: "/k8s/", Auth: auth, Router: tunnel.NewRouter(store)})
	t.Cleanup(proxy.Close)
	return &upgradePath{proxyAddr: proxy.Listener.Addr().String(), upstream: up, agent: agent}
}

// dial sends an upgrade request as kubectl does (HTTP/1.1 on a raw
// connection) and returns the connection and the response.
func (p *upgradePath) dial(t *testing.T, token, upgrade string) (*net.TCPConn, *bufio.Reader, *http.Response) {
	t.Helper()
	conn, err := net.Dial("tcp", p.proxyAddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	fmt.Fprintf(conn, "POST /k8s/api/v1/namespaces/ns/pods/p/exec?command=sh&stdin=true HTTP/1.1\r\nHost: kas\r\n"+
		"Authorization: Bearer pat:1:%s\r\nConnection: Upgrade\r\nUpgrade: %s\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n", token, upgrade)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	return conn.(*net.TCPConn), br, resp
}

func TestUpgradeThroughTunnel(t *testing.T) {
	p := newUpgradePath(t)
	conn, br, resp := p.dial(t, "dev-token", "echo")
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "echo" ||
		resp.Header.Get("X-Stream-Protocol-Version") != "v4.channel.k8s.io" {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("response %s %v %s, want 101 with the upstream's headers", resp.Status, resp.Header, b)
	}
	for _, k := range []string{h2tunnel.UpgradeHeader, h2tunnel.UpgradeStatusHeader} {
		if resp.Header.Get(k) != "" {
			t.Errorf("the client got the tunnel's %s header", k)
		}
	}
	for i := range 3 {
		fmt.Fprintf(conn, "line %d\n", i)
		got, err := br.ReadString('\n')
		if want := fmt.Sprintf("echo: line %d\n", i); err != nil || got != want {
			t.Fatalf("read %q, %v; want %q", got, err, want)
		}
	}
	conn.CloseWrite() // half-close: the upstream must see EOF and may still answer
	rest, err := io.ReadAll(br)
	if err != nil || string(rest) != "bye\n" {
		t.Errorf("after half-close: %q, %v; want \"bye\\n\" then EOF", rest, err)
	}

	h := p.upstream.lastHeader()
	if h.Get("Authorization") != "Bearer agentk-token" || h.Get("Impersonate-User") != "alice" || h.Get("Impersonate-Group") != "dev" {
		t.Errorf("upstream got Authorization %q, Impersonate-User %q, Impersonate-Group %q",
			h.Get("Authorization"), h.Get("Impersonate-User"), h.Get("Impersonate-Group"))
	}
	for _, k := range []string{h2tunnel.UpgradeHeader, h2tunnel.IdentityHeader} {
		if h.Get(k) != "" {
			t.Errorf("the upstream got the tunnel's %s header", k)
		}
	}
}

func TestUpgradeLargeStreamIsExact(t *testing.T) {
	p := newUpgradePath(t)
	conn, br, resp := p.dial(t, "plain-token", "sink")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status %s", resp.Status)
	}
	const size = 50 << 20
	h := sha256.New()
	if _, err := io.CopyN(io.MultiWriter(conn, h), rand.Reader, size); err != nil {
		t.Fatal(err)
	}
	conn.CloseWrite()
	got, err := br.ReadString('\n')
	if want := fmt.Sprintf("%x\n", h.Sum(nil)); err != nil || got != want {
		t.Errorf("upstream's digest %q, %v; want %q", got, err, want)
	}
}

func TestUpgradeRefusedPassesThrough(t *testing.T) {
	p := newUpgradePath(t)
	_, br, resp := p.dial(t, "plain-token", "refuse")
	if resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("response %s %v, want the upstream's 400", resp.Status, resp.Header)
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<10))
	if string(body) != `{"kind":"Status","code":400,"message":"upgrade refused"}` {
		t.Errorf("body %q", body)
	}
	_ = br
}

func TestUpgradeAgentLost(t *testing.T) {
	p := newUpgradePath(t)
	conn, br, resp := p.dial(t, "plain-token", "echo")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status %s", resp.Status)
	}
	p.agent.AgentNet.Conn.Close() // agentk vanishes mid-session
	done := make(chan error)
	go func() {
		_, err := io.ReadAll(br)
		done <- err
	}()
	select {
	case <-done: // EOF or an error: either way the session ended
	case <-time.After(30 * time.Second):
		t.Fatal("switched connection still open 30s after the agent vanished")
	}
	if _, err := conn.Write([]byte(strings.Repeat("x", 1<<20))); err == nil {
		// A write may still land in the socket buffer; the read above is
		// what proves the session ended. Nothing to assert here.
		_ = err
	}
}
