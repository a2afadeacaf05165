package integration

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"text/template"
	"time"

	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

const (
	// caddyStartTimeout bounds the wait until a new Caddy serves HTTPS.
	caddyStartTimeout = time.Minute
	// caddyReloadTimeout bounds one `caddy reload`.
	caddyReloadTimeout = time.Minute
	// httpTimeout bounds one raw HTTP request; the slowest expected one waits
	// for wait_for_agent (2 s) first.
	httpTimeout = time.Minute
)

// kasAgent is one `agent` block of kubernetes_agent.
type kasAgent struct {
	id       int
	name     string
	token    string
	tokenEnv string // when set, the Caddyfile reads the token from this environment variable of Caddy, else from a token_file
}

// kasUser is one `user` block of k8s_proxy.
type kasUser struct {
	name               string
	token              string
	agents             []int
	impersonate        []string // username, then groups; empty: no impersonate line
	allowImpersonation bool
}

// kasConfig is what a test chooses of a Caddyfile; startCaddy adds the rest.
type kasConfig struct {
	waitForAgent string
	agents       []kasAgent
	users        []kasUser
	// serverOptions, when set, is the body of a global "servers { }"
	// block (Caddy's server timeouts, say).
	serverOptions string
	// gitlab, when set, puts Caddy in GitLab mode: agents and users then
	// come from GitLab, and agents and users above must be empty.
	gitlab *gitlabOptions
	// sites are more sites on the same HTTPS port, after the main one.
	sites []caddySite
	// kasExtra is more of the kas global option's block (redis,
	// private_api).
	kasExtra string
	// connectionsPerToken, when not zero, is kubernetes_agent's
	// connections_per_token_per_minute (standalone mode).
	connectionsPerToken int
}

// caddySite is a site block https://<host>:<HTTPS port> with a certificate
// from Caddy's internal CA; body is the rest of the block.
type caddySite struct {
	host, body string
}

// gitlabOptions is the "gitlab" block of the kas global option.
type gitlabOptions struct {
	url, secretFile, caFile, externalURL string
	apiListen                            string
	// extra lines of the block (cache TTLs, usage_reporting_period)
	extra []string
}

func (c kasConfig) agent(t testing.TB, id int) kasAgent {
	t.Helper()
	for _, a := range c.agents {
		if a.id == id {
			return a
		}
	}
	t.Fatalf("the test's config has no agent %d", id)
	return kasAgent{}
}

func (c kasConfig) user(t testing.TB, name string) kasUser {
	t.Helper()
	for _, u := range c.users {
		if u.name == name {
			return u
		}
	}
	t.Fatalf("the test's config has no user %q", name)
	return kasUser{}
}

// standardConfig is the configuration most tests use: agent 1 with its token
// in a file, agent 2 with its token in Caddy's environment, and three users:
//   - dev may reach agent 1 only, and is impersonated as alice in groups dev
//     and viewers;
//   - ops may reach agents 1 and 2 with the agent's own identity, and may
//     impersonate (kubectl --as);
//   - plain may reach agent 1 with the agent's own identity, and may not
//     impersonate.
func standardConfig() kasConfig {
	return kasConfig{
		waitForAgent: "2s",
		agents: []kasAgent{
			{id: 1, name: "agent-one", token: kubetest.NewToken("the token of agent 1")},
			{id: 2, name: "agent-two", token: kubetest.NewToken("the token of agent 2"), tokenEnv: "AGENT2_TOKEN"},
		},
		users: []kasUser{
			{name: "dev", token: kubetest.NewToken("the token of user dev"), agents: []int{1}, impersonate: []string{aliceUser, "dev", viewersGroup}},
			{name: "ops", token: kubetest.NewToken("the token of user ops"), agents: []int{1, 2}, allowImpersonation: true},
			{name: "plain", token: kubetest.NewToken("the token of user plain"), agents: []int{1}},
		},
	}
}

