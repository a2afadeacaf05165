package integration

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/integration/fakegitlab"
	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// The GitLab the tests front: one agent, its configuration project in two
// groups, and GitLab's external URL.
const (
	glAgentID        = 11
	glAgentName      = "production-agent"
	glProjectID      = 100
	glProjectPath    = "platform/deployments"
	glExternalURL    = "https://gitlab.example.com"
	selfReviewPath   = "apis/authentication.k8s.io/v1/selfsubjectreviews"
	selfReviewObject = `{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}`
)

// gitlabEnv is a fake GitLab, a Caddy in GitLab mode in front of it, and
// the agent's agentk connected through it.
type gitlabEnv struct {
	gitlab     *fakegitlab.Server
	caddy      *caddyServer
	agentk     *agentk // nil with gitlabEnvOptions.noAgentk
	agentToken string
	secretFile string
	secret     []byte
}

// gitlabEnvOptions are what tests vary of a gitlabEnv.
type gitlabEnvOptions struct {
	apiListen string   // the Rails gRPC API's address; empty: none
	tls       bool     // GitLab serves HTTPS with its own CA, given to Caddy as ca_file
	extra     []string // more lines of the Caddyfile's gitlab block (cache TTLs, say)
	noAgentk  bool     // start no agentk of ours: the test connects its own agent (GitLab's agentk, say)
}

// startGitLabEnv starts it all.
func startGitLabEnv(t *testing.T, s *suite, o gitlabEnvOptions) *gitlabEnv {
	t.Helper()
	secret, secretFile := fakegitlab.NewSecret(t)
	// The secret, raw and as the file holds it, must never show in a
	// process's output either (checked when each process stops).
	kubetest.NoteSecret(string(secret), "the shared KAS secret")
	kubetest.NoteSecret(base64.StdEncoding.EncodeToString(secret), "the shared KAS secret file")
	start := fakegitlab.Start
	if o.tls {
		start = fakegitlab.StartTLS
	}
	e := &gitlabEnv{
		gitlab:     start(t, fakegitlab.Options{Secret: secret}),
		agentToken: kubetest.NewToken("agent token issued by gitlab"),
		secretFile: secretFile,
		secret:     secret,
	}
	e.gitlab.AddAgent(fakegitlab.Agent{ID: glAgentID, ProjectID: glProjectID, Name: glAgentName, Token: e.agentToken, ProjectPath: glProjectPath})
	e.caddy = startCaddy(t, s, kasConfig{
		waitForAgent: "2s",
		gitlab: &gitlabOptions{
			url:         e.gitlab.URL,
			secretFile:  secretFile,
			caFile:      e.gitlab.CAFile(),
			externalURL: glExternalURL,
			apiListen:   o.apiListen,
			extra:       o.extra,
		},
	})
	if o.noAgentk {
		return e
	}
	e.agentk = e.caddy.startAgentk(t, agentkOptions{agentID: glAgentID, token: e.agentToken})
	e.agentk.waitReady(t)
	return e
}

