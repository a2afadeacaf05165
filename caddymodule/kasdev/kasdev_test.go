package kasdev

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

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
	for _, want := range []string{`"handler":"kubernetes_agent"`, `"handler":"k8s_proxy"`, "state with space/agent.token", `"allow_impersonation":true`} {
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
	if s.Host != "localhost" || s.Port != "9443" || !filepath.IsAbs(s.State) {
		t.Errorf("settings %+v", s)
	}
	if _, err := newSettings(":1", `/tmp/a"b`); err == nil {
		t.Error("a state path with a quote was accepted")
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
