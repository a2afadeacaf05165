package integration

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/bench/agentsim"
	"github.com/caddy-kas/caddy-kas/integration/fakegitlab"
	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// TestGitLabReconnectStorm: 1,000 agents connecting at once, as after a
// node restart (nothing is cached), against the GitLab stand-in with
// GitLab's default api_rate_limit. Each behaves as agentk does: refused,
// it backs off (1 s growing to 20 s, with jitter) and tries again. GitLab
// gets at most what the limit allows in the time it takes, each token is
// checked once, every agent is connected in the end, and the refusals make
// a bounded number of log lines.
func TestGitLabReconnectStorm(t *testing.T) {
	t.Parallel()
	s := requireSuite(t)
	const (
		agents  = 1000
		refill  = 50  // GitLab's defaults
		bucket  = 250 // (kas-spec §8.1)
		project = glOtherProjectID
	)
	e := startGitLabEnv(t, s, gitlabEnvOptions{noAgentk: true, extra: []string{"usage_reporting_period 0"}})
	tokens := make([]string, agents)
	for i := range tokens {
		// Not NewToken: a thousand noted secrets would make every
		// process's output scan slow; these grant nothing but a tunnel.
		tokens[i] = "storm-" + kubetest.RandomHex(16)
		// The agents' project has no repository here: their
		// configuration reads fail (and are logged boundedly), so GitLab
		// gets agent_info calls only.
		e.gitlab.AddAgent(fakegitlab.Agent{ID: int64(5000 + i), ProjectID: project, Name: fmt.Sprintf("storm-%d", i), Token: tokens[i]})
	}
	pem, err := os.ReadFile(e.caddy.rootCAFile())
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)

	before := e.gitlabCalls()
	start := time.Now()
	sim, err := agentsim.Start(context.Background(), agentsim.Config{
		URL: e.caddy.agentURL(), TLS: &tls.Config{RootCAs: roots},
		Count: agents, Token: func(id int) string { return tokens[id] },
		Parallel: 100, Reconnect: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sim.Stop)
	err = kubetest.Eventually(3*time.Minute, func() error {
		if up, _, _ := sim.Counts(); up < agents {
			return fmt.Errorf("%d of %d agents connected", up, agents)
		}
		return nil
	})
	elapsed := time.Since(start)
	up, refused, lost := sim.Counts()
	calls := e.gitlabCalls() - before
	agentInfo := e.gitlab.Calls(fakegitlab.PathAgentInfo)
	t.Logf("%d agents connected after %v: %d handshakes refused and retried, %d tunnels lost, %d GitLab calls (%d agent_info)",
		up, elapsed.Round(100*time.Millisecond), refused, lost, calls, agentInfo)
	if err != nil {
		t.Fatal(err)
	}
	// The rate limit: the bucket, and what it regains meanwhile, with a
	// second of slack for the ends of the window.
	if limit := bucket + refill*(elapsed.Seconds()+1); float64(calls) > limit {
		t.Errorf("%d GitLab calls in %v, more than the api_rate_limit allows (%.0f)", calls, elapsed, limit)
	}
	// The cache: a token GitLab answered is not asked about again.
	if agentInfo > agents+10 {
		t.Errorf("%d agent_info calls for %d tokens", agentInfo, agents)
	}
	if refused == 0 {
		t.Error("no handshake was refused: the storm did not reach the limit")
	}
	// The log: refusals are counted, not logged one by one.
	lines := countLogEntries(e.caddy.proc.Stderr(), map[string]string{"msg": "agent refused", "reason": "authentication rate limited"})
	if maxLines := 10 * (int(elapsed/time.Minute) + 2); lines > maxLines {
		t.Errorf("%d log lines for %d refused handshakes, want at most %d", lines, refused, maxLines)
	}
}
