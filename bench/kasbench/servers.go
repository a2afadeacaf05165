package kasbench

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"text/template"
	"time"
)

// Sizes of the bodies the upstream serves.
const (
	smallSize = 1 << 10
	largeSize = 10 << 20
	// watchInterval is how often a watch stream sends a line.
	watchInterval = 10 * time.Millisecond
	// endlessLimit bounds the body of /endless, which the stalled reader
	// asks for.
	endlessLimit = 1 << 30
)

// upstream stands in for the kube-apiserver: HTTPS with HTTP/1.1 and
// HTTP/2 on 127.0.0.1, the same server for the direct baseline and for
// agentk.
type upstream struct {
	srv  *http.Server
	url  string
	base time.Time // the clock watch lines carry their send time on
	// served is closed when Serve has returned.
	served chan struct{}
	// conns counts the connections accepted so far.
	conns atomic.Int64
}

func startUpstream(p *pki) (*upstream, error) {
	small := bytes.Repeat([]byte("k"), smallSize)
	chunk := bytes.Repeat([]byte("M"), 32<<10)
	u := &upstream{base: time.Now(), served: make(chan struct{})}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /version", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"major":"1","minor":"32","gitVersion":"v1.32.0"}`)
	})
	mux.HandleFunc("GET /1k", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(smallSize))
		w.Write(small)
	})
	mux.HandleFunc("GET /10m", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(largeSize))
		for n := 0; n < largeSize; n += len(chunk) {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	})
	mux.HandleFunc("PUT /sink", func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "%d\n", n)
	})
	// /watch?lines=N sends N lines, one every watchInterval, each flushed
	// at once and carrying its sequence number and send time.
	mux.HandleFunc("GET /watch", func(w http.ResponseWriter, r *http.Request) {
		lines, _ := strconv.Atoi(r.URL.Query().Get("lines"))
		lines = min(max(lines, 1), 100_000)
		rc := http.NewResponseController(w)
		t := time.NewTicker(watchInterval)
		defer t.Stop()
		buf := make([]byte, 0, 64)
		for i := range lines {
			buf = strconv.AppendInt(buf[:0], int64(i), 10)
			buf = append(buf, ' ')
			buf = strconv.AppendInt(buf, int64(time.Since(u.base)), 10)
			buf = append(buf, '\n')
			if _, err := w.Write(buf); err != nil {
				return
			}
			if err := rc.Flush(); err != nil {
				return
			}
			if i == lines-1 {
				return
			}
			select {
			case <-t.C:
			case <-r.Context().Done():
				return
			}
		}
	})
	// /hold sends one line, then keeps the stream open until the client
	// goes away or ?for= passes.
	mux.HandleFunc("GET /hold", func(w http.ResponseWriter, r *http.Request) {
		d, err := time.ParseDuration(r.URL.Query().Get("for"))
		if err != nil || d > 10*time.Minute {
			d = time.Minute
		}
		io.WriteString(w, "open\n")
		http.NewResponseController(w).Flush()
		select {
		case <-time.After(d):
		case <-r.Context().Done():
		}
	})
	// /endless writes until the client goes away or endlessLimit bytes.
	mux.HandleFunc("GET /endless", func(w http.ResponseWriter, r *http.Request) {
		for n := 0; n < endlessLimit; n += len(chunk) {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("upstream listener: %w", err)
	}
	u.srv = &http.Server{
		Handler:   mux,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{p.cert}, NextProtos: []string{"h2", "http/1.1"}},
		HTTP2:     &http.HTTP2Config{MaxConcurrentStreams: 100_000},
		ErrorLog:  discardLog,
		ConnState: func(_ net.Conn, st http.ConnState) {
			if st == http.StateNew {
				u.conns.Add(1)
			}
		},
	}
	u.url = "https://" + l.Addr().String()
	go func() { // owned by u: Serve returns when close shuts the server down
		defer close(u.served)
		u.srv.ServeTLS(l, "", "")
	}()
	return u, nil
}

func (u *upstream) close() {
	u.srv.Close()
	<-u.served
}

