package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/integration/fakegitlab"
	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// These tests put GitLab's own agentk (v16.5, unchanged) behind Caddy in
// place of ours: the real kubectl, Caddy, GitLab's agentk over ws-tunnel,
// and the real kube-apiserver. They are independent of each other and run
// side by side.

// TestGitLabAgentkKubectl drives the real kubectl through Caddy and
// GitLab's agentk: reads, writes with bodies, server-side apply, a watch,
// and every identity rule.
func TestGitLabAgentkKubectl(t *testing.T) {
	t.Parallel()
	s := requireGitLabAgentk(t)
	config := standardConfig()
	kas := startCaddy(t, s, config)
	kas.startGitLabAgentk(t, gitlabAgentkOptions{agentID: 1}).
		waitConnected(t, "Bearer "+patToken(1, config.user(t, "ops").token))
	ops := kas.kubectl(t, "ops", 1)

	namespaces := ops.mustRun(t, "get", "namespaces", "-o", "name")
	for _, want := range []string{"namespace/default", "namespace/kube-system"} {
		if !hasLine(namespaces, want) {
			t.Errorf("kubectl get namespaces does not list %s:\n%s", want, namespaces)
		}
	}
	ns := uniqueName("kas-glk")
	ops.mustRun(t, "create", "namespace", ns)

	t.Run("create and server-side apply a ConfigMap", func(t *testing.T) {
		ops.mustRun(t, "create", "configmap", "created", "-n", ns, "--from-literal", "key=created")
		if got := ops.mustRun(t, "get", "configmap", "created", "-n", ns, "-o", "jsonpath={.data.key}"); got != "created" {
			t.Errorf("the created ConfigMap holds %q, want %q", got, "created")
		}
		manifest := func(value string) string {
			return fmt.Sprintf("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  namespace: %s\ndata:\n  key: %q\n", ns, value)
		}
		first := writeManifest(t, kas.dir, "glk-applied-first.yaml", manifest("first"))
		second := writeManifest(t, kas.dir, "glk-applied-second.yaml", manifest("second"))
		ops.mustRun(t, "apply", "--server-side", "--field-manager", "first-manager", "-f", first)
		ops.mustFail(t, "conflict", "apply", "--server-side", "--field-manager", "second-manager", "-f", second)
		ops.mustRun(t, "apply", "--server-side", "--field-manager", "second-manager", "--force-conflicts", "-f", second)
		if got := ops.mustRun(t, "get", "configmap", "applied", "-n", ns, "-o", "jsonpath={.data.key}"); got != "second" {
			t.Errorf("after the forced apply the ConfigMap holds %q, want %q", got, "second")
		}
	})

	t.Run("watch receives a new ConfigMap", func(t *testing.T) {
		watch := ops.startWatch(t, kas.dir, ns, "glk-watch-marker")
		ops.mustRun(t, "create", "configmap", "watched", "-n", ns)
		waitForLine(t, watch, "configmap/watched")
	})

	t.Run("user with impersonate acts as the configured identity", func(t *testing.T) {
		dev := kas.kubectl(t, "dev", 1)
		who := dev.whoami(t)
		if who.Username != aliceUser || !slices.Contains(who.Groups, "dev") || !slices.Contains(who.Groups, viewersGroup) {
			t.Errorf("user dev reached the apiserver as %q in groups %v, want %q in groups containing dev and %s",
				who.Username, who.Groups, aliceUser, viewersGroup)
		}
		// the apiserver enforces the impersonated identity
		dev.mustRun(t, "get", "configmaps", "-n", ns)
		dev.mustFail(t, "forbidden", "create", "configmap", "by-dev", "-n", ns)
	})

	t.Run("user with allow_impersonation may use --as", func(t *testing.T) {
		if who := ops.whoami(t, "--as", "bob", "--as-group", "team"); who.Username != "bob" || !slices.Contains(who.Groups, "team") {
			t.Errorf("kubectl --as bob --as-group team auth whoami shows %q in %v, want bob in groups containing team", who.Username, who.Groups)
		}
	})

	t.Run("user without impersonate acts as the agent", func(t *testing.T) {
		for _, user := range []string{"ops", "plain"} {
			if who := kas.kubectl(t, user, 1).whoami(t); who.Username != adminUser || !slices.Contains(who.Groups, "system:masters") {
				t.Errorf("user %s reached the apiserver as %q in %v, want GitLab's agentk's own identity %q", user, who.Username, who.Groups, adminUser)
			}
		}
	})

	t.Run("nested impersonation is refused with 400", func(t *testing.T) {
		kas.kubectl(t, "dev", 1).mustFail(t, "nested impersonation is not supported", "--as", "someone", "auth", "whoami")
		header := http.Header{
			"Authorization":    {"Bearer " + patToken(1, config.user(t, "dev").token)},
			"Impersonate-User": {"someone"},
		}
		resp, body := kas.proxyGet(t, "api/v1", header)
		if st := requireStatus(t, resp, body, http.StatusBadRequest); !strings.Contains(st.Message, "nested impersonation is not supported") {
			t.Errorf("nested impersonation: message %q", st.Message)
		}
	})
}

