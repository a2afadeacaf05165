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
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/agentconfig"
	"github.com/caddy-kas/caddy-kas/integration/fakegitaly"
	"github.com/caddy-kas/caddy-kas/integration/fakegitlab"
	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/event"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/notificationsrpc"
)

// The GitLab the tests front: groups platform and platform/apps; the
// agent's configuration project platform/deployments, whose repository
// is in the Gitaly double; the application projects platform/apps/web and
// platform/other, where CI jobs run; users; and GitLab's external URL.
const (
	glAgentID        = 11
	glAgentName      = "production-agent"
	glGroupID        = 23
	glGroupPath      = "platform"
	glAppsGroupID    = 25
	glAppsGroupPath  = "platform/apps"
	glProjectID      = 100
	glProjectPath    = "platform/deployments"
	glAppProjectID   = 200
	glAppProjectPath = "platform/apps/web"
	glOtherProjectID = 300
	glOtherProject   = "platform/other"
	glExternalURL    = "https://gitlab.example.com"
	selfReviewPath   = "apis/authentication.k8s.io/v1/selfsubjectreviews"
	selfReviewObject = `{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}`
	// glConfigPath is the agent's configuration file in its project.
	glConfigPath = ".gitlab/agents/" + glAgentName + "/config.yaml"
)

// glUserAccessAgent is a configuration that lets the members of the
// configuration project use the agent with its own identity.
const glUserAccessAgent = "user_access:\n  access_as: {agent: {}}\n  projects: [{id: " + glProjectPath + "}]\n"

// The users of the GitLab: maria, Maintainer of the configuration project
// and Developer in the group platform; deploy-bot, Developer of
// platform/apps/web, whom CI jobs run for; and rita, a Reporter in the
// group platform.
var (
	glMaria     = fakegitlab.User{ID: 42, Username: "maria"}
	glDeployBot = fakegitlab.User{ID: 7, Username: "deploy-bot"}
	glRita      = fakegitlab.User{ID: 43, Username: "rita"}
)

// gitlabEnv is a fake GitLab with its Gitaly, a Caddy in GitLab mode in
// front of it, and the agent's agentk connected through it.
type gitlabEnv struct {
	gitlab     *fakegitlab.Server
	gitaly     *fakegitaly.Server
	repo       *fakegitaly.Repo // the agent's configuration project
	caddy      *caddyServer
	agentk     *agentk // nil with gitlabEnvOptions.noAgentk
	agentToken string
	secretFile string
	secret     []byte
	apiAddress string
	rails      *railsClient // nil when the API speaks TLS
}

// gitlabEnvOptions are what tests vary of a gitlabEnv.
type gitlabEnvOptions struct {
	apiListen string   // the Rails gRPC API's address; empty: a free loopback port
	apiTLS    bool     // extra configures api_tls: no plain-text Rails client
	tls       bool     // GitLab serves HTTPS with its own CA, given to Caddy as ca_file
	extra     []string // more lines of the Caddyfile's gitlab block (cache TTLs, say)
	noAgentk  bool     // start no agentk of ours: the test connects its own agent (GitLab's agentk, say)
	// config is the agent's configuration file at the start; empty means
	// an empty file.
	config string
	// agentKubeconfig is the cluster our agentk reaches; empty: the test
	// kube-apiserver.
	agentKubeconfig string
	// sites, when set, gives Caddy more sites, made once GitLab runs.
	sites func(e *gitlabEnv) []caddySite
}

