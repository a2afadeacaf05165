package integration

import (
	"cmp"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// agentkReadyTimeout bounds the wait until agentk reports a tunnel.
const agentkReadyTimeout = time.Minute

// agentkOptions chooses how one agentk runs.
type agentkOptions struct {
	agentID     int
	token       string   // empty: the agent's token from the Caddy config
	tokenViaEnv bool     // pass the token in AGENTK_TOKEN instead of --token-file
	kubeContext string   // context of the cluster's kubeconfig; empty: adminUser
	kubeconfig  string   // the cluster's kubeconfig; empty: the test kube-apiserver's
	extraArgs   []string // after the arguments above; a later value of a flag wins
	extraEnv    []string // NAME=value, after the environment above; a later value wins
}

// agentk is one running agentk connected (or trying to connect) to a Caddy.
type agentk struct {
	caddy            *caddyServer
	options          agentkOptions
	proc             *kubetest.Process
	observabilityURL string
}

// startAgentk starts an agentk for t that dials c and reaches the test
// cluster. It does not wait for the tunnel; see waitReady.
func (c *caddyServer) startAgentk(t testing.TB, options agentkOptions) *agentk {
	t.Helper()
	if options.token == "" {
		options.token = c.config.agent(t, options.agentID).token
	}
	if options.kubeContext == "" {
		options.kubeContext = adminUser
	}
	name := fmt.Sprintf("agentk-%d", options.agentID)
	observabilityAddress := fmt.Sprintf("127.0.0.1:%d", mustFreeLoopbackPorts(t, 1)[0])
	args := []string{
		"--kas-address", c.agentURL(),
		"--kas-ca-cert-file", c.rootCAFile(),
		"--kubeconfig", cmp.Or(options.kubeconfig, c.suite.cluster.Kubeconfig),
		"--context", options.kubeContext,
		"--observability-listen-address", observabilityAddress,
	}
	env := append(kubetest.EnvironWithout("KUBECONFIG", "AGENTK_TOKEN", "POD_NAMESPACE", "POD_NAME"),
		"POD_NAMESPACE=kas-it", "POD_NAME="+name)
	if options.tokenViaEnv {
		env = append(env, "AGENTK_TOKEN="+options.token)
	} else {
		tokenFile := writeSecretFile(t, c.dir, fmt.Sprintf("%s-%s.token", name, kubetest.RandomHex(4)), options.token)
		args = append(args, "--token-file", tokenFile)
	}
	args = append(args, options.extraArgs...)
	env = append(env, options.extraEnv...)
	return &agentk{
		caddy:   c,
		options: options,
		proc: startOwnedProcess(t, kubetest.ProcessSpec{
			Name:   name,
			Binary: c.suite.agentkBin,
			Args:   args,
			Env:    env,
			LogDir: c.dir,
		}),
		observabilityURL: "http://" + observabilityAddress,
	}
}

// restart starts a new agentk with the same options; the old one should be
// stopped or killed first.
func (a *agentk) restart(t testing.TB) *agentk {
	t.Helper()
	return a.caddy.startAgentk(t, a.options)
}

// readiness returns the status code of agentk's /readiness.
func (a *agentk) readiness() (int, error) {
	client := &http.Client{Timeout: 5 * time.Second}
	defer client.CloseIdleConnections()
	resp, err := client.Get(a.observabilityURL + "/readiness")
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// waitReady waits until agentk's /readiness answers 200, which it does once
// a tunnel to Caddy is up.
func (a *agentk) waitReady(t testing.TB) {
	t.Helper()
	err := kubetest.Eventually(agentkReadyTimeout, func() error {
		if !a.proc.Running() {
			return kubetest.Permanent(a.proc.ExitError())
		}
		code, err := a.readiness()
		if err != nil {
			return err
		}
		if code != http.StatusOK {
			return fmt.Errorf("/readiness answered %d", code)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("agentk for agent %d is not ready: %v", a.options.agentID, err)
	}
}

// tunnelConnections lists agentk's established TCP connections to Caddy's
// HTTPS port by their local address; a reconnect changes the list.
func (a *agentk) tunnelConnections() ([]string, error) {
	return establishedConnections(a.proc.Pid(), a.caddy.httpsPort)
}