// caddyfileTemplate follows the syntax of the project's contract. Token
// values never appear in it: they are in files or in Caddy's environment.
var caddyfileTemplate = template.Must(template.New("Caddyfile").Funcs(template.FuncMap{
	"join": func(ids []int) string { return strings.Trim(fmt.Sprint(ids), "[]") },
}).Parse(`{
	admin localhost:{{.AdminPort}}
	# the site would otherwise listen on every interface
	default_bind 127.0.0.1
	skip_install_trust
	storage file_system {{.StateDir}}/caddy
	http_port {{.HTTPPort}}
	https_port {{.HTTPSPort}}
	grace_period 1s
	log {
		level DEBUG
	}
{{- if .ServerOptions}}
	servers {
		{{.ServerOptions}}
	}
{{- end}}
{{- if or .GitLab .KasExtra}}
	kas {
{{- with .GitLab}}
		gitlab {
			url {{.URL}}
			secret_file {{.SecretFile}}
{{- if .CAFile}}
			ca_file {{.CAFile}}
{{- end}}
{{- if .ExternalURL}}
			external_url {{.ExternalURL}}
{{- end}}
{{- if .APIListen}}
			api_listen {{.APIListen}}
{{- end}}
{{- range .Extra}}
			{{.}}
{{- end}}
		}
{{- end}}
{{- if .KasExtra}}
		{{.KasExtra}}
{{- end}}
	}
{{- end}}
}

https://localhost:{{.HTTPSPort}}{{if .OwnPort}}, https://localhost:{{.OwnPort}}{{end}} {
	tls internal
{{- if .GitLab}}
	kubernetes_agent
	k8s_proxy {
		wait_for_agent {{.WaitForAgent}}
	}
{{- else}}
	kubernetes_agent {
{{- if .ConnectionsPerToken}}
		connections_per_token_per_minute {{.ConnectionsPerToken}}
{{- end}}
{{- range .Agents}}
		agent {{.ID}} {{.Name}} {
{{- if .TokenEnv}}
			token {env.{{.TokenEnv}}}
{{- else}}
			token_file {{.TokenFile}}
{{- end}}
		}
{{- end}}
	}
	k8s_proxy {
		wait_for_agent {{.WaitForAgent}}
{{- range .Users}}
		user {{.Name}} {
			token_file {{.TokenFile}}
			agents {{join .Agents}}
{{- if .Impersonate}}
			impersonate {{.Impersonate}}
{{- end}}
{{- if .AllowImpersonation}}
			allow_impersonation
{{- end}}
		}
{{- end}}
	}
{{- end}}
	respond "not kas" 404
}
{{- range .Sites}}

https://{{.Host}}:{{$.HTTPSPort}} {
	tls internal
	{{.Body}}
}
{{- end}}
`))

// caddyServer is one running Caddy with the kas modules and its state.
type caddyServer struct {
	suite      *suite
	dir        string // state dir: Caddyfiles, token files, Caddy's storage, logs
	adminPort  int
	httpPort   int
	httpsPort  int
	ownPort    int // a second HTTPS port of the site, only this Caddy's when it shares httpsPort; 0: none
	config     kasConfig
	proc       *kubetest.Process
	env        []string // the environment of caddy run, and of caddy reload
	caddyfiles int      // how many Caddyfiles were written, to name the next one
}

// startCaddy starts a Caddy for t with config and waits until it serves
// HTTPS with a certificate from its internal CA.
func startCaddy(t *testing.T, s *suite, config kasConfig) *caddyServer {
	t.Helper()
	return launchCaddy(t, s, config, nil, false)
}

// startCaddyNode starts a Caddy like startCaddy, with a port of its own
// beside its HTTPS port. With beside set, it listens on the HTTPS port of
// that Caddy too (both set SO_REUSEPORT, so the kernel spreads new
// connections over both, as a load balancer would spread them over two
// nodes) and has a copy of its internal CA, so that clients of the one
// trust the other. Only the CA: with the other's certificate in its
// storage too, Caddy v2.11.9 would emit its first certificate event while
// its TLS app starts, a data race of Caddy's own that the race detector
// reports now and then.
func startCaddyNode(t *testing.T, s *suite, config kasConfig, beside *caddyServer) *caddyServer {
	t.Helper()
	return launchCaddy(t, s, config, beside, true)
}