// ciKubeconfig writes a kubeconfig shaped like the one GitLab gives a CI
// job (kas-spec §2.5: Ci::GenerateKubeconfigService): cluster "gitlab",
// user "agent:<id>" with token "ci:<id>:<job token>", context
// "<configuration project path>:<agent name>". GitLab adds no CA for a
// public certificate; Caddy's internal CA stands in for one here.
func (e *gitlabEnv) ciKubeconfig(t *testing.T, jobToken string) kubectl {
	t.Helper()
	user := fmt.Sprintf("agent:%d", glAgentID)
	context := glProjectPath + ":" + glAgentName
	config := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: gitlab
  cluster:
    server: %q
    certificate-authority: %q
users:
- name: %q
  user:
    token: %q
contexts:
- name: %q
  context:
    cluster: gitlab
    user: %q
`, e.caddy.proxyURL(), e.caddy.rootCAFile(), user, fmt.Sprintf("ci:%d:%s", glAgentID, jobToken), context, user)
	path := filepath.Join(e.caddy.dir, "ci-"+kubetest.RandomHex(4)+".kubeconfig")
	if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	home := filepath.Join(e.caddy.dir, "kubectl-home")
	if err := os.MkdirAll(home, 0o700); err != nil {
		t.Fatal(err)
	}
	// CI jobs pick the agent by its context: kubectl config use-context.
	return kubectl{bin: e.caddy.suite.kubectlBin, kubeconfig: path, context: context, home: home}
}

func TestGitLabCIAccess(t *testing.T) {
	s := requireSuite(t)
	e := startGitLabEnv(t, s, gitlabEnvOptions{})

	job := fakegitlab.Job{
		JobID: 4001, PipelineID: 501, ProjectID: 200, ProjectGroups: []int64{23, 25},
		User:        fakegitlab.User{ID: 7, Username: "deploy-bot", RolesInProject: []string{"developer"}},
		Environment: &fakegitlab.Environment{Tier: "production", Slug: "prod"},
	}
	tests := []struct {
		name     string
		accessAs string // JSON; empty: the key is left out
		env      bool   // whether the job has an environment
		want     userInfo
	}{
		{
			name: "ci_job with environment", accessAs: `{"ci_job":{}}`, env: true,
			want: userInfo{
				Username: "gitlab:ci_job:4001",
				Groups: []string{"gitlab:ci_job",
					"gitlab:group:23", "gitlab:group_env_tier:23:production",
					"gitlab:group:25", "gitlab:group_env_tier:25:production",
					"gitlab:project:200", "gitlab:project_env:200:prod", "gitlab:project_env_tier:200:production",
					"system:authenticated"},
				Extra: map[string][]string{
					"agent.gitlab.com/id":                {"11"},
					"agent.gitlab.com/config_project_id": {"100"},
					"agent.gitlab.com/project_id":        {"200"},
					"agent.gitlab.com/ci_pipeline_id":    {"501"},
					"agent.gitlab.com/ci_job_id":         {"4001"},
					"agent.gitlab.com/username":          {"deploy-bot"},
					"agent.gitlab.com/environment_slug":  {"prod"},
					"agent.gitlab.com/environment_tier":  {"production"},
				},
			},
		},
		{
			name: "ci_job without environment", accessAs: `{"ci_job":{}}`,
			want: userInfo{
				Username: "gitlab:ci_job:4001",
				Groups:   []string{"gitlab:ci_job", "gitlab:group:23", "gitlab:group:25", "gitlab:project:200", "system:authenticated"},
				Extra: map[string][]string{
					"agent.gitlab.com/id":                {"11"},
					"agent.gitlab.com/config_project_id": {"100"},
					"agent.gitlab.com/project_id":        {"200"},
					"agent.gitlab.com/ci_pipeline_id":    {"501"},
					"agent.gitlab.com/ci_job_id":         {"4001"},
					"agent.gitlab.com/username":          {"deploy-bot"},
				},
			},
		},
		{
			name:     "impersonate",
			accessAs: `{"impersonate":{"username":"ci-deployer","uid":"u-1","groups":["deployers","auditors"],"extra":[{"key":"team","val":["platform","sre"]}]}}`,
			want: userInfo{
				Username: "ci-deployer", UID: "u-1",
				Groups: []string{"deployers", "auditors", "system:authenticated"},
				Extra:  map[string][]string{"team": {"platform", "sre"}},
			},
		},
		{
			name: "agent (access_as absent)",
			want: userInfo{Username: adminUser, UID: adminUser + "-uid", Groups: []string{"system:masters", "system:authenticated"}},
		},
		{
			name: "agent (access_as agent)", accessAs: `{"agent":{}}`,
			want: userInfo{Username: adminUser, UID: adminUser + "-uid", Groups: []string{"system:masters", "system:authenticated"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			j := job
			j.Token = kubetest.NewToken("ci job token " + tt.name)
			if !tt.env {
				j.Environment = nil
			}
			var accessAs json.RawMessage
			if tt.accessAs != "" {
				accessAs = json.RawMessage(tt.accessAs)
			}
			j.AllowedAgents = []fakegitlab.AllowedAgent{{ID: glAgentID, ConfigProjectID: glProjectID, DefaultNamespace: "default", AccessAs: accessAs}}
			e.gitlab.AddJob(j)
			got := e.ciKubeconfig(t, j.Token).whoami(t)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("kubectl auth whoami:\n got %+v\nwant %+v", got, tt.want)
			}
		})
	}

	t.Run("client impersonation only with access_as agent", func(t *testing.T) {
		for _, accessAs := range []string{`{"agent":{}}`, `{"ci_job":{}}`} {
			j := job
			j.Token = kubetest.NewToken("ci job token for --as " + accessAs)
			j.AllowedAgents = []fakegitlab.AllowedAgent{{ID: glAgentID, ConfigProjectID: glProjectID, AccessAs: json.RawMessage(accessAs)}}
			e.gitlab.AddJob(j)
			k := e.ciKubeconfig(t, j.Token)
			if accessAs == `{"agent":{}}` {
				if got := k.whoami(t, "--as", aliceUser); got.Username != aliceUser {
					t.Errorf("--as with access_as agent: whoami %q, want %q", got.Username, aliceUser)
				}
				continue
			}
			k.mustFail(t, "nested impersonation is not supported", "auth", "whoami", "--as", aliceUser)
		}
	})

	t.Run("refusals", func(t *testing.T) {
		other := job
		other.Token = kubetest.NewToken("ci job token of another agent's project")
		other.AllowedAgents = []fakegitlab.AllowedAgent{{ID: 99, ConfigProjectID: 990}}
		e.gitlab.AddJob(other)
		resp, body := e.caddy.proxyGet(t, "api", http.Header{"Authorization": {fmt.Sprintf("Bearer ci:%d:%s", glAgentID, other.Token)}})
		if st := requireStatus(t, resp, body, http.StatusForbidden); !strings.Contains(st.Message, "agentId is not allowed") {
			t.Errorf("agent not in allowed_agents: message %q", st.Message)
		}
		resp, body = e.caddy.proxyGet(t, "api", http.Header{"Authorization": {fmt.Sprintf("Bearer ci:%d:%s", glAgentID, "not-a-job-token")}})
		requireStatus(t, resp, body, http.StatusUnauthorized)
		if resp.Header.Get("Gitlab-Unauthorized") != "true" {
			t.Errorf("unknown job token: 401 without Gitlab-Unauthorized: %v", resp.Header)
		}
	})

	t.Run("allowed_agents is cached", func(t *testing.T) {
		j := job
		j.Token = kubetest.NewToken("ci job token for the cache test")
		j.AllowedAgents = []fakegitlab.AllowedAgent{{ID: glAgentID, ConfigProjectID: glProjectID, AccessAs: json.RawMessage(`{"ci_job":{}}`)}}
		e.gitlab.AddJob(j)
		before := e.gitlab.Calls(fakegitlab.PathAllowedAgents)
		client := e.caddy.httpClient(t)
		var wg sync.WaitGroup
		errs := make(chan error, 50)
		for i := range 50 {
			wg.Go(func() {
				// Half at once, half one after another: both the
				// coalescing of concurrent misses and the cache count.
				if i >= 25 {
					time.Sleep(time.Duration(i-25) * 10 * time.Millisecond)
				}
				req, _ := http.NewRequest(http.MethodGet, e.caddy.proxyURL()+"api", nil)
				req.Header.Set("Authorization", fmt.Sprintf("Bearer ci:%d:%s", glAgentID, j.Token))
				resp, err := client.Do(req)
				if err != nil {
					errs <- err
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					errs <- fmt.Errorf("request %d: %s", i, resp.Status)
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if n := e.gitlab.Calls(fakegitlab.PathAllowedAgents) - before; n != 1 {
			t.Errorf("50 requests with one job token made %d allowed_agents calls, want 1", n)
		}
	})
}

func TestGitLabUserAccess(t *testing.T) {
	s := requireSuite(t)
	e := startGitLabEnv(t, s, gitlabEnvOptions{})
	user := fakegitlab.User{ID: 42, Username: "maria"}
	userAccessAs := json.RawMessage(`{"user":{"projects":[{"id":100,"roles":["developer","maintainer"]}],"groups":[{"id":23,"roles":["developer"]}]}}`)
	wantUser := func(accessType string) userInfo {
		return userInfo{
			Username: "gitlab:user:maria",
			Groups: []string{"gitlab:user", "gitlab:project_role:100:developer", "gitlab:project_role:100:maintainer",
				"gitlab:group_role:23:developer", "system:authenticated"},
			Extra: map[string][]string{
				"agent.gitlab.com/id":                {"11"},
				"agent.gitlab.com/username":          {"maria"},
				"agent.gitlab.com/access_type":       {accessType},
				"agent.gitlab.com/config_project_id": {"100"},
			},
		}
	}

	t.Run("personal access token", func(t *testing.T) {
		pat := kubetest.NewToken("maria's personal access token")
		e.gitlab.AddUserAccess(fakegitlab.UserAccess{AgentID: glAgentID, AccessType: fakegitlab.AccessTypePersonalAccessToken,
			AccessKey: pat, User: user, ConfigProjectID: glProjectID, AccessAs: userAccessAs})
		k := e.caddy.kubectlWithToken(t, "maria-pat", patToken(glAgentID, pat))
		if got, want := k.whoami(t), wantUser("personal_access_token"); !reflect.DeepEqual(got, want) {
			t.Errorf("kubectl auth whoami:\n got %+v\nwant %+v", got, want)
		}
		k.mustFail(t, "nested impersonation is not supported", "auth", "whoami", "--as", aliceUser)
	})

	t.Run("personal access token, access_as agent", func(t *testing.T) {
		pat := kubetest.NewToken("maria's other token")
		e.gitlab.AddUserAccess(fakegitlab.UserAccess{AgentID: glAgentID, AccessType: fakegitlab.AccessTypePersonalAccessToken,
			AccessKey: pat, User: user, ConfigProjectID: glProjectID, AccessAs: json.RawMessage(`{"agent":{}}`)})
		k := e.caddy.kubectlWithToken(t, "maria-pat-agent", patToken(glAgentID, pat))
		if got := k.whoami(t); got.Username != adminUser {
			t.Errorf("whoami %q, want the agent's own %q", got.Username, adminUser)
		}
	})

	t.Run("refused personal access tokens are all 401", func(t *testing.T) {
		for _, status := range []int{http.StatusUnauthorized, http.StatusForbidden, http.StatusNotFound} {
			pat := kubetest.NewToken(fmt.Sprintf("token gitlab answers %d", status))
			e.gitlab.AddUserAccess(fakegitlab.UserAccess{AgentID: glAgentID, AccessType: fakegitlab.AccessTypePersonalAccessToken,
				AccessKey: pat, Status: status, User: user, ConfigProjectID: glProjectID})
			resp, body := e.caddy.proxyGet(t, "api", http.Header{"Authorization": {"Bearer " + patToken(glAgentID, pat)}})
			requireStatus(t, resp, body, http.StatusUnauthorized)
		}
	})

	// The GitLab UI's session cookie, as its pages send it: Rack escapes
	// the value, and the CSRF token and agent id come as headers, or, for
	// browser WebSockets, as query parameters.
	cookie := "2f9a1c%3D" + kubetest.NewToken("maria's session cookie") + "/value+with chars"
	csrf := kubetest.NewToken("csrf token")
	e.gitlab.AddUserAccess(fakegitlab.UserAccess{AgentID: glAgentID, AccessType: fakegitlab.AccessTypeSessionCookie,
		AccessKey: mustUnescape(t, cookie), CSRFToken: csrf, User: user, ConfigProjectID: glProjectID, AccessAs: userAccessAs})
	client := e.caddy.httpClient(t)
	review := func(t *testing.T, query string, header http.Header) (*http.Response, []byte) {
		t.Helper()
		req, err := http.NewRequest(http.MethodPost, e.caddy.proxyURL()+selfReviewPath+query, strings.NewReader(selfReviewObject))
		if err != nil {
			t.Fatal(err)
		}
		req.Header = header
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp, body
	}
	cookieHeader := func(extra http.Header) http.Header {
		h := http.Header{"Cookie": {"_gitlab_kas=" + cookie}, "Origin": {glExternalURL}}
		for k, v := range extra {
			h[k] = v
		}
		return h
	}

	t.Run("session cookie", func(t *testing.T) {
		for _, form := range []struct {
			name, query string
			header      http.Header
		}{
			{"headers", "", http.Header{"Gitlab-Agent-Id": {fmt.Sprint(glAgentID)}, "X-Csrf-Token": {csrf}}},
			{"query", fmt.Sprintf("?gitlab-agent-id=%d&gitlab-csrf-token=%s", glAgentID, url.QueryEscape(csrf)), nil},
		} {
			resp, body := review(t, form.query, cookieHeader(form.header))
			if resp.StatusCode != http.StatusCreated {
				t.Fatalf("%s: %s %s", form.name, resp.Status, body)
			}
			var got struct {
				Status struct {
					UserInfo userInfo `json:"userInfo"`
				} `json:"status"`
			}
			if err := json.Unmarshal(body, &got); err != nil {
				t.Fatal(err)
			}
			if want := wantUser("session_cookie"); !reflect.DeepEqual(got.Status.UserInfo, want) {
				t.Errorf("%s: SelfSubjectReview:\n got %+v\nwant %+v", form.name, got.Status.UserInfo, want)
			}
			if resp.Header.Get("Access-Control-Allow-Origin") != glExternalURL || resp.Header.Get("Access-Control-Allow-Credentials") != "true" {
				t.Errorf("%s: CORS headers %v", form.name, resp.Header)
			}
		}
	})

	t.Run("session cookie without CSRF token", func(t *testing.T) {
		resp, body := review(t, "", cookieHeader(http.Header{"Gitlab-Agent-Id": {fmt.Sprint(glAgentID)}}))
		requireStatus(t, resp, body, http.StatusUnauthorized)
		if resp.Header.Get("Gitlab-Unauthorized") != "true" {
			t.Errorf("401 without Gitlab-Unauthorized: %v", resp.Header)
		}
	})

	t.Run("session cookie with a wrong CSRF token", func(t *testing.T) {
		resp, body := review(t, "", cookieHeader(http.Header{"Gitlab-Agent-Id": {fmt.Sprint(glAgentID)}, "X-Csrf-Token": {"forged"}}))
		requireStatus(t, resp, body, http.StatusUnauthorized)
	})

	t.Run("wrong origin", func(t *testing.T) {
		before := e.gitlab.Calls(fakegitlab.PathAuthorizeProxyUser)
		h := cookieHeader(http.Header{"Gitlab-Agent-Id": {fmt.Sprint(glAgentID)}, "X-Csrf-Token": {csrf}})
		h.Set("Origin", "https://evil.example.com")
		resp, body := review(t, "", h)
		if resp.StatusCode != http.StatusForbidden || len(body) != 0 {
			t.Errorf("wrong origin: %s with %d bytes of body, want 403 without a body", resp.Status, len(body))
		}
		if n := e.gitlab.Calls(fakegitlab.PathAuthorizeProxyUser) - before; n != 0 {
			t.Errorf("a request from a wrong origin reached GitLab (%d calls)", n)
		}
	})

	t.Run("preflight", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodOptions, e.caddy.proxyURL()+selfReviewPath, nil)
		req.Header = http.Header{"Origin": {glExternalURL}, "Access-Control-Request-Method": {"POST"},
			"Access-Control-Request-Headers": {"content-type,gitlab-agent-id,x-csrf-token"}}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK ||
			resp.Header.Get("Access-Control-Allow-Headers") != "content-type,gitlab-agent-id,x-csrf-token" ||
			resp.Header.Get("Access-Control-Max-Age") != "86400" {
			t.Errorf("preflight: %s %v", resp.Status, resp.Header)
		}
	})
}

func mustUnescape(t *testing.T, s string) string {
	t.Helper()
	v, err := url.QueryUnescape(s)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestGitLabAgentTokens(t *testing.T) {
	s := requireSuite(t)

	t.Run("a reconnecting agent costs one agent_info call per TTL", func(t *testing.T) {
		e := startGitLabEnv(t, s, gitlabEnvOptions{})
		a := e.agentk
		for range 3 {
			a.proc.Kill()
			a = a.restart(t)
			a.waitReady(t)
		}
		if n := e.gitlab.Calls(fakegitlab.PathAgentInfo); n != 1 {
			t.Errorf("4 connections within the TTL made %d agent_info calls, want 1", n)
		}
	})

	t.Run("a revoked token closes the tunnel", func(t *testing.T) {
		// Short TTLs: the connected agent's token is checked every second.
		e := startGitLabEnv(t, s, gitlabEnvOptions{extra: []string{"agent_info_cache_ttl 1s", "agent_info_cache_error_ttl 1s"}})
		e.gitlab.RevokeAgentToken(e.agentToken)
		err := kubetest.Eventually(30*time.Second, func() error {
			code, err := e.agentk.readiness()
			if err == nil && code == http.StatusOK {
				return fmt.Errorf("agentk still ready")
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		resp, body := e.caddy.proxyGet(t, "api", http.Header{"Authorization": {"Bearer pat:11:whatever"}})
		requireStatus(t, resp, body, http.StatusUnauthorized)
		if n := countLogEntries(e.caddy.proc.Stderr(), map[string]string{"msg": "closing tunnel: agent token revoked"}); n == 0 {
			t.Error("no log line for the revoked tunnel")
		}
	})

	t.Run("GitLab over HTTPS with its own CA", func(t *testing.T) {
		e := startGitLabEnv(t, s, gitlabEnvOptions{tls: true})
		if n := e.gitlab.Calls(fakegitlab.PathAgentInfo); n != 1 {
			t.Errorf("%d agent_info calls over HTTPS, want 1", n)
		}
		pat := kubetest.NewToken("token checked over https")
		e.gitlab.AddUserAccess(fakegitlab.UserAccess{AgentID: glAgentID, AccessType: fakegitlab.AccessTypePersonalAccessToken,
			AccessKey: pat, User: fakegitlab.User{ID: 3, Username: "tls-user"}, ConfigProjectID: glProjectID})
		if who := e.caddy.kubectlWithToken(t, "over-tls", patToken(glAgentID, pat)).whoami(t); who.Username != adminUser {
			t.Errorf("whoami %q, want the agent's %q", who.Username, adminUser)
		}
	})

	t.Run("an unknown token is refused", func(t *testing.T) {
		e := startGitLabEnv(t, s, gitlabEnvOptions{})
		bad := e.caddy.startAgentk(t, agentkOptions{agentID: glAgentID, token: "not-an-agent-token"})
		err := kubetest.Eventually(30*time.Second, func() error {
			if !strings.Contains(bad.proc.Stderr(), "401") {
				return fmt.Errorf("agentk has not logged a 401 yet")
			}
			return nil
		})
		if err != nil {
			t.Fatalf("%v\n%s", err, bad.proc.Stderr())
		}
	})
}

// TestGitLabSecretFileRules: a secret that is not the base64 of exactly 32
// bytes stops Caddy from starting, with a message that names the file and
// the rule.
func TestGitLabSecretFileRules(t *testing.T) {
	s := requireSuite(t)
	dir := testDir(t, s)
	tests := []struct{ name, content string }{
		{"16 bytes", "MDEyMzQ1Njc4OWFiY2RlZg==\n"},
		{"not base64", "this is not base64!\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			secretFile := filepath.Join(dir, strings.ReplaceAll(tt.name, " ", "-")+".secret")
			if err := os.WriteFile(secretFile, []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			caddyfile := filepath.Join(dir, strings.ReplaceAll(tt.name, " ", "-")+".Caddyfile")
			config := fmt.Sprintf(`{
	admin off
	kas {
		gitlab {
			url http://127.0.0.1:1
			secret_file %s
		}
	}
}
http://127.0.0.1:%d {
	kubernetes_agent
}
`, secretFile, mustFreeLoopbackPorts(t, 1)[0])
			if err := os.WriteFile(caddyfile, []byte(config), 0o600); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, s.caddyBin, "run", "--config", caddyfile, "--adapter", "caddyfile")
			cmd.Env = append(kubetest.EnvironWithout("HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME"), "HOME="+dir,
				"XDG_CONFIG_HOME="+filepath.Join(dir, "config"), "XDG_DATA_HOME="+filepath.Join(dir, "data"))
			out, err := cmd.CombinedOutput()
			if err == nil || ctx.Err() != nil {
				t.Fatalf("caddy run did not refuse to start (err %v):\n%s", err, out)
			}
			if !strings.Contains(string(out), secretFile) || !strings.Contains(string(out), "exactly 32 bytes") {
				t.Errorf("the error does not name the file and the rule:\n%s", out)
			}
		})
	}
}
