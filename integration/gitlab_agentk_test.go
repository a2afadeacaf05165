package integration

import (
	"cmp"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// GitLab's own agentk (v16.5, unchanged) dials Caddy over a WebSocket with
// the subprotocol ws-tunnel and runs gRPC inside it, or, given a grpcs://
// address, makes its gRPC calls on the site's own HTTP/2. These helpers run
// it as its README says, beside our agentk (agentk_test.go).

const (
	// gitlabAgentkEnv names GitLab's agentk binary.
	gitlabAgentkEnv = "GITLAB_AGENTK_BIN"
	// gitlabAgentkDefault is where it is by default, relative to the
	// repository's root: next to the checkout.
	gitlabAgentkDefault = "../shared/gitlab-agent-v16.5/agentk"
	// gitlabAgentkReadyTimeout bounds the wait until Caddy has admitted
	// its tunnel and a request through it succeeded.
	gitlabAgentkReadyTimeout = time.Minute
	// wsTunnelProtocol is the "protocol" field of Caddy's log entries about
	// GitLab's agentk's tunnels.
	wsTunnelProtocol = "ws-tunnel"
	// grpcProtocol is that field for GitLab's agentk dialing grpcs://, its
	// gRPC calls on the site's own HTTP/2 connection.
	grpcProtocol = "grpc"
)

// gitlabAgentkBin returns the path of GitLab's agentk. When there is none,
// it skips t, or fails it under CI=true, where every test must run.
func gitlabAgentkBin(t testing.TB, s *suite) string {
	t.Helper()
	path := os.Getenv(gitlabAgentkEnv)
	if path == "" {
		path = filepath.Join(s.repoRoot, filepath.FromSlash(gitlabAgentkDefault))
	}
	if _, err := os.Stat(path); err != nil {
		msg := fmt.Sprintf("GitLab's agentk is needed for this test: %v (set %s, or put it at %s relative to the repository)",
			err, gitlabAgentkEnv, gitlabAgentkDefault)
		if os.Getenv("CI") == "true" {
			t.Fatal(msg + "; CI=true requires every test to run")
		}
		t.Skip(msg)
	}
	return path
}

// requireGitLabAgentk is requireSuite for tests that run GitLab's agentk:
// it skips (or fails under CI=true) before any process starts when the
// binary is missing.
func requireGitLabAgentk(t *testing.T) *suite {
	t.Helper()
	s := requireSuite(t)
	gitlabAgentkBin(t, s)
	return s
}

// gitlabAgentkOptions chooses how one of GitLab's agentk runs.
type gitlabAgentkOptions struct {
	agentID     int
	token       string // empty: the agent's token from the Caddy config
	kubeContext string // context of the cluster's kubeconfig; empty: adminUser
	podName     string // POD_NAME; empty: gitlab-agentk-<agent id>
	kubeconfig  string // the cluster's kubeconfig; empty: the test kube-apiserver's
	// grpc makes it dial grpcs://localhost:<port>, gRPC on the site's own
	// HTTP/2, instead of the WebSocket (wss://…/-/kubernetes-agent/).
	grpc bool
}

// kasAddress is the --kas-address of a GitLab's agentk with these options.
func (o gitlabAgentkOptions) kasAddress(c *caddyServer) string {
	if o.grpc {
		return fmt.Sprintf("grpcs://localhost:%d", c.httpsPort)
	}
	return c.agentURL()
}

// protocol is the "protocol" field of Caddy's log entries about the
// tunnels of a GitLab's agentk with these options.
func (o gitlabAgentkOptions) protocol() string {
	if o.grpc {
		return grpcProtocol
	}
	return wsTunnelProtocol
}

// gitlabAgentk is one running GitLab's agentk connected (or trying to
// connect) to a Caddy.
type gitlabAgentk struct {
	caddy            *caddyServer
	options          gitlabAgentkOptions
	proc             *kubetest.Process
	observabilityURL string
	// connectedBefore is how many "agent connected" entries for the agent
	// with its protocol (gitlabAgentkOptions.protocol) Caddy had logged
	// before this process started.
	connectedBefore int
}

// startGitLabAgentk starts GitLab's agentk for t, dialing c and reaching
// the test cluster with a credential that may impersonate. It does not
// wait for the tunnel; see waitConnected.
func (c *caddyServer) startGitLabAgentk(t testing.TB, options gitlabAgentkOptions) *gitlabAgentk {
	t.Helper()
	bin := gitlabAgentkBin(t, c.suite)
	if options.token == "" {
		options.token = c.config.agent(t, options.agentID).token
	}
	options.kubeContext = cmp.Or(options.kubeContext, adminUser)
	options.podName = cmp.Or(options.podName, fmt.Sprintf("gitlab-agentk-%d", options.agentID))
	name := fmt.Sprintf("%s-%s", options.podName, kubetest.RandomHex(2))
	observabilityAddress := fmt.Sprintf("127.0.0.1:%d", mustFreeLoopbackPorts(t, 1)[0])
	tokenFile := writeSecretFile(t, c.dir, name+".token", options.token)
	cacheDir := filepath.Join(c.dir, name+"-cache")
	a := &gitlabAgentk{
		caddy:            c,
		options:          options,
		observabilityURL: "http://" + observabilityAddress,
		connectedBefore:  countAgentLogEntries(c.proc.Stderr(), "agent connected", options.agentID, options.protocol()),
	}
	a.proc = startOwnedProcess(t, kubetest.ProcessSpec{
		Name:   name,
		Binary: bin,
		Args: []string{
			"--kas-address", options.kasAddress(c),
			"--token-file", tokenFile,
			"--ca-cert-file", c.rootCAFile(),
			"--kubeconfig", cmp.Or(options.kubeconfig, c.suite.cluster.Kubeconfig),
			"--context", options.kubeContext,
			"--cache-dir", cacheDir,
			"--observability-listen-address", observabilityAddress,
		},
		Env: append(kubetest.EnvironWithout("KUBECONFIG", "POD_NAMESPACE", "POD_NAME", "SERVICE_ACCOUNT_NAME"),
			"POD_NAMESPACE=kas-it", "POD_NAME="+options.podName, "SERVICE_ACCOUNT_NAME=gitlab-agent"),
		LogDir: c.dir,
	})
	return a
}

// restart starts another GitLab's agentk with the same options; the old one
// should be stopped or killed first.
func (a *gitlabAgentk) restart(t testing.TB) *gitlabAgentk {
	t.Helper()
	return a.caddy.startGitLabAgentk(t, a.options)
}

// waitConnected waits until Caddy has logged that it admitted this
// agentk's tunnel (ws-tunnel, or grpc with gitlabAgentkOptions.grpc), and
// then until a GET of the cluster's /version with the authorization header
// probe succeeds through Caddy.
// With another agentk of the same agent connected, the probe may take the
// other tunnel.
func (a *gitlabAgentk) waitConnected(t testing.TB, probe string) {
	t.Helper()
	c := a.caddy
	err := kubetest.Eventually(gitlabAgentkReadyTimeout, func() error {
		if !a.proc.Running() {
			return kubetest.Permanent(fmt.Errorf("%s exited: %w", a.proc.Name, a.proc.ExitError()))
		}
		if n := countAgentLogEntries(c.proc.Stderr(), "agent connected", a.options.agentID, a.options.protocol()); n <= a.connectedBefore {
			return fmt.Errorf("caddy logged no new \"agent connected\" with protocol %s for agent %d", a.options.protocol(), a.options.agentID)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("GitLab's agentk for agent %d did not connect: %v", a.options.agentID, err)
	}
	client, err := c.newHTTPClient()
	if err != nil {
		t.Fatal(err)
	}
	defer client.CloseIdleConnections()
	err = kubetest.Eventually(gitlabAgentkReadyTimeout, func() error {
		if !a.proc.Running() {
			return kubetest.Permanent(fmt.Errorf("%s exited: %w", a.proc.Name, a.proc.ExitError()))
		}
		req, err := http.NewRequest(http.MethodGet, c.proxyURL()+"version", nil)
		if err != nil {
			return kubetest.Permanent(err)
		}
		req.Header.Set("Authorization", probe)
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "gitVersion") {
			return fmt.Errorf("GET version: %s %s", resp.Status, kubetest.Redact(string(body)))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("no request succeeded through GitLab's agentk for agent %d: %v", a.options.agentID, err)
	}
}

// countAgentLogEntries counts the JSON lines of log with message msg about
// agent agentID; a non-empty protocol must match the entry's "protocol"
// field too.
func countAgentLogEntries(log, msg string, agentID int, protocol string) int {
	n := 0
	for _, entry := range jsonLogLines(log) {
		if entry["msg"] != msg || fmt.Sprint(entry["agent_id"]) != fmt.Sprint(agentID) {
			continue
		}
		if protocol != "" && entry["protocol"] != protocol {
			continue
		}
		n++
	}
	return n
}
