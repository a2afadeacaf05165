// Package kasdev adds the "caddy kas-dev" command: the agent server on
// embedded defaults (standalone tokens, in-memory tunnel store, Caddy's
// internal CA), with no GitLab, no Redis and no configuration to write.
package kasdev

import (
	"bytes"
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"text/template"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
)

//go:embed kasdev.Caddyfile
var caddyfileTemplate string

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "kas-dev",
		Usage: "[--listen <host:port>] [--state <dir>]",
		Short: "Runs the GitLab agent server on embedded defaults, to try it out",
		Long: `
Runs the GitLab agent server for Kubernetes with embedded defaults: one agent
(id 1) and one user token that may reach it, both generated on first start and
kept in the state directory, an in-memory tunnel registry, and HTTPS from
Caddy's internal CA. No GitLab and no Redis are needed.

It prints the agentk command line that connects a cluster, and writes a
kubeconfig that reaches that cluster through the proxy.

For production, write a Caddyfile (see Caddyfile.example) and use "caddy run".
`,
		CobraFunc: func(cmd *cobra.Command) {
			cmd.Flags().String("listen", "localhost:8443", "HTTPS address to serve on")
			cmd.Flags().String("state", "", "directory for the generated tokens and kubeconfig (default: kas-dev in Caddy's data directory)")
			cmd.RunE = caddycmd.WrapCommandFuncForCobra(run)
		},
	})
}

// settings fill the embedded Caddyfile template.
type settings struct {
	Host, Port, State string
}

func run(fl caddycmd.Flags) (int, error) {
	caddy.TrapSignals()
	s, err := newSettings(fl.String("listen"), fl.String("state"))
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if err := os.MkdirAll(s.State, 0o700); err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("creating state directory: %w", err)
	}
	if _, err := ensureToken(filepath.Join(s.State, "agent.token")); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	userToken, err := ensureToken(filepath.Join(s.State, "user.token"))
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	cfg, err := s.config()
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if err := caddy.Load(cfg, true); err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("starting: %w", err)
	}
	rootCA := filepath.Join(caddy.AppDataDir(), "pki", "authorities", "local", "root.crt")
	kubeconfig := filepath.Join(s.State, "kubeconfig")
	if err := os.WriteFile(kubeconfig, s.kubeconfig(rootCA, userToken), 0o600); err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("writing kubeconfig: %w", err)
	}
	s.printInstructions(os.Stdout, rootCA, kubeconfig)
	select {} // serve until a signal ends the process
}

func newSettings(listen, state string) (settings, error) {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return settings{}, fmt.Errorf("--listen %q: %w", listen, err)
	}
	if host == "" {
		host = "localhost"
	}
	if state == "" {
		state = filepath.Join(caddy.AppDataDir(), "kas-dev")
	}
	state, err = filepath.Abs(state)
	if err != nil {
		return settings{}, fmt.Errorf("--state: %w", err)
	}
	if strings.ContainsAny(state, "\"\n{}") {
		return settings{}, fmt.Errorf("--state %q: quotes, braces and newlines are not supported in the path", state)
	}
	return settings{Host: host, Port: port, State: state}, nil
}

// caddyfile renders the embedded Caddyfile.
func (s settings) caddyfile() ([]byte, error) {
	var buf bytes.Buffer
	if err := template.Must(template.New("Caddyfile").Parse(caddyfileTemplate)).Execute(&buf, s); err != nil {
		return nil, fmt.Errorf("rendering embedded Caddyfile: %w", err)
	}
	return buf.Bytes(), nil
}

// config returns the embedded configuration as Caddy JSON.
func (s settings) config() ([]byte, error) {
	text, err := s.caddyfile()
	if err != nil {
		return nil, err
	}
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(text, map[string]any{"filename": "kas-dev"})
	if err != nil {
		return nil, fmt.Errorf("adapting embedded Caddyfile: %w", err)
	}
	for _, w := range warnings {
		fmt.Fprintf(os.Stderr, "kas-dev: %s\n", w.String())
	}
	return cfg, nil
}

// ensureToken returns the token in path, creating a random one first if
// the file does not exist, so that restarts keep the same tokens.
func ensureToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		if t := strings.TrimSpace(string(b)); t != "" {
			return t, nil
		}
		return "", fmt.Errorf("token file %s is empty; delete it to get a new token", path)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("reading token: %w", err)
	}
	raw := make([]byte, 32)
	rand.Read(raw)
	t := hex.EncodeToString(raw)
	if err := os.WriteFile(path, []byte(t+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("writing token: %w", err)
	}
	return t, nil
}

func (s settings) proxyURL() string {
	return fmt.Sprintf("https://%s/-/kubernetes-agent/k8s-proxy/", net.JoinHostPort(s.Host, s.Port))
}

// kubeconfig returns a kubeconfig that reaches agent 1 through the proxy,
// shaped like the ones GitLab generates (user agent:<id>).
func (s settings) kubeconfig(rootCA, userToken string) []byte {
	return []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: kas-dev
  cluster:
    server: %q
    certificate-authority: %q
users:
- name: agent:1
  user:
    token: %q
contexts:
- name: kas-dev:dev-agent
  context:
    cluster: kas-dev
    user: agent:1
current-context: kas-dev:dev-agent
`, s.proxyURL(), rootCA, "pat:1:"+userToken))
}

func (s settings) printInstructions(w io.Writer, rootCA, kubeconfig string) {
	agentURL := fmt.Sprintf("wss://%s/-/kubernetes-agent/", net.JoinHostPort(s.Host, s.Port))
	fmt.Fprintf(w, `
caddy-kas is running on embedded defaults: standalone tokens, in-memory tunnel store, no GitLab, no Redis.

1. Connect a cluster: run agentk (agent 1, "dev-agent") where your kubeconfig reaches the cluster:

   POD_NAMESPACE=default POD_NAME=agentk-dev go run ./cmd/agentk \
     --kas-address %s \
     --token-file %s \
     --kas-ca-cert-file %s \
     --kubeconfig "$HOME/.kube/config" \
     --observability-listen-address 127.0.0.1:8080

2. Use the cluster through the agent server:

   kubectl --kubeconfig %s get namespaces

   (server %s, token pat:1:<the token in %s>)

Stop with Ctrl-C.
`, agentURL, filepath.Join(s.State, "agent.token"), rootCA, kubeconfig, s.proxyURL(), filepath.Join(s.State, "user.token"))
}