// caddyfile is the standalone configuration of the Caddy under test. Its
// global options, "options", are those of every Caddy the harness runs.
var caddyfile = template.Must(template.New("Caddyfile").Parse(`{{define "options"}}{
	admin 127.0.0.1:{{.AdminPort}}
	default_bind 127.0.0.1
	skip_install_trust
	storage file_system {{.Dir}}/caddy
	http_port {{.HTTPPort}}
	https_port {{.HTTPSPort}}
	auto_https disable_redirects
	grace_period 1s
	log {
		level WARN
	}
{{- with .Node}}
	kas {
		redis {
			addresses {{.RedisAddr}}
		}
		private_api {
			listen 127.0.0.1:{{.PrivatePort}}
			secret_file {{.SecretFile}}
			own_url grpc://127.0.0.1:{{.PrivatePort}}
		}
	}
{{- end}}
}
{{end}}{{template "options" .}}
https://127.0.0.1:{{.HTTPSPort}} {
	tls {{.CertFile}} {{.KeyFile}}
	kubernetes_agent {
		agent 1 bench {
			token_file {{.Dir}}/agent.token
		}
{{- if .GitLabAgent}}
		agent {{.GitLabAgentID}} gitlab-agentk {
			token_file {{.Dir}}/gitlab-agent.token
		}
{{- end}}
{{- range .SimAgents}}
		agent {{.}} sim-{{.}} {
			token {{$.SimTokenPrefix}}{{.}}
		}
{{- end}}
	}
	k8s_proxy {
		user bench {
			token_file {{.Dir}}/user.token
			agents 1{{if .GitLabAgent}} {{.GitLabAgentID}}{{end}}
		}
	}
	respond "not kas" 404
}
`))

// gitlabAgentID is the agent that GitLab's agentk connects as; our agentk
// is agent 1. The user token reaches both.
const gitlabAgentID = 2

// caddyServer is the Caddy under test.
type caddyServer struct {
	proc                 *process
	dir                  string
	adminURL, siteURL    string
	agentURL, proxyURL   string
	agentToken, userTok  string
	gitlabAgentToken     string // empty: no agent declared for GitLab's agentk
	simTokenPrefix       string
	simFirstID, simCount int
}

// nodeSettings make a Caddy one node of several: the Redis they share, the
// private API secret they share, this node's private API port, and the
// agent and user tokens, which every node must accept alike.
type nodeSettings struct {
	RedisAddr, SecretFile string
	PrivatePort           int
	agentToken, userToken string
}

// startCaddy writes a Caddyfile with agent 1 (for agentk), agent
// gitlabAgentID (for GitLab's agentk) if gitlabAgent is set, and simAgents
// simulated agents, and starts Caddy with it. With node set, the Caddy is
// one node of several (see nodeSettings); otherwise it stands alone with
// tokens of its own.
func startCaddy(ctx context.Context, bin, dir string, p *pki, simAgents int, gitlabAgent bool, extraEnv []string, node *nodeSettings) (*caddyServer, error) {
	c, ports, err := newCaddyServer(dir)
	if err != nil {
		return nil, err
	}
	c.agentToken, c.userTok = randomToken(), randomToken()
	c.simTokenPrefix, c.simFirstID, c.simCount = randomToken()+"-", 1000, simAgents
	if node != nil {
		c.agentToken, c.userTok = node.agentToken, node.userToken
	}
	c.agentURL = fmt.Sprintf("wss://127.0.0.1:%d/-/kubernetes-agent/", ports[2])
	c.proxyURL = c.siteURL + "/-/kubernetes-agent/k8s-proxy"
	tokens := map[string]string{"agent.token": c.agentToken, "user.token": c.userTok}
	if gitlabAgent {
		c.gitlabAgentToken = randomToken()
		tokens["gitlab-agent.token"] = c.gitlabAgentToken
	}
	for name, tok := range tokens {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(tok+"\n"), 0o600); err != nil {
			return nil, fmt.Errorf("writing %s: %w", name, err)
		}
	}
	sim := make([]int, simAgents)
	for i := range sim {
		sim[i] = c.simFirstID + i
	}
	var b strings.Builder
	err = caddyfile.Execute(&b, map[string]any{
		"AdminPort": ports[0], "HTTPPort": ports[1], "HTTPSPort": ports[2], "Dir": dir,
		"CertFile": p.certFile, "KeyFile": p.keyFile,
		"SimAgents": sim, "SimTokenPrefix": c.simTokenPrefix,
		"GitLabAgent": gitlabAgent, "GitLabAgentID": gitlabAgentID,
		"Node": node,
	})
	if err != nil {
		return nil, fmt.Errorf("rendering the Caddyfile: %w", err)
	}
	if err := c.launch(ctx, bin, b.String(), p, extraEnv); err != nil {
		return nil, err
	}
	return c, nil
}

