package kasdev

import (
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	"sigs.k8s.io/yaml"

	_ "github.com/caddy-kas/caddy-kas/caddymodule/k8sproxy"
	_ "github.com/caddy-kas/caddy-kas/caddymodule/kubernetesagent"
)

func TestEmbeddedConfigAdapts(t *testing.T) {
	s, err := newSettings("localhost:8443", filepath.Join(t.TempDir(), "state with space"))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := s.config()
	if err != nil {
		t.Fatal(err)
	}
	var parsed map[string]any
	if err := json.Unmarshal(cfg, &parsed); err != nil {
		t.Fatal(err)
	}
	text := string(cfg)
	for _, want := range []string{`"handler":"kubernetes_agent"`, `"handler":"k8s_proxy"`, "state with space/agent.token", `"allow_impersonation":true`,
		// Loopback only, and no UDP for HTTP/3.
		`"listen":["127.0.0.1:8443"`, `"protocols":["h1","h2"]`} {
		if !strings.Contains(text, want) {
			t.Errorf("adapted config lacks %s:\n%s", want, text)
		}
	}
	// The two handlers must come before respond, or respond would answer
	// every request.
	if a, r := strings.Index(text, `"handler":"kubernetes_agent"`), strings.Index(text, `"handler":"static_response"`); a > r {
		t.Errorf("kubernetes_agent is ordered after respond:\n%s", text)
	}
}

func TestNewSettings(t *testing.T) {
	if _, err := newSettings("8443", ""); err == nil {
		t.Error("a listen address without a port was accepted")
	}
	s, err := newSettings(":9443", "rel")
	if err != nil {
		t.Fatal(err)
	}
	if s.Host != "localhost" || s.Port != "9443" || !filepath.IsAbs(s.State) || s.Bind[0] != "127.0.0.1" {
		t.Errorf("settings %+v", s)
	}
	for listen, wantBind := range map[string]string{"127.0.0.1:8443": "127.0.0.1", "0.0.0.0:8443": "0.0.0.0", "[::1]:8443": "[::1]"} {
		if s, err := newSettings(listen, ""); err != nil || !slices.Equal(s.Bind, []string{wantBind}) {
			t.Errorf("newSettings(%q) binds %v, %v; want %s", listen, s.Bind, err, wantBind)
		}
	}
	if _, err := newSettings(":1", `/tmp/a"b`); err == nil {
		t.Error("a state path with a quote was accepted")
	}
}

func TestCheckPortFree(t *testing.T) {
	// Taken the way Caddy takes its ports: with SO_REUSEPORT where there is
	// one, which lets a second such listener share the port.
	addr, err := caddy.ParseNetworkAddress("tcp/127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := addr.Listen(t.Context(), 0, net.ListenConfig{})
	if err != nil {
		t.Fatal(err)
	}
	l := ln.(net.Listener)
	defer l.Close()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	s, err := newSettings("127.0.0.1:"+port, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.checkPortFree(); err == nil || !strings.Contains(err.Error(), "is another kas-dev or server running there?") {
		t.Errorf("checkPortFree with the port taken = %v, want it refused", err)
	}
	l.Close()
	if err := s.checkPortFree(); err != nil {
		t.Errorf("checkPortFree with the port free = %v", err)
	}
}

func TestEnsureTokenKeepsToken(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.token")
	first, err := ensureToken(path)
	if err != nil || len(first) != 64 {
		t.Fatalf("ensureToken = %q, %v", first, err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("token file mode %v, want 0600", fi.Mode().Perm())
	}
	again, err := ensureToken(path)
	if err != nil || again != first {
		t.Errorf("second ensureToken = %q, %v; want the same token", again, err)
	}
}

func TestKubeconfig(t *testing.T) {
	s := settings{Host: "localhost", Port: "8443", State: "/state"}
	var kc struct {
		Clusters []struct {
			Cluster struct {
				Server string `json:"server"`
				CA     string `json:"certificate-authority"`
			} `json:"cluster"`
		} `json:"clusters"`
		Users []struct {
			Name string `json:"name"`
			User struct {
				Token string `json:"token"`
			} `json:"user"`
		} `json:"users"`
		CurrentContext string `json:"current-context"`
	}
	if err := yaml.Unmarshal(s.kubeconfig("/ca.crt", "tok"), &kc); err != nil {
		t.Fatal(err)
	}
	if kc.Clusters[0].Cluster.Server != "https://localhost:8443/-/kubernetes-agent/k8s-proxy/" ||
		kc.Clusters[0].Cluster.CA != "/ca.crt" || kc.Users[0].Name != "agent:1" ||
		kc.Users[0].User.Token != "pat:1:tok" || kc.CurrentContext != "kas-dev:dev-agent" {
		t.Errorf("kubeconfig %+v", kc)
	}
}