// startGitLabEnv starts it all.
func startGitLabEnv(t *testing.T, s *suite, o gitlabEnvOptions) *gitlabEnv {
	t.Helper()
	secret, secretFile := fakegitlab.NewSecret(t)
	// The secret, raw and as the file holds it, must never show in a
	// process's output either (checked when each process stops).
	kubetest.NoteSecret(string(secret), "the shared KAS secret")
	kubetest.NoteSecret(base64.StdEncoding.EncodeToString(secret), "the shared KAS secret file")
	gitalyToken := kubetest.NewToken("gitaly token")
	gitaly := fakegitaly.Start(t, fakegitaly.Options{Token: gitalyToken})
	start := fakegitlab.Start
	if o.tls {
		start = fakegitlab.StartTLS
	}
	e := &gitlabEnv{
		gitlab:     start(t, fakegitlab.Options{Secret: secret, Gitaly: gitaly}),
		gitaly:     gitaly,
		agentToken: kubetest.NewToken("agent token issued by gitlab"),
		secretFile: secretFile,
		secret:     secret,
		apiAddress: o.apiListen,
	}
	if e.apiAddress == "" {
		e.apiAddress = fmt.Sprintf("127.0.0.1:%d", mustFreeLoopbackPorts(t, 1)[0])
	}
	if !o.apiTLS {
		e.rails = newRailsClient(t, e.apiAddress, secret)
	}
	e.repo = gitaly.AddRepository(fakegitaly.RepoOptions{GlRepository: fmt.Sprintf("project-%d", glProjectID), GlProjectPath: glProjectPath})
	e.repo.WriteFile(glConfigPath, o.config)
	e.repo.Commit("register the agent")
	g := e.gitlab
	g.AddGroup(fakegitlab.Group{ID: glGroupID, Path: glGroupPath})
	g.AddGroup(fakegitlab.Group{ID: glAppsGroupID, Path: glAppsGroupPath})
	g.AddProject(fakegitlab.Project{ID: glProjectID, Path: glProjectPath, Repo: e.repo})
	g.AddProject(fakegitlab.Project{ID: glAppProjectID, Path: glAppProjectPath})
	g.AddProject(fakegitlab.Project{ID: glOtherProjectID, Path: glOtherProject})
	for _, u := range []fakegitlab.User{glMaria, glDeployBot, glRita} {
		g.AddUser(u)
	}
	g.AddMember(glMaria.Username, glProjectPath, "maintainer")
	g.AddMember(glMaria.Username, glGroupPath, "developer")
	g.AddMember(glDeployBot.Username, glAppProjectPath, "developer")
	g.AddMember(glRita.Username, glGroupPath, "reporter")
	g.AddAgent(fakegitlab.Agent{ID: glAgentID, ProjectID: glProjectID, Name: glAgentName, Token: e.agentToken})
	var sites []caddySite
	if o.sites != nil {
		sites = o.sites(e)
	}
	e.caddy = startCaddy(t, s, kasConfig{
		waitForAgent: "2s",
		sites:        sites,
		gitlab: &gitlabOptions{
			url:         e.gitlab.URL,
			secretFile:  secretFile,
			caFile:      e.gitlab.CAFile(),
			externalURL: glExternalURL,
			apiListen:   e.apiAddress,
			extra:       o.extra,
		},
	})
	if o.noAgentk {
		return e
	}
	e.agentk = e.caddy.startAgentk(t, agentkOptions{agentID: glAgentID, token: e.agentToken, kubeconfig: o.agentKubeconfig})
	e.agentk.waitReady(t)
	// The agent's tunnel makes KAS read its configuration and hand it to
	// GitLab.
	e.waitPosted(t, 0, o.config)
	return e
}

// setConfig commits content as the agent's configuration file, tells the
// agent server of the push as Rails does (Notifications/GitPushEvent), and
// waits until the agent server has handed GitLab the configuration of the
// new commit, which it checks is content as GitLab's KAS would post it.
func (e *gitlabEnv) setConfig(t *testing.T, content string) {
	t.Helper()
	before := len(e.gitlab.PostedConfigurations())
	e.repo.WriteFile(glConfigPath, content)
	e.repo.Commit("change the agent's configuration")
	e.push(t)
	e.waitPosted(t, before, content)
}

// push tells the agent server of a push to the configuration project, as
// Rails does after every push.
func (e *gitlabEnv) push(t *testing.T) {
	t.Helper()
	if e.rails == nil {
		t.Fatal("no plain-text Rails client for this environment")
	}
	_, err := notificationsrpc.NewNotificationsClient(e.rails.conn).GitPushEvent(e.rails.ctx(t, nil, "gitlab-kas"),
		&notificationsrpc.GitPushEventRequest{Event: &event.GitPushEvent{Project: &event.Project{Id: glProjectID, FullPath: glProjectPath}}})
	if err != nil {
		t.Fatalf("GitPushEvent: %v", err)
	}
}

