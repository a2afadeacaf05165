package integration

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/agentadmin"
	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// adminReconnectTimeout bounds the wait until agentk has reconnected after
// the admin API closed its tunnels; its first retry comes after about a
// second.
const adminReconnectTimeout = time.Minute

// TestAdminAPI drives the agent admin API through Caddy's real admin
// endpoint: the listing shows what the real agentk said about itself and
// its cluster, Caddy's own Host and Origin checks guard it, and disconnect
// closes an agent's tunnels, after which agentk reconnects and requests
// go through again.
func TestAdminAPI(t *testing.T) {
	s := requireSuite(t)
	kas := startCaddy(t, s, standardConfig())
	one := kas.startAgentk(t, agentkOptions{agentID: 1, extraArgs: []string{"--kas-connections", "2"}})
	two := kas.startAgentk(t, agentkOptions{agentID: 2, tokenViaEnv: true})
	one.waitReady(t)
	two.waitReady(t)
	ops := kas.kubectl(t, "ops", 1)
	node, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}

	// agentk reports ready with its first tunnel; wait for the second
	listing := kas.waitForAgents(t, map[int64]int{1: 2, 2: 1}, nil)
	if listing.Node != node {
		t.Errorf("the listing names node %q, want this host %q", listing.Node, node)
	}
	var version struct {
		ServerVersion struct {
			GitVersion string `json:"gitVersion"`
		} `json:"serverVersion"`
	}
	if err := json.Unmarshal([]byte(ops.mustRun(t, "version", "-o", "json")), &version); err != nil {
		t.Fatalf("kubectl version -o json: %v", err)
	}
	agents := map[int64]agentadmin.Agent{}
	for _, a := range listing.Agents {
		agents[a.ID] = a
	}
	for id, wantName := range map[int64]string{1: "agent-one", 2: "agent-two"} {
		a := agents[id]
		if a.Name != wantName {
			t.Errorf("agent %d is named %q, want %q", id, a.Name, wantName)
		}
		for _, c := range a.Connections {
			wantPod := agentadmin.Pod{Namespace: "kas-it", Name: fmt.Sprintf("agentk-%d", id), ID: c.Pod.ID}
			if c.Node != node || c.Pod != wantPod || c.Pod.ID == 0 || c.ConnectionID == 0 ||
				c.AgentkVersion == "" || c.KubernetesVersion != version.ServerVersion.GitVersion ||
				!strings.HasPrefix(c.RemoteAddr, "127.0.0.1:") || c.ConnectedAt.IsZero() || c.ConnectedAt.After(time.Now()) {
				t.Errorf("agent %d's connection %+v: want node %q, pod kas-it/agentk-%d with an id, a connection id, "+
					"an agentk version, Kubernetes %s, a loopback address and a connection time in the past",
					id, c, node, id, version.ServerVersion.GitVersion)
			}
		}
	}
	oneConns := agents[1].Connections
	if oneConns[0].Pod.ID != oneConns[1].Pod.ID || oneConns[0].ConnectionID == oneConns[1].ConnectionID {
		t.Errorf("agent 1's two tunnels %+v: want one pod id and two connection ids", oneConns)
	}
	oldIDs := connectionIDsOf(agents[1])
	twoIDs := connectionIDsOf(agents[2])

	t.Run("one agent", func(t *testing.T) {
		resp, body := kas.adminRequest(t, http.MethodGet, "/kas/agents/1", nil)
		requireAdminStatus(t, resp, body, http.StatusOK)
		var answer agentadmin.AgentAnswer
		mustUnmarshal(t, body, &answer)
		if answer.Node != node || answer.Agent.ID != 1 || !slices.Equal(connectionIDsOf(answer.Agent), oldIDs) {
			t.Errorf("GET /kas/agents/1 answered %s, want agent 1 with connections %v on %s", body, oldIDs, node)
		}

		resp, body = kas.adminRequest(t, http.MethodGet, "/kas/agents/3", nil)
		requireAdminStatus(t, resp, body, http.StatusNotFound)
		var apiErr struct {
			Error string `json:"error"`
		}
		mustUnmarshal(t, body, &apiErr)
		if !strings.Contains(apiErr.Error, "agent 3") {
			t.Errorf("the 404 for agent 3 says %q, want it to name the agent", apiErr.Error)
		}
	})

	t.Run("caddy's admin checks guard it", func(t *testing.T) {
		for _, tc := range []struct {
			name   string
			header http.Header
		}{
			{"foreign Origin", http.Header{"Origin": {"https://attacker.example"}}},
			{"foreign Host (DNS rebinding)", http.Header{"Host": {"attacker.example"}}},
		} {
			for _, r := range []struct{ method, path string }{
				{http.MethodGet, "/kas/agents"},
				{http.MethodPost, "/kas/agents/1/disconnect"},
			} {
				resp, body := kas.adminRequest(t, r.method, r.path, tc.header)
				if resp.StatusCode != http.StatusForbidden {
					t.Errorf("%s %s with a %s: HTTP %s, want 403; body: %s", r.method, r.path, tc.name, resp.Status, body)
				}
			}
		}
		kas.waitForAgents(t, map[int64]int{1: 2, 2: 1}, func(l agentadmin.Listing) error {
			for _, a := range l.Agents {
				if a.ID == 1 && !slices.Equal(connectionIDsOf(a), oldIDs) {
					return kubetest.Permanent(fmt.Errorf("agent 1's tunnels changed to %v after refused requests", connectionIDsOf(a)))
				}
			}
			return nil
		})
	})

	t.Run("a watch is a request in flight", func(t *testing.T) {
		ns := uniqueName("kas-admin")
		ops.mustRun(t, "create", "namespace", ns)
		ops.startWatch(t, kas.dir, ns, "watch-marker")
		kas.waitForAgents(t, map[int64]int{1: 2, 2: 1}, func(l agentadmin.Listing) error {
			var inFlight int64
			for _, a := range l.Agents {
				for _, c := range a.Connections {
					if a.ID == 1 {
						inFlight += c.RequestsInFlight
					}
				}
			}
			if inFlight < 1 {
				return fmt.Errorf("agent 1 has %d requests in flight while a watch runs through it", inFlight)
			}
			return nil
		})
	})

	t.Run("disconnect", func(t *testing.T) {
		resp, body := kas.adminRequest(t, http.MethodPost, "/kas/agents/1/disconnect", nil)
		requireAdminStatus(t, resp, body, http.StatusOK)
		var d agentadmin.Disconnected
		mustUnmarshal(t, body, &d)
		slices.Sort(d.ConnectionIDs)
		if d.Node != node || d.AgentID != 1 || d.Closed != 2 || !slices.Equal(d.ConnectionIDs, oldIDs) {
			t.Errorf("disconnect answered %s, want agent 1's connections %v closed on %s", body, oldIDs, node)
		}

		// agentk reconnects by itself, with new tunnels; agent 2 is untouched
		kas.waitForAgents(t, map[int64]int{1: 2, 2: 1}, func(l agentadmin.Listing) error {
			for _, a := range l.Agents {
				ids := connectionIDsOf(a)
				switch {
				case a.ID == 1 && slices.ContainsFunc(ids, func(id int64) bool { return slices.Contains(oldIDs, id) }):
					return fmt.Errorf("agent 1 still has an old tunnel: %v", ids)
				case a.ID == 2 && !slices.Equal(ids, twoIDs):
					return kubetest.Permanent(fmt.Errorf("agent 2's tunnels changed from %v to %v", twoIDs, ids))
				}
			}
			return nil
		})

		ops.mustRun(t, "get", "namespaces")
		auth := http.Header{"Authorization": {"Bearer " + patToken(1, kas.config.user(t, "ops").token)}}
		resp, body = kas.proxyGet(t, "version", auth)
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), version.ServerVersion.GitVersion) {
			t.Errorf("GET version through agent 1 after the reconnect: HTTP %s, body %s", resp.Status, kubetest.Redact(string(body)))
		}

		resp, body = kas.adminRequest(t, http.MethodPost, "/kas/agents/3/disconnect", nil)
		requireAdminStatus(t, resp, body, http.StatusOK)
		mustUnmarshal(t, body, &d)
		if d.Closed != 0 {
			t.Errorf("disconnecting agent 3, which is not connected, answered %s", body)
		}
	})
}