// selfSubjectReview posts a SelfSubjectReview through Caddy with
// authorization and returns the username the apiserver saw.
func selfSubjectReview(client *http.Client, kas *caddyServer, authorization string) (string, error) {
	req, err := http.NewRequest(http.MethodPost, kas.proxyURL()+selfReviewPath, strings.NewReader(selfReviewObject))
	if err != nil {
		return "", err
	}
	req.Header.Set("Authorization", authorization)
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("read the response: %w", err)
	}
	if resp.StatusCode != http.StatusCreated {
		return "", fmt.Errorf("%s: %s", resp.Status, kubetest.Redact(string(body)))
	}
	var review struct {
		Status struct {
			UserInfo userInfo `json:"userInfo"`
		} `json:"status"`
	}
	if err := json.Unmarshal(body, &review); err != nil {
		return "", fmt.Errorf("decode SelfSubjectReview: %w", err)
	}
	return review.Status.UserInfo.Username, nil
}

// TestGitLabAgentkReplicaWithOurs: GitLab's agentk and ours run as two
// replicas of one agent, with the same agent token. Killing either leaves
// the other serving every request. Each replica reaches the cluster as its
// own user, so that the apiserver tells which one carried a request.
func TestGitLabAgentkReplicaWithOurs(t *testing.T) {
	t.Parallel()
	s := requireGitLabAgentk(t)
	config := standardConfig()
	kas := startCaddy(t, s, config)
	auth := "Bearer " + patToken(1, config.user(t, "ops").token)
	theirs := kas.startGitLabAgentk(t, gitlabAgentkOptions{agentID: 1, kubeContext: agentTwoUser})
	theirs.waitConnected(t, auth)
	ours := kas.startAgentk(t, agentkOptions{agentID: 1})
	ours.waitReady(t)
	client := kas.httpClient(t)

	// killAndCheck kills p, waits until Caddy has dropped its tunnel, and
	// sends 20 requests, which must all reach the cluster as wantUser.
	killAndCheck := func(t *testing.T, p *kubetest.Process, wantUser string) {
		t.Helper()
		disconnected := countAgentLogEntries(kas.proc.Stderr(), "agent disconnected", 1, "")
		p.Kill()
		err := kubetest.Eventually(agentLossTimeout, func() error {
			if countAgentLogEntries(kas.proc.Stderr(), "agent disconnected", 1, "") <= disconnected {
				return fmt.Errorf("caddy logged no \"agent disconnected\" for agent 1 after %s was killed", p.Name)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		for i := range 20 {
			user, err := selfSubjectReview(client, kas, auth)
			if err != nil {
				t.Fatalf("request %d after killing %s: %v", i, p.Name, err)
			}
			if user != wantUser {
				t.Fatalf("request %d after killing %s reached the cluster as %q, want %q (the other replica)", i, p.Name, user, wantUser)
			}
		}
	}

	t.Run("GitLab's agentk killed, ours serves", func(t *testing.T) {
		killAndCheck(t, theirs.proc, adminUser)
	})
	t.Run("ours killed, GitLab's agentk serves", func(t *testing.T) {
		theirs = theirs.restart(t)
		theirs.waitConnected(t, auth)
		killAndCheck(t, ours.proc, agentTwoUser)
	})
}

// TestGitLabAgentkReloadClosesTunnel: a reload that rotates the agent's
// token closes GitLab's agentk's tunnel at once; requests for the agent
// then fail with the usual Status, and agentk's retries with the old token
// are refused.
func TestGitLabAgentkReloadClosesTunnel(t *testing.T) {
	t.Parallel()
	s := requireGitLabAgentk(t)
	config := standardConfig()
	kas := startCaddy(t, s, config)
	auth := "Bearer " + patToken(1, config.user(t, "plain").token)
	kas.startGitLabAgentk(t, gitlabAgentkOptions{agentID: 1}).waitConnected(t, auth)
	kas.kubectl(t, "plain", 1).mustRun(t, "get", "namespaces")

	rotated := config
	rotated.agents = append([]kasAgent(nil), config.agents...)
	rotated.agents[0].token = kubetest.NewToken("the rotated token of agent 1")
	kas.reload(t, rotated, "--force")

	err := kubetest.Eventually(agentLossTimeout, func() error {
		log := kas.proc.Stderr()
		if countAgentLogEntries(log, "closing tunnel: its agent token is no longer configured", 1, "") == 0 {
			return fmt.Errorf("caddy logged no closing of agent 1's tunnel")
		}
		if countAgentLogEntries(log, "agent disconnected", 1, "") == 0 {
			return fmt.Errorf("caddy logged no \"agent disconnected\" for agent 1")
		}
		if countLogEntries(log, map[string]string{"msg": "agent refused", "reason": "unknown agent token", "protocol": wsTunnelProtocol}) == 0 {
			return fmt.Errorf("caddy has not refused GitLab's agentk's old token yet")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	resp, body := kas.proxyGet(t, "api/v1", http.Header{"Authorization": {auth}})
	if st := requireStatus(t, resp, body, http.StatusBadGateway); !strings.Contains(st.Message, "agent 1 is not connected") {
		t.Errorf("a request for the disconnected agent: message %q", st.Message)
	}
}

// TestGitLabAgentkGitLabMode: in GitLab mode GitLab's agentk authenticates
// with its agent token through GitLab's agent_info, its connection makes
// the agent server read the agent's configuration and hand it to GitLab,
// and a CI job of a project that configuration authorizes reaches the
// cluster through it as the job.
func TestGitLabAgentkGitLabMode(t *testing.T) {
	t.Parallel()
	s := requireGitLabAgentk(t)
	// observability.logging.level reaches GitLab's agentk only through
	// its GetConfiguration stream: its debug lines prove the stream
	// delivers the configuration.
	config := "ci_access:\n  projects:\n  - id: " + glAppProjectPath + "\n    default_namespace: default\n    access_as: {ci_job: {}}\n" +
		"observability:\n  logging:\n    level: debug\n"
	e := startGitLabEnv(t, s, gitlabEnvOptions{noAgentk: true, config: config})

	// A job of the agent's own project may use it before any
	// configuration is known: the probe that the tunnel is up.
	probe := fakegitlab.Job{JobID: 4100, PipelineID: 510, ProjectID: glProjectID, Username: glDeployBot.Username,
		Token: kubetest.NewToken("probe job token for GitLab's agentk")}
	e.gitlab.AddJob(probe)
	job := fakegitlab.Job{
		JobID: 4101, PipelineID: 511, ProjectID: glAppProjectID, Username: glDeployBot.Username,
		Token:       kubetest.NewToken("ci job token for GitLab's agentk"),
		Environment: &fakegitlab.Environment{Name: "production", Tier: "production", Slug: "prod"},
	}
	e.gitlab.AddJob(job)

	if n := e.gitlab.Calls(fakegitlab.PathAgentInfo); n != 0 {
		t.Fatalf("%d agent_info calls before any agent connected", n)
	}
	agentk := e.caddy.startGitLabAgentk(t, gitlabAgentkOptions{agentID: glAgentID, token: e.agentToken})
	agentk.waitConnected(t, fmt.Sprintf("Bearer ci:%d:%s", glAgentID, probe.Token))
	if n := e.gitlab.Calls(fakegitlab.PathAgentInfo); n == 0 {
		t.Errorf("GitLab's agentk was admitted without an agent_info call")
	}
	e.waitPosted(t, 0, config)
	probeHeader := http.Header{"Authorization": {fmt.Sprintf("Bearer ci:%d:%s", glAgentID, probe.Token)}}
	err := kubetest.Eventually(30*time.Second, func() error {
		// At debug level agentk logs every request it handles; at its
		// default level, none.
		e.caddy.proxyGet(t, "version", probeHeader)
		if !strings.Contains(agentk.proc.Stderr(), `"level":"debug"`) {
			return fmt.Errorf("GitLab's agentk logs no debug line: it did not get its configuration")
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}

	want := userInfo{
		Username: "gitlab:ci_job:4101",
		Groups: []string{"gitlab:ci_job",
			"gitlab:group:23", "gitlab:group_env_tier:23:production",
			"gitlab:group:25", "gitlab:group_env_tier:25:production",
			"gitlab:project:200", "gitlab:project_env:200:prod", "gitlab:project_env_tier:200:production",
			"system:authenticated"},
		Extra: map[string][]string{
			"agent.gitlab.com/id":                {"11"},
			"agent.gitlab.com/config_project_id": {"100"},
			"agent.gitlab.com/project_id":        {"200"},
			"agent.gitlab.com/ci_pipeline_id":    {"511"},
			"agent.gitlab.com/ci_job_id":         {"4101"},
			"agent.gitlab.com/username":          {"deploy-bot"},
			"agent.gitlab.com/environment_slug":  {"prod"},
			"agent.gitlab.com/environment_tier":  {"production"},
		},
	}
	if got := e.ciKubeconfig(t, job.Token).whoami(t); !reflect.DeepEqual(got, want) {
		t.Errorf("kubectl auth whoami:\n got %+v\nwant %+v", got, want)
	}
}