// newCaddyServer makes dir and picks three free ports for a Caddy that is
// yet to start there: its admin API, HTTP and HTTPS ports, in this order.
func newCaddyServer(dir string) (*caddyServer, []int, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("creating %s: %w", dir, err)
	}
	ports, err := freePorts(3)
	if err != nil {
		return nil, nil, err
	}
	return &caddyServer{
		dir:      dir,
		adminURL: fmt.Sprintf("http://127.0.0.1:%d", ports[0]),
		siteURL:  fmt.Sprintf("https://127.0.0.1:%d", ports[2]),
	}, ports, nil
}

// launch writes config as the Caddyfile in c.dir, starts Caddy with it, and
// waits until c.siteURL answers 404 at its root, which every Caddyfile of
// the harness makes it do.
func (c *caddyServer) launch(ctx context.Context, bin, config string, p *pki, extraEnv []string) error {
	path := filepath.Join(c.dir, "Caddyfile")
	if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
		return fmt.Errorf("writing the Caddyfile: %w", err)
	}
	home := filepath.Join(c.dir, "home")
	env := append(environWithout("HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME"),
		"HOME="+home, "XDG_CONFIG_HOME="+filepath.Join(home, "config"), "XDG_DATA_HOME="+filepath.Join(home, "data"))
	env = append(env, extraEnv...)
	var err error
	c.proc, err = startProcess("caddy", bin, c.dir, []string{"run", "--config", path, "--adapter", "caddyfile"}, env)
	if err != nil {
		return err
	}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: p.pool}}}
	defer client.CloseIdleConnections()
	err = eventually(ctx, 2*time.Minute, func() error {
		if !c.proc.running() {
			return fmt.Errorf("caddy exited: %v (see caddy.log)", c.proc.err)
		}
		resp, err := client.Get(c.siteURL + "/")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			return fmt.Errorf("caddy answered %s", resp.Status)
		}
		return nil
	})
	if err != nil {
		c.proc.stop()
		return fmt.Errorf("caddy did not start: %w", err)
	}
	return nil
}

// agentkProcess is the agentk under test.
type agentkProcess struct {
	proc             *process
	observabilityURL string
}