// TestAdminAPIGitLabAgentk: GitLab's own agentk in GitLab mode is listed
// with what it registered and its configuration project, and comes back
// after a disconnect. (Requests through a reconnected agent are
// TestAdminAPI's.)
func TestAdminAPIGitLabAgentk(t *testing.T) {
	s := requireGitLabAgentk(t)
	e := startGitLabEnv(t, s, gitlabEnvOptions{noAgentk: true})
	e.caddy.startGitLabAgentk(t, gitlabAgentkOptions{agentID: glAgentID, token: e.agentToken, podName: "gitlab-agentk-admin"})

	// agentk registers its pod next to opening its tunnels, and again
	// after a failed attempt (no Kubernetes version yet, say): wait for the
	// metadata rather than assume the order
	listing := e.caddy.waitForListing(t, func(l agentadmin.Listing) error {
		switch {
		case len(l.Agents) == 0:
			return errors.New("no agent connected yet")
		case len(l.Agents) != 1 || l.Agents[0].ID != glAgentID:
			return kubetest.Permanent(fmt.Errorf("agents %+v, want agent %d only", l.Agents, glAgentID))
		}
		for _, c := range l.Agents[0].Connections {
			if c.Pod.Namespace != "kas-it" || c.Pod.Name != "gitlab-agentk-admin" || !strings.HasPrefix(c.AgentkVersion, "v16.5") || c.KubernetesVersion == "" {
				return fmt.Errorf("connection %+v, want GitLab's agentk v16.5 in pod kas-it/gitlab-agentk-admin with a Kubernetes version", c)
			}
		}
		return nil
	})
	a := listing.Agents[0]
	if a.Name != glAgentName || a.ProjectID != glProjectID {
		t.Errorf("agent %q of project %d, want %q of project %d", a.Name, a.ProjectID, glAgentName, glProjectID)
	}
	var newestBefore time.Time
	for _, c := range a.Connections {
		if c.ConnectedAt.After(newestBefore) {
			newestBefore = c.ConnectedAt
		}
	}

	resp, body := e.caddy.adminRequest(t, http.MethodPost, fmt.Sprintf("/kas/agents/%d/disconnect", glAgentID), nil)
	requireAdminStatus(t, resp, body, http.StatusOK)
	var d agentadmin.Disconnected
	mustUnmarshal(t, body, &d)
	// agentk may have opened another tunnel since the listing: at least
	// one is closed, not exactly those listed
	if d.AgentID != glAgentID || d.Closed < 1 || d.Closed != len(d.ConnectionIDs) {
		t.Errorf("disconnect answered %s, want agent %d's tunnels closed", body, glAgentID)
	}
	e.caddy.waitForListing(t, func(l agentadmin.Listing) error {
		if len(l.Agents) != 1 {
			return fmt.Errorf("agents %+v, want agent %d back", l.Agents, glAgentID)
		}
		for _, c := range l.Agents[0].Connections {
			if !c.ConnectedAt.After(newestBefore) {
				return fmt.Errorf("connection %d connected at %s, before the disconnect", c.ConnectionID, c.ConnectedAt)
			}
		}
		return nil
	})
}

