package integration

import (
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

const (
	// agentRefusalTimeout bounds the wait for Caddy to refuse an agentk twice.
	agentRefusalTimeout = time.Minute
	// agentLossTimeout bounds how long an open watch may outlive its agentk.
	agentLossTimeout = 30 * time.Second
)

func TestAgentWithWrongTokenIsRefused(t *testing.T) {
	s := requireSuite(t)
	kas := startCaddy(t, s, standardConfig())
	wrongToken := kubetest.NewToken("the wrong agent token")
	agent := kas.startAgentk(t, agentkOptions{agentID: 1, token: wrongToken})

	// Wait for two refusals: the second shows that agentk retries, and
	// readiness is sampled all along, so "never ready" covers both attempts.
	refusal := map[string]string{"msg": "agent refused", "reason": "unknown agent token"}
	err := kubetest.Eventually(agentRefusalTimeout, func() error {
		if code, err := agent.readiness(); err == nil && code == http.StatusOK {
			return kubetest.Permanent(errors.New("agentk with a wrong token reports ready"))
		}
		if !agent.proc.Running() {
			return kubetest.Permanent(fmt.Errorf("agentk should keep retrying: %w", agent.proc.ExitError()))
		}
		// One line per reason a minute; the metric counts every one.
		if n := countLogEntries(kas.proc.Stderr(), refusal); n < 1 {
			return fmt.Errorf("caddy logged no JSON line with %v", refusal)
		}
		if n := kas.scrapeMetrics(t)[`caddy_kas_agent_refusals_total{reason="unknown agent token"}`]; n < 2 {
			return fmt.Errorf("caddy counted %v refusals, want 2", n)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// a whole number: timestamps and ids hold the digits 401 by chance
	if !regexp.MustCompile(`\b401\b`).MatchString(agent.proc.Stderr()) {
		t.Errorf("agentk's stderr does not mention the 401 it got")
	}
	// agentk tells Caddy's refusal from a 401 of something that is not
	// KAS, and says what to fix.
	if n := countLogEntries(agent.proc.Stderr(), map[string]string{"msg": "KAS refused the agent token"}); n == 0 {
		t.Errorf("agentk did not log the refusal as KAS's:\n%s", agent.proc.Stderr())
	}
	if !strings.Contains(agent.proc.Stderr(), `"fix":"KAS does not know this agent token`) {
		t.Errorf("agentk's refusal does not say what to fix:\n%s", agent.proc.Stderr())
	}
	if strings.Contains(kas.proc.Stdout()+kas.proc.Stderr(), wrongToken) {
		t.Errorf("caddy's output contains the wrong agent token")
	}
}

func TestProxyRefusesUnauthorizedUsers(t *testing.T) {
	s := requireSuite(t)
	config := standardConfig()
	kas := startCaddy(t, s, config)
	// with agent 1 connected, a refusal can only come from the user check
	kas.startAgentk(t, agentkOptions{agentID: 1}).waitReady(t)
	devToken := config.user(t, "dev").token

	unauthenticated := []struct {
		name          string
		authorization string // empty: no Authorization header
	}{
		{"unknown token", "Bearer " + patToken(1, kubetest.NewToken("an unknown user token"))},
		{"token without pat prefix", "Bearer " + devToken},
		{"pat token without agent id", "Bearer pat:" + devToken},
		{"agent id that is not a number", "Bearer pat:one:" + devToken},
		{"basic auth", "Basic " + devToken},
		{"no Authorization header", ""},
	}
	for _, tc := range unauthenticated {
		t.Run(tc.name, func(t *testing.T) {
			header := http.Header{}
			if tc.authorization != "" {
				header.Set("Authorization", tc.authorization)
			}
			resp, body := kas.proxyGet(t, "api/v1", header)
			status := requireStatus(t, resp, body, http.StatusUnauthorized)
			if got := resp.Header.Get("Gitlab-Unauthorized"); got != "true" {
				t.Errorf("header Gitlab-Unauthorized is %q, want %q", got, "true")
			}
			if status.Reason != "Unauthorized" {
				t.Errorf("Status reason is %q, want Unauthorized", status.Reason)
			}
			if !strings.HasPrefix(status.Message, "GitLab Agent Server: ") {
				t.Errorf("Status message %q does not start with %q", status.Message, "GitLab Agent Server: ")
			}
		})
	}

	t.Run("valid token for an agent the user may not reach", func(t *testing.T) {
		header := http.Header{"Authorization": {"Bearer " + patToken(2, devToken)}}
		resp, body := kas.proxyGet(t, "api/v1", header)
		if status := requireStatus(t, resp, body, http.StatusForbidden); status.Reason != "Forbidden" {
			t.Errorf("Status reason is %q, want Forbidden", status.Reason)
		}
		kas.kubectl(t, "dev", 2).mustFail(t, "forbidden", "get", "namespaces")
	})
}

func TestClientImpersonation(t *testing.T) {
	s := requireSuite(t)
	kas := startCaddy(t, s, standardConfig())
	kas.startAgentk(t, agentkOptions{agentID: 1}).waitReady(t)

	refused := []struct {
		user           string
		wantCode       int
		wantInMessage  string
		wantKubectlErr string
	}{
		// dev is impersonated by the proxy already
		{user: "dev", wantCode: http.StatusBadRequest, wantInMessage: "nested impersonation is not supported", wantKubectlErr: "nested impersonation is not supported"},
		// plain has neither impersonate nor allow_impersonation; kubectl auth
		// whoami words a 403 as "API not enabled or no permission", so only
		// the raw request checks the code
		{user: "plain", wantCode: http.StatusForbidden, wantKubectlErr: ""},
	}
	for _, tc := range refused {
		t.Run(tc.user+" may not impersonate", func(t *testing.T) {
			header := http.Header{
				"Authorization":    {"Bearer " + patToken(1, kas.config.user(t, tc.user).token)},
				"Impersonate-User": {"someone"},
			}
			resp, body := kas.proxyGet(t, "api/v1", header)
			status := requireStatus(t, resp, body, tc.wantCode)
			if !strings.Contains(status.Message, tc.wantInMessage) {
				t.Errorf("Status message %q does not contain %q", status.Message, tc.wantInMessage)
			}
			kas.kubectl(t, tc.user, 1).mustFail(t, tc.wantKubectlErr, "--as", "someone", "auth", "whoami")
		})
	}

	t.Run("ops may impersonate", func(t *testing.T) {
		// the agent's identity (admin, in system:masters) may impersonate anyone
		ops := kas.kubectl(t, "ops", 1)
		if who := ops.whoami(t, "--as", "bob"); who.Username != "bob" {
			t.Errorf("kubectl --as bob auth whoami shows %q, want bob", who.Username)
		}
		who := ops.whoami(t, "--as", "bob", "--as-group", "team")
		if who.Username != "bob" || !slices.Contains(who.Groups, "team") {
			t.Errorf("kubectl --as bob --as-group team auth whoami shows %q in %v, want bob in groups containing team", who.Username, who.Groups)
		}
	})
}

func TestAgentNotConnected(t *testing.T) {
	s := requireSuite(t)
	config := standardConfig()
	kas := startCaddy(t, s, config)

	start := time.Now()
	header := http.Header{"Authorization": {"Bearer " + patToken(2, config.user(t, "ops").token)}}
	resp, body := kas.proxyGet(t, "api/v1", header)
	t.Logf("the proxy answered after %s (wait_for_agent %s)", time.Since(start).Round(10*time.Millisecond), config.waitForAgent)
	status := requireStatus(t, resp, body, http.StatusBadGateway)
	if !strings.Contains(status.Message, "agent 2 is not connected") {
		t.Errorf("Status message %q does not contain %q", status.Message, "agent 2 is not connected")
	}
}

// TestKubectlWithoutAgent runs kubectl, with the default wait_for_agent and
// reconnect_window, for an agent that never connected. kubectl discovers
// first and retries discovery five times; it used to wait 20 s each time
// (105 s in all) and then print "an error on the server ("unknown")". The
// time bounds below are wide on purpose: they protect what the user sees,
// an answer well before the old 105 s, not a schedule.
func TestKubectlWithoutAgent(t *testing.T) {
	s := requireSuite(t)
	config := standardConfig()
	config.waitForAgent = "20s" // the default, which users get
	kas := startCaddy(t, s, config)
	ops := kas.kubectl(t, "ops", 2)

	const message = "GitLab Agent Server: agent 2 is not connected"
	tests := []struct {
		name string
		// wantInStderr is what tells the user why the agent was not waited
		// for (any longer).
		wantInStderr string
		// within is a generous bound on how long kubectl may take.
		within time.Duration
	}{
		// The first requests wait: the server has just started, and agents
		// reconnect after a restart. The reconnect window (30 s from the
		// start) ends the waiting.
		{"just after the start", "it has not connected since this server started", 75 * time.Second},
		// Now the window is over: no request waits.
		{"after the reconnect window", "it has not connected since this server started", 20 * time.Second},
	}
	for _, tt := range tests {
		start := time.Now()
		r := ops.run("get", "namespaces")
		took := time.Since(start)
		t.Logf("%s: kubectl ended after %s with status %d; stderr:\n%s", tt.name, took.Round(100*time.Millisecond), r.exitCode, r.stderr)
		if r.exitCode <= 0 {
			t.Fatalf("%s: kubectl get namespaces: exit status %d, want a failure; err %v", tt.name, r.exitCode, r.err)
		}
		lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
		last := lines[len(lines)-1]
		if !strings.HasPrefix(last, "Error from server") || !strings.Contains(last, message) || !strings.Contains(last, tt.wantInStderr) {
			t.Errorf("%s: kubectl's last line\n%s\nwants to say %q and %q", tt.name, last, message, tt.wantInStderr)
		}
		if strings.Contains(r.stderr, `"unknown"`) {
			t.Errorf("%s: kubectl still shows an unknown error", tt.name)
		}
		if took > tt.within {
			t.Errorf("%s: kubectl took %s to fail, want well under the 105 s it used to wait (bound %s)", tt.name, took.Round(time.Second), tt.within)
		}
	}
}

func TestAgentLoss(t *testing.T) {
	s := requireSuite(t)
	config := standardConfig()
	kas := startCaddy(t, s, config)
	agent := kas.startAgentk(t, agentkOptions{agentID: 1})
	agent.waitReady(t)
	ops := kas.kubectl(t, "ops", 1)
	ns := uniqueName("kas-it")
	ops.mustRun(t, "create", "namespace", ns)
	watch := ops.startWatch(t, kas.dir, ns, "watch-marker")

	agent.proc.Kill()

	select {
	case <-watch.Exited():
	case <-time.After(agentLossTimeout):
		t.Fatalf("kubectl's watch still runs %s after its agentk was killed", agentLossTimeout)
	}
	if watch.WaitErr() == nil {
		t.Errorf("kubectl's watch ended with status 0 when its agentk was killed, want an error")
	}
	t.Logf("the watch ended: %v; stderr: %s", watch.WaitErr(), kubetest.Redact(strings.TrimSpace(watch.Stderr())))

	// Caddy has forgotten the dead tunnel: requests wait for a new one
	header := http.Header{"Authorization": {"Bearer " + patToken(1, config.user(t, "ops").token)}}
	resp, body := kas.proxyGet(t, "api/v1", header)
	if status := requireStatus(t, resp, body, http.StatusBadGateway); !strings.Contains(status.Message, "agent 1 is not connected") {
		t.Errorf("Status message %q does not contain %q", status.Message, "agent 1 is not connected")
	}

	agent.restart(t).waitReady(t)
	ops.mustRun(t, "get", "namespaces")
}
