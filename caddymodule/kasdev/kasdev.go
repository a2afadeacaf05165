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

It listens on the --listen address only (for localhost, the loopback
addresses), over TCP (HTTP/1.1 and HTTP/2), and refuses to start when
something listens on that port already.

For production, write a Caddyfile (see Caddyfile.example) and use "caddy run".
`,
		CobraFunc: func(cmd *cobra.Command) {
			cmd.Flags().String("listen", "localhost:8443", "HTTPS address to serve on (localhost: the loopback addresses only)")
			cmd.Flags().String("state", "", "directory for the generated tokens and kubeconfig (default: kas-dev in Caddy's data directory)")
			cmd.RunE = caddycmd.WrapCommandFuncForCobra(run)
		},
	})
}

// settings fill the embedded Caddyfile template.
type settings struct {
	Host, Port, State string
	// Bind are the addresses to listen on, as Caddy's bind directive
	// takes them.
	Bind []string
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
	if err := s.checkPortFree(); err != nil {
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
	return settings{Host: host, Port: port, State: state, Bind: bindAddresses(host)}, nil
}

// bindAddresses returns where to listen for host: loopback for localhost
// (IPv4, and IPv6 where this machine has it), else host itself. Caddy
// would otherwise listen on every interface whatever the site's host.
func bindAddresses(host string) []string {
	if host != "localhost" {
		if strings.Contains(host, ":") {
			return []string{"[" + host + "]"}
		}
		return []string{host}
	}
	addrs := []string{"127.0.0.1"}
	if l, err := net.Listen("tcp", "[::1]:0"); err == nil {
		l.Close()
		addrs = append(addrs, "[::1]")
	}
	return addrs
}

// checkPortFree fails if something listens on the port already. Caddy
// listens with SO_REUSEPORT, so a second kas-dev on the port of a first
// would start without a word and take a share of its connections; a
// listener without that option cannot share the port, so opening one for
// a moment tells.
func (s settings) checkPortFree() error {
	for _, b := range s.Bind {
		addr := net.JoinHostPort(strings.Trim(b, "[]"), s.Port)
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("cannot listen on %s; is another kas-dev or server running there? Stop it, or give another --listen: %w", addr, err)
		}
		l.Close()
	}
	return nil
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