func launchCaddy(t *testing.T, s *suite, config kasConfig, beside *caddyServer, ownPort bool) *caddyServer {
	t.Helper()
	ports := mustFreeLoopbackPorts(t, 4)
	c := &caddyServer{
		suite:     s,
		dir:       testDir(t, s),
		adminPort: ports[0],
		httpPort:  ports[1],
		httpsPort: ports[2],
		ownPort:   ports[3],
		config:    config,
	}
	if !ownPort {
		c.ownPort = 0
	}
	if beside != nil {
		c.httpsPort = beside.httpsPort
		pki := filepath.Join("caddy", "pki")
		if err := os.CopyFS(filepath.Join(c.dir, pki), os.DirFS(filepath.Join(beside.dir, pki))); err != nil {
			t.Fatalf("copying the internal CA of the Caddy beside: %v", err)
		}
	}
	home := filepath.Join(c.dir, "home")
	// Caddy saves its config and looks for its data under these; keep both
	// out of the developer's home.
	c.env = append(kubetest.EnvironWithout("HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME"),
		"HOME="+home, "XDG_CONFIG_HOME="+filepath.Join(home, "config"), "XDG_DATA_HOME="+filepath.Join(home, "data"))
	for _, a := range config.agents {
		if a.tokenEnv != "" {
			c.env = append(c.env, a.tokenEnv+"="+a.token)
		}
	}

	caddyfile := c.writeCaddyfile(t, config)
	c.proc = startOwnedProcess(t, kubetest.ProcessSpec{
		Name:   "caddy",
		Binary: s.caddyBin,
		Args:   []string{"run", "--config", caddyfile, "--adapter", "caddyfile"},
		Env:    c.env,
		LogDir: c.dir,
	})
	err := kubetest.Eventually(caddyStartTimeout, func() error {
		if !c.proc.Running() {
			return kubetest.Permanent(c.proc.ExitError())
		}
		if _, err := os.Stat(c.rootCAFile()); err != nil {
			return fmt.Errorf("no internal root CA yet: %w", err)
		}
		return c.checkServesHTTPS()
	})
	if err != nil {
		t.Fatalf("caddy did not start: %v", err)
	}
	return c
}

// checkServesHTTPS asks for a page outside the kas paths, which the Caddyfile
// answers itself.
func (c *caddyServer) checkServesHTTPS() error {
	client, err := c.newHTTPClient()
	if err != nil {
		return err
	}
	defer client.CloseIdleConnections()
	resp, err := client.Get(c.siteURL() + "/not-kas")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusNotFound || string(body) != "not kas" {
		return kubetest.Permanent(fmt.Errorf("GET /not-kas answered %s %q, want 404 %q", resp.Status, body, "not kas"))
	}
	return nil
}

// reload replaces Caddy's config through `caddy reload` and its admin API;
// extraArgs go to `caddy reload` (--force, say).
func (c *caddyServer) reload(t *testing.T, config kasConfig, extraArgs ...string) {
	t.Helper()
	for _, a := range config.agents {
		if a.tokenEnv != "" && !slices.Contains(c.env, a.tokenEnv+"="+a.token) {
			t.Fatalf("agent %d reads its token from Caddy's environment, which a reload cannot change", a.id)
		}
	}
	caddyfile := c.writeCaddyfile(t, config)
	ctx, cancel := context.WithTimeout(context.Background(), caddyReloadTimeout)
	defer cancel()
	args := append([]string{"reload", "--config", caddyfile, "--adapter", "caddyfile",
		"--address", fmt.Sprintf("localhost:%d", c.adminPort)}, extraArgs...)
	cmd := exec.CommandContext(ctx, c.suite.caddyBin, args...)
	cmd.Env = c.env
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("caddy reload: %v\n%s", err, kubetest.Redact(string(out)))
	}
	c.config = config
}

