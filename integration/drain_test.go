package integration

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// caddyStopTimeout bounds a `caddy stop` and the exit of the process.
const caddyStopTimeout = 2 * time.Minute

// stop runs `caddy stop` against c and waits until the process exited;
// it returns how long that took.
func (c *caddyServer) stop(t testing.TB) time.Duration {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), caddyStopTimeout)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, c.suite.caddyBin, "stop", "--address", fmt.Sprintf("localhost:%d", c.adminPort))
	cmd.Env = c.env
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("caddy stop: %v\n%s", err, kubetest.Redact(string(out)))
	}
	select {
	case <-c.proc.Exited():
	case <-ctx.Done():
		t.Fatal("caddy did not exit after caddy stop")
	}
	return time.Since(start)
}

// metric returns the value of one series of c's admin /metrics, or 0.
func (c *caddyServer) metric(t testing.TB, series string) float64 {
	t.Helper()
	return c.scrapeMetrics(t)[series]
}

// waitMetric waits until c's series has value want.
func (c *caddyServer) waitMetric(t testing.TB, series string, want float64) {
	t.Helper()
	err := kubetest.Eventually(time.Minute, func() error {
		if got := c.metric(t, series); got != want {
			return fmt.Errorf("%s is %v, want %v", series, got, want)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestCaddyStopMovesAgents stops one of two Caddy processes that share the
// agents' address (SO_REUSEPORT: the kernel spreads new connections over
// both, as a load balancer spreads them over two nodes) under load: the
// stopping Caddy asks its agents to move, agentk opens its tunnels to the
// other at once, the requests in flight at the stop finish, and open
// watches end, after shutdown_grace_period, with an error their client
// sees. Clients reach each Caddy at a port of its own; as a load balancer
// does, the test sends new requests to the other Caddy just before the
// stop.
func TestCaddyStopMovesAgents(t *testing.T) {
	s := requireSuite(t)
	config := standardConfig()
	config.waitForAgent = "20s" // the moment of the move, for requests that reach the second Caddy first
	const grace = 5 * time.Second
	config.kasExtra = fmt.Sprintf("shutdown_grace_period %v", grace)
	first := startCaddyNode(t, s, config, nil)
	agent := first.startAgentk(t, agentkOptions{agentID: 1, extraArgs: []string{"--kas-connections", "2"}})
	agent.waitReady(t)
	first.waitMetric(t, "caddy_kas_agent_tunnels", 2)
	ns := makeMarkedNamespace(t, first)
	// Started once agentk's tunnels are up, so that they are all on the
	// first, which makes the move visible.
	second := startCaddyNode(t, s, config, first)

	stopUnderLoad(t, config, first, second, ns, 2, grace)
	if moves := agentMetric(t, agent, "agentk_tunnel_moves_total"); moves != 2 {
		t.Errorf("agentk counted %v moves, want 2", moves)
	}
}

// TestGitLabAgentkMovesOnCaddyStop is TestCaddyStopMovesAgents with
// GitLab's agentk over wss://: the stopping Caddy's GOAWAY makes it open a
// connection to the other for its next calls.
func TestGitLabAgentkMovesOnCaddyStop(t *testing.T) {
	s := requireGitLabAgentk(t)
	config := standardConfig()
	config.waitForAgent = "20s"
	const grace = 5 * time.Second
	config.kasExtra = fmt.Sprintf("shutdown_grace_period %v", grace)
	first := startCaddyNode(t, s, config, nil)
	first.startGitLabAgentk(t, gitlabAgentkOptions{agentID: 1}).waitConnected(t, "Bearer "+patToken(1, config.user(t, "ops").token))
	first.waitMetric(t, "caddy_kas_agent_tunnels", 1)
	ns := makeMarkedNamespace(t, first)
	second := startCaddyNode(t, s, config, first)
	stopUnderLoad(t, config, first, second, ns, 1, grace)
}

// makeMarkedNamespace creates, through c, a namespace with a ConfigMap
// named "marker" in it, and returns its name.
func makeMarkedNamespace(t *testing.T, c *caddyServer) string {
	t.Helper()
	ops := c.kubectl(t, "ops", 1)
	ns := uniqueName("kas-stop")
	ops.mustRun(t, "create", "namespace", ns)
	ops.mustRun(t, "create", "configmap", "marker", "-n", ns)
	return ns
}

// stopUnderLoad stops first, whose agent 1 has tunnels tunnels, while
// requests and watches of the ConfigMaps of ns (which holds one named
// "marker") go through it, with second beside it: the requests
// in flight at the stop finish whole, new ones go to second, where the
// agent's tunnels move, and the watches on first end, after grace, with an
// error their client sees. It logs what it measured.
func stopUnderLoad(t *testing.T, config kasConfig, first, second *caddyServer, ns string, tunnels float64, grace time.Duration) {
	t.Helper()
	auth := "Bearer " + patToken(1, config.user(t, "ops").token)
	client := first.streamingClient(t)
	watches := openWatches(t, client, first.ownProxyURL(), auth, ns, "marker", 20)
	short := startProxyLoad(t, client, first.ownProxyURL(), auth, 4, "api/v1/namespaces/"+ns+"/configmaps", isConfigMapList)
	// Watches the apiserver ends after 3 s: requests that are in flight
	// at the stop and must finish, whole, within the grace period.
	long := startProxyLoad(t, client, first.ownProxyURL(), auth, 4, "api/v1/namespaces/"+ns+"/configmaps?watch=1&timeoutSeconds=3", isWatchStream)
	time.Sleep(4 * time.Second)

	short.retarget(second.ownProxyURL())
	long.retarget(second.ownProxyURL())
	time.Sleep(200 * time.Millisecond) // the short requests on the wire to the first arrive
	stopSignal := time.Now()
	took := first.stop(t)
	t.Logf("caddy stop took %v with %d open watches and a grace period of %v", took.Round(time.Millisecond), len(watches), grace)

	second.waitMetric(t, "caddy_kas_agent_tunnels", tunnels)
	time.Sleep(4 * time.Second) // load on the second only
	shortResults, longResults := short.finish(), long.finish()
	reportLoad(t, "short requests", shortResults, time.Time{})
	reportLoad(t, "3 s watches", longResults, time.Time{})
	inFlight := 0
	for _, r := range longResults {
		if r.started.Before(stopSignal) && r.ended.After(stopSignal) && strings.HasPrefix(r.target, first.ownProxyURL()) {
			inFlight++
		}
	}
	t.Logf("%d requests were in flight on the stopping Caddy at the stop signal", inFlight)
	if inFlight == 0 {
		t.Error("no request was in flight on the stopping Caddy at the stop signal: the test proved nothing")
	}

	for i, w := range watches {
		select {
		case <-w.ended:
		case <-time.After(time.Minute):
			t.Fatalf("watch %d still open after its Caddy exited", i)
		}
		if w.endErr() == nil {
			t.Errorf("watch %d on the stopped Caddy ended cleanly; its client must see an error", i)
		}
	}
	t.Logf("the watches ended with: %v", watches[0].endErr())
	log := first.proc.Stdout() + first.proc.Stderr()
	if n := countLogEntries(log, map[string]string{"msg": "tunnels drained"}); n != 1 {
		t.Errorf("%d 'tunnels drained' lines in the stopped Caddy's log, want 1", n)
	}
	for _, e := range jsonLogLines(log) {
		if e["msg"] == "tunnels drained" {
			t.Logf("the stopped Caddy drained its tunnels in %v s", e["took"])
		}
	}
	// The agent's requests now all go through the second Caddy.
	second.kubectl(t, "ops", 1).mustRun(t, "get", "configmap", "marker", "-n", ns)
}

// TestMaxConnectionAgeRollsTunnelsOver sets max_connection_age to 6 s under
// load: agentk's tunnels roll over about every two seconds, and no request
// fails. (Each tunnel then keeps about 4 s for the requests it has once its
// agent was asked to move; a 3 s age left too little on a loaded machine
// for a request that had to take the old tunnel while the new one was
// still being dialed.)
func TestMaxConnectionAgeRollsTunnelsOver(t *testing.T) {
	s := requireSuite(t)
	config := standardConfig()
	config.kasExtra = "max_connection_age 6s"
	kas := startCaddy(t, s, config)
	agent := kas.startAgentk(t, agentkOptions{agentID: 1})
	agent.waitReady(t)
	ops := kas.kubectl(t, "ops", 1)
	ns := uniqueName("kas-age")
	ops.mustRun(t, "create", "namespace", ns)
	auth := "Bearer " + patToken(1, config.user(t, "ops").token)
	client := kas.streamingClient(t)
	short := startProxyLoad(t, client, kas.proxyURL(), auth, 4, "api/v1/namespaces/"+ns+"/configmaps", isConfigMapList)
	long := startProxyLoad(t, client, kas.proxyURL(), auth, 2, "api/v1/namespaces/"+ns+"/configmaps?watch=1&timeoutSeconds=1", isWatchStream)
	time.Sleep(20 * time.Second)
	reportLoad(t, "short requests", short.finish(), time.Time{})
	reportLoad(t, "1 s watches", long.finish(), time.Time{})
	moves := agentMetric(t, agent, "agentk_tunnel_moves_total")
	t.Logf("agentk moved %v times in 20 s", moves)
	if moves < 5 {
		t.Errorf("agentk moved %v times in 20 s with a maximum age of 6 s, want at least 5", moves)
	}
}

// agentMetric returns the value of one series of agentk's /metrics.
func agentMetric(t testing.TB, a *agentk, series string) float64 {
	t.Helper()
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get(a.observabilityURL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for line := range strings.Lines(string(body)) {
		name, value, ok := strings.Cut(strings.TrimSpace(line), " ")
		if ok && name == series {
			v, err := strconv.ParseFloat(value, 64)
			if err != nil {
				t.Fatalf("%s: %v", series, err)
			}
			return v
		}
	}
	t.Fatalf("agentk's /metrics has no %s", series)
	return 0
}