// writeKubeconfig writes the kubeconfig both agents reach up with: the
// upstream over HTTPS (so that client-go sends the bearer token) with the
// throwaway CA. It returns its path.
func writeKubeconfig(dir string, p *pki, up *upstream) (string, error) {
	kubeconfig := filepath.Join(dir, "cluster.kubeconfig")
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: bench
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: bench
  user:
    token: bench-cluster-token
contexts:
- name: bench
  context:
    cluster: bench
    user: bench
current-context: bench
`, up.url, p.caFile)
	if err := os.WriteFile(kubeconfig, []byte(kc), 0o600); err != nil {
		return "", fmt.Errorf("writing the kubeconfig: %w", err)
	}
	return kubeconfig, nil
}

// startAgentk starts agentk for agent 1 of c, with the cluster of
// kubeconfig, and waits until its tunnel is up.
func startAgentk(ctx context.Context, bin, dir string, p *pki, c *caddyServer, kubeconfig string, extraEnv []string) (*agentkProcess, error) {
	ports, err := freePorts(1)
	if err != nil {
		return nil, err
	}
	obs := fmt.Sprintf("127.0.0.1:%d", ports[0])
	env := append(environWithout("KUBECONFIG", "AGENTK_TOKEN", "POD_NAMESPACE", "POD_NAME", "KUBERNETES_SERVICE_HOST"),
		"POD_NAMESPACE=bench", "POD_NAME=agentk-bench")
	env = append(env, extraEnv...)
	proc, err := startProcess("agentk", bin, dir, []string{
		"--kas-address", c.agentURL,
		"--kas-ca-cert-file", p.caFile,
		"--token-file", filepath.Join(c.dir, "agent.token"),
		"--kubeconfig", kubeconfig,
		"--observability-listen-address", obs,
	}, env)
	if err != nil {
		return nil, err
	}
	a := &agentkProcess{proc: proc, observabilityURL: "http://" + obs}
	if err := waitReadiness(ctx, proc, a.observabilityURL+"/readiness"); err != nil {
		proc.stop()
		return nil, fmt.Errorf("agentk did not connect: %w", err)
	}
	return a, nil
}

// waitReadiness waits until proc's readiness endpoint at url answers 200
// OK, for a minute at most.
func waitReadiness(ctx context.Context, proc *process, url string) error {
	client := &http.Client{Timeout: 5 * time.Second}
	defer client.CloseIdleConnections()
	return eventually(ctx, time.Minute, func() error {
		if !proc.running() {
			return fmt.Errorf("%s exited: %v (see %s.log)", proc.name, proc.err, proc.name)
		}
		resp, err := client.Get(url)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s readiness %s", proc.name, resp.Status)
		}
		return nil
	})
}

// startGitLabAgentk starts GitLab's agentk with the agent token in
// tokenFile, dialing agentURL (a Caddy's, for agent gitlabAgentID, or
// GitLab's KAS's) with the cluster of kubeconfig, as GitLab's README runs
// it outside a cluster, and waits until a request through t (which
// reaches that agent) succeeds.
func startGitLabAgentk(ctx context.Context, bin, dir string, p *pki, agentURL, tokenFile, kubeconfig string, t target) (*agentkProcess, error) {
	ports, err := freePorts(1)
	if err != nil {
		return nil, err
	}
	obs := fmt.Sprintf("127.0.0.1:%d", ports[0])
	env := append(environWithout("KUBECONFIG", "POD_NAMESPACE", "POD_NAME", "SERVICE_ACCOUNT_NAME", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"),
		"POD_NAMESPACE=bench", "POD_NAME=gitlab-agentk-bench", "SERVICE_ACCOUNT_NAME=gitlab-agent")
	proc, err := startProcess("gitlab-agentk", bin, dir, []string{
		"--kas-address", agentURL,
		"--ca-cert-file", p.caFile,
		"--token-file", tokenFile,
		"--kubeconfig", kubeconfig,
		"--cache-dir", filepath.Join(dir, "gitlab-agentk-cache"),
		"--observability-listen-address", obs,
	}, env)
	if err != nil {
		return nil, err
	}
	a := &agentkProcess{proc: proc, observabilityURL: "http://" + obs}
	// Its readiness does not say whether the tunnel is up; a request
	// through it does.
	var exited error
	err = eventually(ctx, time.Minute, func() error {
		if !proc.running() {
			exited = fmt.Errorf("GitLab's agentk exited: %v", proc.err)
			return nil // no use waiting
		}
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		return t.do(rctx, nil, http.MethodGet, "/1k", nil)
	})
	if err == nil {
		err = exited
	}
	if err != nil {
		proc.stop()
		return nil, fmt.Errorf("no request went through GitLab's agentk: %w", err)
	}
	return a, nil
}

// logTail is the last n lines of the log of a process started in dir.
func logTail(dir, name string, n int) string {
	b, err := os.ReadFile(filepath.Join(dir, name+".log"))
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(len(lines)-n, 0):], "\n")
}

// environWithout is the harness's environment without the named variables.
func environWithout(names ...string) []string {
	var env []string
outer:
	for _, kv := range os.Environ() {
		for _, n := range names {
			if strings.HasPrefix(kv, n+"=") {
				continue outer
			}
		}
		env = append(env, kv)
	}
	return env
}