// writeCaddyfile writes the token files of config and a Caddyfile that names
// them, and returns the Caddyfile's path.
func (c *caddyServer) writeCaddyfile(t testing.TB, config kasConfig) string {
	t.Helper()
	type agentData struct {
		ID                        int
		Name, TokenFile, TokenEnv string
	}
	type gitlabData struct {
		URL, SecretFile, CAFile, ExternalURL, APIListen string
		Extra                                           []string
	}
	type siteData struct{ Host, Body string }
	type userData struct {
		Name, TokenFile, Impersonate string
		Agents                       []int
		AllowImpersonation           bool
	}
	data := struct {
		AdminPort, HTTPPort, HTTPSPort, OwnPort int
		StateDir, WaitForAgent                  string
		ServerOptions                           string
		Agents                                  []agentData
		Users                                   []userData
		GitLab                                  *gitlabData
		Sites                                   []siteData
		KasExtra                                string
		ConnectionsPerToken                     int
	}{
		AdminPort: c.adminPort, HTTPPort: c.httpPort, HTTPSPort: c.httpsPort, OwnPort: c.ownPort,
		StateDir: c.dir, WaitForAgent: config.waitForAgent, ServerOptions: config.serverOptions,
		KasExtra: config.kasExtra, ConnectionsPerToken: config.connectionsPerToken,
	}
	if g := config.gitlab; g != nil {
		data.GitLab = &gitlabData{URL: g.url, SecretFile: g.secretFile, CAFile: g.caFile,
			ExternalURL: g.externalURL, APIListen: g.apiListen, Extra: g.extra}
	}
	for _, site := range config.sites {
		data.Sites = append(data.Sites, siteData{Host: site.host, Body: site.body})
	}
	for _, a := range config.agents {
		d := agentData{ID: a.id, Name: a.name, TokenEnv: a.tokenEnv}
		if a.tokenEnv == "" {
			d.TokenFile = writeSecretFile(t, c.dir, fmt.Sprintf("agent%d.token", a.id), a.token)
		}
		data.Agents = append(data.Agents, d)
	}
	for _, u := range config.users {
		data.Users = append(data.Users, userData{
			Name:               u.name,
			TokenFile:          writeSecretFile(t, c.dir, u.name+".token", u.token),
			Impersonate:        strings.Join(u.impersonate, " "),
			Agents:             u.agents,
			AllowImpersonation: u.allowImpersonation,
		})
	}
	var b strings.Builder
	if err := caddyfileTemplate.Execute(&b, data); err != nil {
		t.Fatalf("render Caddyfile: %v", err)
	}
	c.caddyfiles++
	path := filepath.Join(c.dir, fmt.Sprintf("Caddyfile.%d", c.caddyfiles))
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func (c *caddyServer) siteURL() string { return fmt.Sprintf("https://localhost:%d", c.httpsPort) }

// agentURL is where agentk dials in.
func (c *caddyServer) agentURL() string {
	return fmt.Sprintf("wss://localhost:%d/-/kubernetes-agent/", c.httpsPort)
}

// proxyURL is the Kubernetes API as kubectl sees it.
func (c *caddyServer) proxyURL() string {
	return c.siteURL() + "/-/kubernetes-agent/k8s-proxy/"
}

// rootCAFile is the root certificate of Caddy's internal CA.
func (c *caddyServer) rootCAFile() string {
	return filepath.Join(c.dir, "caddy", "pki", "authorities", "local", "root.crt")
}

func (c *caddyServer) newHTTPClient() (*http.Client, error) {
	pool, err := kubetest.CertPoolFromFile(c.rootCAFile())
	if err != nil {
		return nil, err
	}
	return &http.Client{
		Timeout: httpTimeout,
		Transport: &http.Transport{
			TLSClientConfig:   &tls.Config{RootCAs: pool},
			ForceAttemptHTTP2: true,
		},
	}, nil
}

// httpClient is a plain net/http client that trusts Caddy's internal CA.
func (c *caddyServer) httpClient(t testing.TB) *http.Client {
	t.Helper()
	client, err := c.newHTTPClient()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(client.CloseIdleConnections)
	return client
}

// kubectl returns a kubectl that reaches agent agentID through the k8s
// proxy as user.
func (c *caddyServer) kubectl(t testing.TB, user string, agentID int) kubectl {
	t.Helper()
	return c.kubectlWithToken(t, fmt.Sprintf("%s-agent%d", user, agentID), patToken(agentID, c.config.user(t, user).token))
}

func (c *caddyServer) kubectlWithToken(t testing.TB, name, token string) kubectl {
	t.Helper()
	path := filepath.Join(c.dir, name+".kubeconfig")
	if err := kubetest.WriteKubeconfig(path, c.proxyURL(), c.rootCAFile(), []kubetest.KubeconfigUser{{Name: name, Token: token}}); err != nil {
		t.Fatal(err)
	}
	home := filepath.Join(c.dir, "kubectl-home")
	if err := os.MkdirAll(home, 0o700); err != nil {
		t.Fatal(err)
	}
	return kubectl{bin: c.suite.kubectlBin, kubeconfig: path, home: home}
}

// patToken is the bearer token a client of the k8s proxy sends.
func patToken(agentID int, userToken string) string {
	return fmt.Sprintf("pat:%d:%s", agentID, userToken)
}

// proxyGet sends GET <proxy URL><path> with the given headers and returns the
// response with its body read.
func (c *caddyServer) proxyGet(t testing.TB, path string, header http.Header) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, c.proxyURL()+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header = header
	resp, err := c.httpClient(t).Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: read body: %v", path, err)
	}
	return resp, body
}

