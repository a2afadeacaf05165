package kasbench

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"text/template"

	"github.com/caddy-kas/caddy-kas/integration/fakegitlab"
)

// gitlabKASName labels the rows of client → GitLab's KAS → GitLab's agentk
// → upstream: the program we replace, doing the same job.
const gitlabKASName = "GitLab KAS"

// The GitLab that GitLab's KAS fronts, in the Rails stand-in: one group
// with one project, which holds the agent's configuration and runs the CI
// job whose token the clients send. Rails authorizes a job of the agent's
// own project without any configuration (kas-spec §2.5), so KAS needs no
// Gitaly to read one.
const (
	gitlabKASAgentID   = 1
	gitlabKASGroupID   = 1
	gitlabKASProjectID = 1
	gitlabKASUserID    = 1
	gitlabKASJobID     = 1
	gitlabKASGroup     = "bench"
	gitlabKASProject   = "bench/agents"
	gitlabKASUser      = "bench-ci"
)

// gitlabProgram is one of GitLab's programs the harness can run: how a
// user names it, and where it is by default.
type gitlabProgram struct {
	name       string // as it calls itself in --version
	flag, env  string // the kasbench flag and the environment variable that give its path
	defaultRel string // its default path relative to the module root
	label      string // what a report calls it instead of its path
}

var (
	gitlabAgentkProgram = gitlabProgram{name: "agentk", flag: "gitlab-agentk", env: GitLabAgentkEnv, defaultRel: GitLabAgentkDefault, label: "<GitLab's agentk>"}
	gitlabKASProgram    = gitlabProgram{name: "kas", flag: "gitlab-kas", env: GitLabKASEnv, defaultRel: GitLabKASDefault, label: "<GitLab's KAS>"}
)

// find returns the absolute path of the program at path and its version,
// or says why it cannot be used (problem, for a report).
func (g gitlabProgram) find(ctx context.Context, path string) (bin, version, problem string) {
	if path == "" {
		return "", "", "no binary given"
	}
	bin, err := filepath.Abs(path)
	if err == nil {
		_, err = os.Stat(bin)
	}
	if err != nil {
		return "", "", fmt.Sprintf("no binary (give it with -%s or %s, or put it at %s relative to the module root)", g.flag, g.env, g.defaultRel)
	}
	v, err := gitlabVersion(ctx, bin, g.name)
	if err != nil {
		return "", "", "its --version failed: " + withoutPath(err, bin, g.label)
	}
	return bin, v, ""
}

// gitlabKASBinaries are what the rows of GitLab's KAS run.
type gitlabKASBinaries struct {
	kas, agentk, redis string
}

// findGitLabKAS finds GitLab's KAS, GitLab's agentk and redis-server and
// puts their versions into rep, or returns ok false and puts into rep why
// the rows of GitLab's KAS are left out. Their absence never fails a run.
func findGitLabKAS(ctx context.Context, cfg Config, rep *Report) (bins gitlabKASBinaries, ok bool) {
	if cfg.Skip["gitlabkas"] {
		rep.GitLabKASNote = "rows left out (-skip gitlabkas)"
		return bins, false
	}
	kas, kasVersion, problem := gitlabKASProgram.find(ctx, cfg.GitLabKAS)
	if problem != "" {
		rep.GitLabKASNote = "rows left out: GitLab's KAS: " + problem
		return bins, false
	}
	agentk, agentkVersion, problem := gitlabAgentkProgram.find(ctx, cfg.GitLabAgentk)
	if problem != "" {
		rep.GitLabKASNote = "rows left out: GitLab's agentk: " + problem
		return bins, false
	}
	redis, redisVersion, note := lookRedis(ctx)
	if redis == "" {
		rep.GitLabKASNote = note
		return bins, false
	}
	rep.GitLabKAS, rep.GitLabKASAgentk, rep.GitLabKASRedis = kasVersion, agentkVersion, redisVersion
	return gitlabKASBinaries{kas: kas, agentk: agentk, redis: redis}, true
}

