package integration

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/caddy-kas/caddy-kas/integration/fakegitaly"
	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// Log messages of the agent server about configurations.
const (
	msgInvalidConfig = "invalid agent configuration: keeping the last valid one; GitLab is not told of it"
	msgPollFailed    = "agent configuration poll failed: keeping the last configuration, retrying"
)

// waitLog waits until Caddy has logged a line with every field of want
// more than before times, and returns the last such line.
func (e *gitlabEnv) waitLog(t *testing.T, before int, want map[string]string) map[string]any {
	t.Helper()
	var last map[string]any
	err := kubetest.Eventually(30*time.Second, func() error {
		n := 0
		for _, entry := range jsonLogLines(e.caddy.proc.Stderr()) {
			matches := true
			for k, v := range want {
				matches = matches && fmt.Sprint(entry[k]) == v
			}
			if matches {
				n++
				last = entry
			}
		}
		if n <= before {
			return fmt.Errorf("no new log line %v", want)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return last
}

// whoamiWithNewPAT runs kubectl auth whoami with a new personal access
// token of maria's (a new one: answers for a used one are cached), and
// returns the username, or "" if the agent server refused the token.
func (e *gitlabEnv) whoamiWithNewPAT(t *testing.T) string {
	t.Helper()
	pat := kubetest.NewToken("maria's personal access token")
	e.gitlab.AddPersonalAccessToken(glMaria.Username, pat, "k8s_proxy")
	header := http.Header{"Authorization": {"Bearer " + patToken(glAgentID, pat)}}
	resp, body := e.caddy.proxyGet(t, "version", header)
	if resp.StatusCode == http.StatusUnauthorized {
		return ""
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET version with a PAT: %s %s", resp.Status, body)
	}
	return e.caddy.kubectlWithToken(t, "maria-"+kubetest.RandomHex(4), patToken(glAgentID, pat)).whoami(t).Username
}

// TestGitLabAgentConfiguration: the agent server reads the agent's
// config.yaml from Gitaly, hands GitLab only valid configurations, keeps
// the last valid one through mistakes in the file and through Gitaly
// outages, and an empty one when the file is deleted.
func TestGitLabAgentConfiguration(t *testing.T) {
	t.Parallel()
	s := requireSuite(t)
	e := startGitLabEnv(t, s, gitlabEnvOptions{config: glUserAccessAgent})
	if who := e.whoamiWithNewPAT(t); who != adminUser {
		t.Fatalf("whoami %q with user_access for the configuration project, want the agent's %q", who, adminUser)
	}

	t.Run("mistakes in the file keep the last valid configuration", func(t *testing.T) {
		for _, tc := range []struct {
			name, content, wantErr string
		}{
			{"invalid YAML", "user_access: [\n", "invalid YAML"},
			{"a wrong type", "user_access:\n  projects: yes\n", "user_access.projects"},
			{"an unknown field", "user_acess:\n  projects: [{id: " + glProjectPath + "}]\n", "user_acess"},
			{"a file over 128 KiB", "# " + strings.Repeat("x", 128*1024) + "\n", "128 KiB"},
		} {
			posted := len(e.gitlab.PostedConfigurations())
			logged := countLogEntries(e.caddy.proc.Stderr(), map[string]string{"msg": msgInvalidConfig})
			e.repo.WriteFile(glConfigPath, tc.content)
			commit := e.repo.Commit(tc.name)
			e.push(t)
			line := e.waitLog(t, logged, map[string]string{"msg": msgInvalidConfig})
			if line["commit_id"] != commit || fmt.Sprint(line["agent_id"]) != fmt.Sprint(glAgentID) ||
				!strings.Contains(fmt.Sprint(line["error"]), tc.wantErr) || line["level"] != "warn" {
				t.Errorf("%s: log line %v, want a warning with agent_id %d, commit_id %s and an error naming %q",
					tc.name, line, glAgentID, commit, tc.wantErr)
			}
			if n := len(e.gitlab.PostedConfigurations()) - posted; n != 0 {
				t.Errorf("%s: GitLab was told of %d configurations", tc.name, n)
			}
			if who := e.whoamiWithNewPAT(t); who != adminUser {
				t.Errorf("%s: whoami %q, want the last valid configuration's %q", tc.name, who, adminUser)
			}
		}
	})

	t.Run("a deleted file is an empty configuration", func(t *testing.T) {
		before := len(e.gitlab.PostedConfigurations())
		e.repo.Remove(glConfigPath)
		e.repo.Commit("remove the agent's configuration")
		e.push(t)
		e.waitPosted(t, before, "")
		if who := e.whoamiWithNewPAT(t); who != "" {
			t.Errorf("whoami %q without user_access, want a refusal", who)
		}
		e.setConfig(t, glUserAccessAgent)
	})

	t.Run("Gitaly down: the last configuration holds, polling resumes by itself", func(t *testing.T) {
		failed := countLogEntries(e.caddy.proc.Stderr(), map[string]string{"msg": msgPollFailed})
		e.gitaly.SetFailure(fakegitaly.MethodInfoRefsUploadPack, status.Error(codes.Unavailable, "gitaly is being restarted"))
		before := len(e.gitlab.PostedConfigurations())
		newConfig := userAccessConfig("{user: {}}")
		e.repo.WriteFile(glConfigPath, newConfig)
		e.repo.Commit("access as the user")
		e.push(t)
		line := e.waitLog(t, failed, map[string]string{"msg": msgPollFailed})
		if !strings.Contains(fmt.Sprint(line["error"]), "gitaly is being restarted") {
			t.Errorf("log line %v", line)
		}
		// Tunnels and the proxy go on with what GitLab was last told.
		if who := e.whoamiWithNewPAT(t); who != adminUser {
			t.Errorf("whoami %q while Gitaly is down, want %q", who, adminUser)
		}
		e.gitaly.SetFailure(fakegitaly.MethodInfoRefsUploadPack, nil)
		// No push: the poll retries on its own.
		e.waitPosted(t, before, newConfig)
		e.waitLog(t, 0, map[string]string{"msg": "agent configuration poll works again"})
		if who := e.whoamiWithNewPAT(t); who != "gitlab:user:maria" {
			t.Errorf("whoami %q after Gitaly came back, want gitlab:user:maria", who)
		}
	})

	t.Run("Gitaly slow: the proxy does not wait for it", func(t *testing.T) {
		e.gitaly.SetDelay(3 * time.Second)
		defer e.gitaly.SetDelay(0)
		before := len(e.gitlab.PostedConfigurations())
		e.repo.WriteFile(glConfigPath, glUserAccessAgent)
		e.repo.Commit("back to the agent's identity")
		e.push(t)
		// While the poll waits for Gitaly, requests go on.
		if who := e.whoamiWithNewPAT(t); who != "gitlab:user:maria" {
			t.Errorf("whoami %q while Gitaly is slow, want the configuration in force, gitlab:user:maria", who)
		}
		e.waitPosted(t, before, glUserAccessAgent)
		if who := e.whoamiWithNewPAT(t); who != adminUser {
			t.Errorf("whoami %q once the slow poll was done, want %q", who, adminUser)
		}
	})
}