// waitPosted waits until a configuration posted after the first before
// ones is content's, and returns it.
func (e *gitlabEnv) waitPosted(t *testing.T, before int, content string) fakegitlab.PostedConfiguration {
	t.Helper()
	want := railsBody(t, content)
	var got fakegitlab.PostedConfiguration
	err := kubetest.Eventually(30*time.Second, func() error {
		posted := e.gitlab.PostedConfigurations()
		for _, p := range posted[min(before, len(posted)):] {
			if jsonEqual(p.Body, want) {
				got = p
				return nil
			}
		}
		return fmt.Errorf("%d configurations posted since, none is %s", len(posted)-before, want)
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// railsBody is the agent_configuration body for content.
func railsBody(t *testing.T, content string) []byte {
	t.Helper()
	f, err := agentconfig.Parse([]byte(content))
	if err != nil {
		t.Fatalf("the test's configuration is invalid: %v", err)
	}
	b, err := agentconfig.RailsBody(glAgentID, f)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// jsonEqual compares two JSON documents by value.
func jsonEqual(a, b []byte) bool {
	var x, y any
	return json.Unmarshal(a, &x) == nil && json.Unmarshal(b, &y) == nil && reflect.DeepEqual(x, y)
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

// ciAccessConfig is a configuration whose ci_access has one entry of kind
// ("projects" or "groups") for id, with default namespace "default" and
// access_as (YAML or JSON; empty: none).
func ciAccessConfig(kind, id, accessAs string) string {
	c := "ci_access:\n  " + kind + ":\n  - id: " + id + "\n    default_namespace: default\n"
	if accessAs != "" {
		c += "    access_as: " + accessAs + "\n"
	}
	return c
}

func TestGitLabCIAccess(t *testing.T) {
	s := requireSuite(t)
	e := startGitLabEnv(t, s, gitlabEnvOptions{})

	job := fakegitlab.Job{
		JobID: 4001, PipelineID: 501, ProjectID: glAppProjectID, Username: glDeployBot.Username,
		Environment: &fakegitlab.Environment{Name: "production", Tier: "production", Slug: "prod"},
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
			e.setConfig(t, ciAccessConfig("projects", glAppProjectPath, tt.accessAs))
			j := job
			j.Token = kubetest.NewToken("ci job token " + tt.name)
			if !tt.env {
				j.Environment = nil
			}
			e.gitlab.AddJob(j)
			got := e.ciKubeconfig(t, j.Token).whoami(t)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("kubectl auth whoami:\n got %+v\nwant %+v", got, tt.want)
			}
		})
	}

	t.Run("client impersonation only with access_as agent", func(t *testing.T) {
		for _, accessAs := range []string{`{"agent":{}}`, `{"ci_job":{}}`} {
			e.setConfig(t, ciAccessConfig("projects", glAppProjectPath, accessAs))
			j := job
			j.Token = kubetest.NewToken("ci job token for --as " + accessAs)
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
		e.setConfig(t, ciAccessConfig("projects", glAppProjectPath, `{"ci_job":{}}`))
		other := job
		other.ProjectID = glOtherProjectID // in the group, but not in ci_access
		other.Token = kubetest.NewToken("ci job token of a project the configuration does not list")
		e.gitlab.AddJob(other)
		resp, body := e.caddy.proxyGet(t, "api/v1", http.Header{"Authorization": {fmt.Sprintf("Bearer ci:%d:%s", glAgentID, other.Token)}})
		if st := requireStatus(t, resp, body, http.StatusForbidden); !strings.Contains(st.Message, "agentId is not allowed") {
			t.Errorf("agent not in allowed_agents: message %q", st.Message)
		}
		resp, body = e.caddy.proxyGet(t, "api/v1", http.Header{"Authorization": {fmt.Sprintf("Bearer ci:%d:%s", glAgentID, "not-a-job-token")}})
		requireStatus(t, resp, body, http.StatusUnauthorized)
		if resp.Header.Get("Gitlab-Unauthorized") != "true" {
			t.Errorf("unknown job token: 401 without Gitlab-Unauthorized: %v", resp.Header)
		}
	})

	t.Run("a group in ci_access", func(t *testing.T) {
		// The group platform/apps authorizes its project platform/apps/web
		// but not platform/other, which is in platform only.
		e.setConfig(t, ciAccessConfig("groups", glAppsGroupPath, `{impersonate: {username: group-deployer, groups: [apps]}}`))
		j := job
		j.Token = kubetest.NewToken("ci job token, group access")
		e.gitlab.AddJob(j)
		if got := e.ciKubeconfig(t, j.Token).whoami(t); got.Username != "group-deployer" || !slices.Contains(got.Groups, "apps") {
			t.Errorf("whoami through the group's ci_access: %+v", got)
		}
		other := job
		other.ProjectID = glOtherProjectID
		other.Token = kubetest.NewToken("ci job token, outside the group")
		e.gitlab.AddJob(other)
		resp, body := e.caddy.proxyGet(t, "api/v1", http.Header{"Authorization": {fmt.Sprintf("Bearer ci:%d:%s", glAgentID, other.Token)}})
		requireStatus(t, resp, body, http.StatusForbidden)
	})

	t.Run("removing the entry takes access away", func(t *testing.T) {
		e.setConfig(t, ciAccessConfig("projects", glAppProjectPath, `{ci_job: {}}`))
		j := job
		j.Token = kubetest.NewToken("ci job token before the entry is removed")
		e.gitlab.AddJob(j)
		if got := e.ciKubeconfig(t, j.Token).whoami(t); got.Username != "gitlab:ci_job:4001" {
			t.Fatalf("whoami %q before the change", got.Username)
		}
		e.setConfig(t, "ci_access:\n  projects: []\n")
		// A new job: the answer for the old one's token is cached for
		// allowed_agents_cache_ttl, as in GitLab's KAS.
		after := job
		after.Token = kubetest.NewToken("ci job token after the entry is removed")
		e.gitlab.AddJob(after)
		resp, body := e.caddy.proxyGet(t, "api/v1", http.Header{"Authorization": {fmt.Sprintf("Bearer ci:%d:%s", glAgentID, after.Token)}})
		if st := requireStatus(t, resp, body, http.StatusForbidden); !strings.Contains(st.Message, "agentId is not allowed") {
			t.Errorf("after the entry was removed: message %q", st.Message)
		}
	})

	t.Run("allowed_agents is cached", func(t *testing.T) {
		e.setConfig(t, ciAccessConfig("projects", glAppProjectPath, `{"ci_job":{}}`))
		j := job
		j.Token = kubetest.NewToken("ci job token for the cache test")
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

// userAccessConfig lets the Developers of the configuration project and
// of the group platform use the agent, with access_as.
func userAccessConfig(accessAs string) string {
	return "user_access:\n  access_as: " + accessAs + "\n  projects: [{id: " + glProjectPath + "}]\n  groups: [{id: " + glGroupPath + "}]\n"
}

func TestGitLabUserAccess(t *testing.T) {
	s := requireSuite(t)
	e := startGitLabEnv(t, s, gitlabEnvOptions{})
	// Nothing is configured yet: GitLab refuses everyone.
	early := kubetest.NewToken("maria's token before any user_access")
	e.gitlab.AddPersonalAccessToken(glMaria.Username, early, "k8s_proxy")
	resp, body := e.caddy.proxyGet(t, "api/v1", http.Header{"Authorization": {"Bearer " + patToken(glAgentID, early)}})
	requireStatus(t, resp, body, http.StatusUnauthorized)

	e.setConfig(t, userAccessConfig("{user: {}}"))
	// maria is a Maintainer of the configuration project (100) and a
	// Developer in the group platform (23): Rails lists her roles in both.
	wantUser := func(accessType string) userInfo {
		return userInfo{
			Username: "gitlab:user:maria",
			Groups: []string{"gitlab:user",
				"gitlab:project_role:100:guest", "gitlab:project_role:100:reporter", "gitlab:project_role:100:developer", "gitlab:project_role:100:maintainer",
				"gitlab:group_role:23:guest", "gitlab:group_role:23:reporter", "gitlab:group_role:23:developer",
				"system:authenticated"},
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
		e.gitlab.AddPersonalAccessToken(glMaria.Username, pat, "k8s_proxy")
		k := e.caddy.kubectlWithToken(t, "maria-pat", patToken(glAgentID, pat))
		if got, want := k.whoami(t), wantUser("personal_access_token"); !reflect.DeepEqual(got, want) {
			t.Errorf("kubectl auth whoami:\n got %+v\nwant %+v", got, want)
		}
		k.mustFail(t, "nested impersonation is not supported", "auth", "whoami", "--as", aliceUser)
	})

	t.Run("refused personal access tokens are all 401", func(t *testing.T) {
		noScope := kubetest.NewToken("maria's token without k8s_proxy")
		e.gitlab.AddPersonalAccessToken(glMaria.Username, noScope, "api")
		reporter := kubetest.NewToken("rita's token")
		e.gitlab.AddPersonalAccessToken(glRita.Username, reporter, "k8s_proxy")
		for name, token := range map[string]string{
			"no k8s_proxy scope (403)": patToken(glAgentID, noScope),
			"a Reporter (403)":         patToken(glAgentID, reporter),
			"unknown agent (404)":      patToken(glAgentID+100, reporter),
			"unknown token (401)":      patToken(glAgentID, "glpat-nobody-has-this"),
		} {
			resp, body := e.caddy.proxyGet(t, "api", http.Header{"Authorization": {"Bearer " + token}})
			if resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("%s: %s %s, want 401", name, resp.Status, body)
			}
		}
	})

	// The GitLab UI's session cookie, as its pages send it: Rack escapes
	// the value, and the CSRF token and agent id come as headers, or, for
	// browser WebSockets, as query parameters.
	cookie := "2f9a1c%3D" + kubetest.NewToken("maria's session cookie") + "/value+with chars"
	csrf := kubetest.NewToken("csrf token")
	e.gitlab.AddSession(glMaria.Username, mustUnescape(t, cookie), csrf)
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

	t.Run("an expired session is 401", func(t *testing.T) {
		stale := kubetest.NewToken("maria's session that expires")
		staleCSRF := kubetest.NewToken("csrf token of the expiring session")
		e.gitlab.AddSession(glMaria.Username, stale, staleCSRF)
		e.gitlab.ExpireSession(stale)
		h := http.Header{"Cookie": {"_gitlab_kas=" + url.QueryEscape(stale)}, "Origin": {glExternalURL},
			"Gitlab-Agent-Id": {fmt.Sprint(glAgentID)}, "X-Csrf-Token": {staleCSRF}}
		resp, body := review(t, "", h)
		requireStatus(t, resp, body, http.StatusUnauthorized)
	})

	t.Run("access_as agent", func(t *testing.T) {
		e.setConfig(t, userAccessConfig("{agent: {}}"))
		pat := kubetest.NewToken("maria's token under access_as agent")
		e.gitlab.AddPersonalAccessToken(glMaria.Username, pat, "k8s_proxy")
		k := e.caddy.kubectlWithToken(t, "maria-pat-agent", patToken(glAgentID, pat))
		if got := k.whoami(t); got.Username != adminUser {
			t.Errorf("whoami %q, want the agent's own %q", got.Username, adminUser)
		}
	})

	t.Run("removing user_access refuses at once", func(t *testing.T) {
		e.setConfig(t, "ci_access: {}\n")
		// New credentials: answers for used ones are cached, as in
		// GitLab's KAS.
		pat := kubetest.NewToken("maria's token after user_access was removed")
		e.gitlab.AddPersonalAccessToken(glMaria.Username, pat, "k8s_proxy")
		resp, body := e.caddy.proxyGet(t, "api/v1", http.Header{"Authorization": {"Bearer " + patToken(glAgentID, pat)}})
		requireStatus(t, resp, body, http.StatusUnauthorized)
		fresh := kubetest.NewToken("maria's new session")
		freshCSRF := kubetest.NewToken("csrf token of the new session")
		e.gitlab.AddSession(glMaria.Username, fresh, freshCSRF)
		resp, body = review(t, "", http.Header{"Cookie": {"_gitlab_kas=" + url.QueryEscape(fresh)}, "Origin": {glExternalURL},
			"Gitlab-Agent-Id": {fmt.Sprint(glAgentID)}, "X-Csrf-Token": {freshCSRF}})
		requireStatus(t, resp, body, http.StatusUnauthorized)
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
		resp, body := e.caddy.proxyGet(t, "api/v1", http.Header{"Authorization": {"Bearer pat:11:whatever"}})
		requireStatus(t, resp, body, http.StatusUnauthorized)
		if n := countLogEntries(e.caddy.proc.Stderr(), map[string]string{"msg": "closing tunnel: agent token revoked"}); n == 0 {
			t.Error("no log line for the revoked tunnel")
		}
	})

	t.Run("GitLab over HTTPS with its own CA", func(t *testing.T) {
		e := startGitLabEnv(t, s, gitlabEnvOptions{tls: true, config: glUserAccessAgent})
		if n := e.gitlab.Calls(fakegitlab.PathAgentInfo); n != 1 {
			t.Errorf("%d agent_info calls over HTTPS, want 1", n)
		}
		pat := kubetest.NewToken("token checked over https")
		e.gitlab.AddPersonalAccessToken(glMaria.Username, pat, "k8s_proxy")
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