// gitlabKASConfig is GitLab's KAS's configuration: TLS with the harness's
// certificate toward agentk (wss, as our agentk dials Caddy) and toward the
// clients, the k8s proxy at our path, the log level of our Caddy, the
// per-token connection limit raised so that KAS does not throttle the
// tunnel streams a load opens (one per proxied request), and short
// shutdown periods.
var gitlabKASConfig = template.Must(template.New("kas.yaml").Funcs(template.FuncMap{"q": strconv.Quote}).Parse(`gitlab:
  address: {{q .RailsURL}}
  external_url: {{q .RailsURL}}
  authentication_secret_file: {{q .SecretFile}}
agent:
  listen: {network: tcp, address: {{q .AgentAddr}}, websocket: true, certificate_file: {{q .CertFile}}, key_file: {{q .KeyFile}}, connections_per_token_per_minute: 100000000, listen_grace_period: 0.1s}
  configuration: {poll_period: 300s}
  kubernetes_api:
    listen: {address: {{q .ProxyAddr}}, certificate_file: {{q .CertFile}}, key_file: {{q .KeyFile}}, listen_grace_period: 0.1s, shutdown_grace_period: 1s}
    url_path_prefix: {{q .ProxyPath}}
observability:
  listen: {address: {{q .ObservabilityAddr}}}
  logging: {level: warn, grpc_level: error}
redis:
  server: {address: {{q .RedisAddr}}}
  key_prefix: gitlab-kas
api:
  listen: {address: {{q .APIAddr}}, authentication_secret_file: {{q .SecretFile}}, listen_grace_period: 0.1s}
private_api:
  listen: {address: {{q .PrivateAddr}}, authentication_secret_file: {{q .PrivateSecretFile}}, listen_grace_period: 0.1s}
`))

// gitlabKAS is GitLab's KAS in front of the Rails stand-in, with its
// Redis, and GitLab's agentk connected to it; clients send CI job
// tokens.
type gitlabKAS struct {
	host  *standInHost
	rails *fakegitlab.Server
	redis *process
	// kas is GitLab's KAS, as the server of a route: only proc is set.
	kas    *caddyServer
	agent  *agentkProcess
	h1, h2 target
}

// startGitLabKAS starts the Rails stand-in (in the harness), redis-server,
// GitLab's KAS and GitLab's agentk, and waits until a request goes through
// them with each client.
func startGitLabKAS(ctx context.Context, bins gitlabKASBinaries, p *pki, up *upstream, dir string, logf func(string, ...any)) (_ *gitlabKAS, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating %s: %w", dir, err)
	}
	g := &gitlabKAS{host: newStandInHost(dir, logf)}
	defer func() {
		if err != nil {
			g.stop()
		}
	}()
	agentToken, jobToken := randomToken(), randomToken()
	var secretFile string
	err = g.host.setUp(func() {
		var secret []byte
		secret, secretFile = fakegitlab.NewSecret(g.host)
		g.rails = fakegitlab.Start(g.host, fakegitlab.Options{Secret: secret})
		g.rails.AddGroup(fakegitlab.Group{ID: gitlabKASGroupID, Path: gitlabKASGroup})
		g.rails.AddProject(fakegitlab.Project{ID: gitlabKASProjectID, Path: gitlabKASProject})
		g.rails.AddUser(fakegitlab.User{ID: gitlabKASUserID, Username: gitlabKASUser})
		g.rails.AddAgent(fakegitlab.Agent{ID: gitlabKASAgentID, ProjectID: gitlabKASProjectID, Name: "bench", Token: agentToken})
		g.rails.AddJob(fakegitlab.Job{Token: jobToken, JobID: gitlabKASJobID, PipelineID: 1, ProjectID: gitlabKASProjectID, Username: gitlabKASUser})
	})
	if err != nil {
		return nil, fmt.Errorf("the Rails stand-in: %w", err)
	}

	ports, err := freePorts(6)
	if err != nil {
		return nil, err
	}
	addr := func(i int) string { return "127.0.0.1:" + strconv.Itoa(ports[i]) }
	var redisAddr string
	if g.redis, redisAddr, err = startRedis(ctx, bins.redis, dir, ports[5]); err != nil {
		return nil, err
	}
	privateSecretFile := filepath.Join(dir, "private-api.secret")
	if err := writePrivateAPISecret(privateSecretFile); err != nil {
		return nil, err
	}
	var config strings.Builder
	err = gitlabKASConfig.Execute(&config, map[string]any{
		"RailsURL": g.rails.URL, "SecretFile": secretFile, "PrivateSecretFile": privateSecretFile,
		"AgentAddr": addr(0), "ProxyAddr": addr(1), "ObservabilityAddr": addr(2), "APIAddr": addr(3), "PrivateAddr": addr(4),
		"RedisAddr": redisAddr, "CertFile": p.certFile, "KeyFile": p.keyFile, "ProxyPath": floorProxyPath,
	})
	if err != nil {
		return nil, fmt.Errorf("rendering GitLab's KAS's configuration: %w", err)
	}
	configFile := filepath.Join(dir, "kas.yaml")
	if err := os.WriteFile(configFile, []byte(config.String()), 0o600); err != nil {
		return nil, fmt.Errorf("writing GitLab's KAS's configuration: %w", err)
	}
	env := append(environWithout("OWN_PRIVATE_API_URL", "KUBECONFIG"), "OWN_PRIVATE_API_URL=grpc://"+addr(4))
	proc, err := startProcess("gitlab-kas", bins.kas, dir, []string{"--configuration-file", configFile}, env)
	if err != nil {
		return nil, err
	}
	g.kas = &caddyServer{proc: proc, dir: dir}
	if err := waitReadiness(ctx, proc, "http://"+addr(2)+"/readiness"); err != nil {
		return nil, fmt.Errorf("GitLab's KAS did not start: %w", err)
	}

	// The token of a CI job of the agent's own project (kas-spec §2.5).
	auth := fmt.Sprintf("Bearer ci:%d:%s", gitlabKASAgentID, jobToken)
	base := "https://" + addr(1) + strings.TrimSuffix(floorProxyPath, "/")
	g.h1 = target{name: gitlabKASName, proto: "h1", client: newClient(p.pool, false), base: base, auth: auth}
	g.h2 = target{name: gitlabKASName, proto: "h2", client: newClient(p.pool, true), base: base, auth: auth}
	tokenFile := filepath.Join(dir, "agent.token")
	if err := os.WriteFile(tokenFile, []byte(agentToken+"\n"), 0o600); err != nil {
		return nil, fmt.Errorf("writing the agent token: %w", err)
	}
	kubeconfig, err := writeKubeconfig(dir, p, up)
	if err != nil {
		return nil, err
	}
	agentURL := "wss://" + addr(0) + "/-/kubernetes-agent/"
	if g.agent, err = startGitLabAgentk(ctx, bins.agentk, dir, p, agentURL, tokenFile, kubeconfig, g.h2); err != nil {
		return nil, err
	}
	if err := g.h1.do(ctx, nil, http.MethodGet, "/1k", nil); err != nil {
		return nil, fmt.Errorf("first HTTP/1.1 request through GitLab's KAS: %w", err)
	}
	return g, nil
}