// adminRequest sends a request to Caddy's local admin endpoint as a local
// tool (curl, caddy's own CLI) would; header may add an Origin or replace
// the Host.
func (c *caddyServer) adminRequest(t testing.TB, method, path string, header http.Header) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, fmt.Sprintf("http://localhost:%d%s", c.adminPort, path), nil)
	if err != nil {
		t.Fatal(err)
	}
	for name, values := range header {
		if name == "Host" {
			req.Host = values[0]
			continue
		}
		req.Header[name] = values
	}
	client := &http.Client{Timeout: httpTimeout}
	defer client.CloseIdleConnections()
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s on caddy's admin endpoint: %v", method, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s on caddy's admin endpoint: read body: %v", method, path, err)
	}
	return resp, body
}

// waitForListing polls GET /kas/agents until check accepts the listing, and
// returns that listing.
func (c *caddyServer) waitForListing(t testing.TB, check func(agentadmin.Listing) error) agentadmin.Listing {
	t.Helper()
	var l agentadmin.Listing
	err := kubetest.Eventually(adminReconnectTimeout, func() error {
		resp, body := c.adminRequest(t, http.MethodGet, "/kas/agents", nil)
		if resp.StatusCode != http.StatusOK {
			return kubetest.Permanent(fmt.Errorf("GET /kas/agents: HTTP %s: %s", resp.Status, body))
		}
		l = agentadmin.Listing{}
		if err := json.Unmarshal(body, &l); err != nil {
			return kubetest.Permanent(fmt.Errorf("GET /kas/agents answered %s: %w", body, err))
		}
		return check(l)
	})
	if err != nil {
		t.Fatalf("the admin API's listing: %v", err)
	}
	return l
}

// waitForAgents waits until GET /kas/agents lists exactly the agents of
// want with that many connections each, and check (if not nil) accepts the
// listing; it returns that listing.
func (c *caddyServer) waitForAgents(t testing.TB, want map[int64]int, check func(agentadmin.Listing) error) agentadmin.Listing {
	t.Helper()
	return c.waitForListing(t, func(l agentadmin.Listing) error {
		got := map[int64]int{}
		for _, a := range l.Agents {
			got[a.ID] = len(a.Connections)
		}
		if !maps.Equal(got, want) {
			return fmt.Errorf("agents with their connection counts: %v, want %v", got, want)
		}
		if check != nil {
			return check(l)
		}
		return nil
	})
}

// requireAdminStatus fails t unless the admin endpoint answered wantCode
// with a JSON body.
func requireAdminStatus(t testing.TB, resp *http.Response, body []byte, wantCode int) {
	t.Helper()
	if resp.StatusCode != wantCode {
		t.Fatalf("admin endpoint answered HTTP %s, want %d; body: %s", resp.Status, wantCode, body)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q, want application/json", ct)
	}
}

func mustUnmarshal(t testing.TB, body []byte, v any) {
	t.Helper()
	if err := json.Unmarshal(body, v); err != nil {
		t.Fatalf("admin endpoint answered %s, not the expected JSON: %v", body, err)
	}
}

// connectionIDsOf returns the connection ids of a's tunnels, sorted.
func connectionIDsOf(a agentadmin.Agent) []int64 {
	var ids []int64
	for _, c := range a.Connections {
		ids = append(ids, c.ConnectionID)
	}
	slices.Sort(ids)
	return ids
}