// apiStatus is a Kubernetes Status object, as the proxy sends it with its
// own refusals.
type apiStatus struct {
	Kind       string `json:"kind"`
	APIVersion string `json:"apiVersion"`
	Status     string `json:"status"`
	Message    string `json:"message"`
	Reason     string `json:"reason"`
	Code       int    `json:"code"`
}

// requireStatus fails t unless the response has status code wantCode and a
// JSON Status body that says the same; it returns the Status. The proxy's
// own errors on the paths kubectl's discovery reads raw (/api, /apis,
// /version) are plain text instead (kubestatus.ReadsRaw): probe /api/v1.
func requireStatus(t testing.TB, resp *http.Response, body []byte, wantCode int) apiStatus {
	t.Helper()
	if resp.StatusCode != wantCode {
		t.Fatalf("got HTTP %s, want %d; body: %s", resp.Status, wantCode, kubetest.Redact(string(body)))
	}
	// kubectl only decodes an error body that is declared to be JSON
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("Content-Type is %q, want application/json", ct)
	}
	var status apiStatus
	if err := json.Unmarshal(body, &status); err != nil {
		t.Fatalf("body is not a JSON Status: %v; body: %s", err, kubetest.Redact(string(body)))
	}
	if status.Kind != "Status" || status.APIVersion != "v1" || status.Status != "Failure" || status.Code != wantCode {
		t.Errorf("got Status kind=%q apiVersion=%q status=%q code=%d, want kind=Status apiVersion=v1 status=Failure code=%d",
			status.Kind, status.APIVersion, status.Status, status.Code, wantCode)
	}
	return status
}

// jsonLogLines returns the JSON objects among the lines of a log.
func jsonLogLines(log string) []map[string]any {
	var entries []map[string]any
	for line := range strings.Lines(log) {
		var entry map[string]any
		if json.Unmarshal([]byte(line), &entry) == nil {
			entries = append(entries, entry)
		}
	}
	return entries
}

// countLogEntries counts log's JSON lines that have every field of want.
func countLogEntries(log string, want map[string]string) int {
	n := 0
	for _, entry := range jsonLogLines(log) {
		matches := true
		for k, v := range want {
			matches = matches && entry[k] == v
		}
		if matches {
			n++
		}
	}
	return n
}

// testDir makes a directory for t's state under the suite's work dir. It is
// not t.TempDir, whose name comes from the test's name: Caddyfiles name
// these paths, and a path must stay a single plain Caddyfile token.
func testDir(t testing.TB, s *suite) string {
	t.Helper()
	prefix := regexp.MustCompile(`[^A-Za-z0-9]+`).ReplaceAllString(t.Name(), "-")
	dir, err := os.MkdirTemp(s.workDir, prefix+"-")
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// writeSecretFile writes a token file readable by its owner only.
func writeSecretFile(t testing.TB, dir, name, secret string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(secret), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