// route is the row of GitLab's KAS for proto: the CPU of GitLab's KAS and
// GitLab's agentk counts.
func (g *gitlabKAS) route(proto string) route {
	t := g.h1
	if proto == "h2" {
		t = g.h2
	}
	return route{caddy: g.kas, agent: g.agent, t: t, profileSuffix: "-gitlab-kas"}
}

// stop stops agentk, KAS, Redis and the stand-in, in that order, and
// returns the contract violations the stand-in saw.
func (g *gitlabKAS) stop() []string {
	closeClients(g.h1, g.h2)
	if g.agent != nil {
		g.agent.proc.stop()
	}
	if g.kas != nil {
		g.kas.proc.stop()
	}
	if g.redis != nil {
		g.redis.stop()
	}
	return g.host.close()
}

// standInHost runs the Rails stand-in in the harness, as a test would
// (fakegitlab.TB): a setup call it refuses ends setUp with an error,
// contract violations are logged and kept, clean-ups run at close.
type standInHost struct {
	dir  string
	logf func(string, ...any)

	// mu guards cleanups and violations.
	mu         sync.Mutex
	cleanups   []func()
	violations []string
}

func newStandInHost(dir string, logf func(string, ...any)) *standInHost {
	return &standInHost{dir: dir, logf: logf}
}

// standInRefusal is what Fatalf panics with, for setUp to recover.
type standInRefusal struct{ err error }

// setUp runs f, which calls the stand-in's setup methods, and returns the
// error of a call the stand-in refused (Fatalf), if any.
func (h *standInHost) setUp(f func()) (err error) {
	defer func() {
		if r := recover(); r != nil {
			refusal, ok := r.(standInRefusal)
			if !ok {
				panic(r)
			}
			err = refusal.err
		}
	}()
	f()
	return nil
}

// Helper does nothing: there is no test output to attribute lines in.
func (h *standInHost) Helper() {}

// Errorf keeps and logs a contract violation.
func (h *standInHost) Errorf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	h.mu.Lock()
	h.violations = append(h.violations, msg)
	h.mu.Unlock()
	h.logf("Rails stand-in: %s", msg)
}

// Fatalf ends the setup call in progress; like testing.T's, it does not
// return.
func (h *standInHost) Fatalf(format string, args ...any) {
	panic(standInRefusal{fmt.Errorf(format, args...)})
}

// Cleanup registers f to run at close.
func (h *standInHost) Cleanup(f func()) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.cleanups = append(h.cleanups, f)
}

// TempDir returns a new directory inside the host's.
func (h *standInHost) TempDir() string {
	d, err := os.MkdirTemp(h.dir, "stand-in-")
	if err != nil {
		h.Fatalf("creating a directory for the Rails stand-in: %v", err)
	}
	return d
}

// close runs the clean-ups, the last registered first, and returns the
// violations seen.
func (h *standInHost) close() []string {
	h.mu.Lock()
	cleanups := h.cleanups
	h.cleanups = nil
	h.mu.Unlock()
	for i := len(cleanups) - 1; i >= 0; i-- {
		cleanups[i]()
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.violations
}
