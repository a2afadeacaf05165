package integration

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
	"github.com/caddy-kas/caddy-kas/internal/testca"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/agenttracker"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/agenttrackerrpc"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/configprojectrpc"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/entity"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/event"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/notificationsrpc"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/serverinforpc"
)

// railsClient plays GitLab Rails calling the agent server's gRPC API
// (Gitlab::Kas::Client): a JWT signed with the shared secret, issuer the
// GitLab host, audience gitlab-kas, sent as "authorization: bearer", and a
// 5 s deadline per call.
type railsClient struct {
	conn   *grpc.ClientConn
	secret []byte
}

func newRailsClient(t *testing.T, address string, secret []byte) *railsClient {
	t.Helper()
	conn, err := grpc.NewClient(address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &railsClient{conn: conn, secret: secret}
}

// ctx returns a call context with Rails' deadline and a JWT signed with
// secret (nil: the right one).
func (c *railsClient) ctx(t *testing.T, secret []byte, audience string) context.Context {
	t.Helper()
	if secret == nil {
		secret = c.secret
	}
	now := time.Now()
	token, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.RegisteredClaims{
		Issuer:    "gitlab.example.com",
		Audience:  jwt.ClaimStrings{audience},
		IssuedAt:  jwt.NewNumericDate(now),
		NotBefore: jwt.NewNumericDate(now),
		ExpiresAt: jwt.NewNumericDate(now.Add(time.Minute)),
	}).SignedString(secret)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return metadata.AppendToOutgoingContext(ctx, "authorization", "bearer "+token)
}

func TestGitLabRailsAPI(t *testing.T) {
	s := requireSuite(t)
	apiAddress := fmt.Sprintf("127.0.0.1:%d", mustFreeLoopbackPorts(t, 1)[0])
	e := startGitLabEnv(t, s, gitlabEnvOptions{apiListen: apiAddress, extra: []string{"usage_reporting_period 1s"},
		config: "user_access:\n  access_as: {agent: {}}\n  projects: [{id: " + glProjectPath + "}]\n"})
	rails := e.rails
	tracker := agenttrackerrpc.NewAgentTrackerClient(rails.conn)

	t.Run("a bad JWT is Unauthenticated", func(t *testing.T) {
		for name, ctx := range map[string]context.Context{
			"wrong secret":   rails.ctx(t, []byte("0123456789abcdef0123456789abcdef"), "gitlab-kas"),
			"wrong audience": rails.ctx(t, nil, "gitlab"),
			"no JWT": func() context.Context {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				t.Cleanup(cancel)
				return ctx
			}(),
		} {
			_, err := tracker.GetConnectedAgentksByAgentIDs(ctx, &agenttrackerrpc.GetConnectedAgentksByAgentIDsRequest{AgentIds: []int64{glAgentID}})
			if status.Code(err) != codes.Unauthenticated {
				t.Errorf("%s: %v, want Unauthenticated", name, err)
			}
		}
	})

	t.Run("connected agents under every method name", func(t *testing.T) {
		ids := []int64{glAgentID}
		calls := map[string]func() ([]*agenttracker.ConnectedAgentInfo, error){
			"GetConnectedAgentksByAgentIDs": func() ([]*agenttracker.ConnectedAgentInfo, error) {
				r, err := tracker.GetConnectedAgentksByAgentIDs(rails.ctx(t, nil, "gitlab-kas"), &agenttrackerrpc.GetConnectedAgentksByAgentIDsRequest{AgentIds: ids})
				return r.GetAgents(), err
			},
			"GetConnectedAgentsByAgentIDs": func() ([]*agenttracker.ConnectedAgentInfo, error) {
				r, err := tracker.GetConnectedAgentsByAgentIDs(rails.ctx(t, nil, "gitlab-kas"), &agenttrackerrpc.GetConnectedAgentsByAgentIDsRequest{AgentIds: ids})
				return r.GetAgents(), err
			},
			"GetConnectedAgentsByAgentIds": func() ([]*agenttracker.ConnectedAgentInfo, error) {
				r, err := tracker.GetConnectedAgentsByAgentIds(rails.ctx(t, nil, "gitlab-kas"), &agenttrackerrpc.GetConnectedAgentsByAgentIdsRequest{AgentIds: ids})
				return r.GetAgents(), err
			},
			"GetConnectedAgentsByProjectIDs": func() ([]*agenttracker.ConnectedAgentInfo, error) {
				r, err := tracker.GetConnectedAgentsByProjectIDs(rails.ctx(t, nil, "gitlab-kas"), &agenttrackerrpc.GetConnectedAgentsByProjectIDsRequest{ProjectIds: []int64{glProjectID}})
				return r.GetAgents(), err
			},
			"GetConnectedAgents (16.5)": func() ([]*agenttracker.ConnectedAgentInfo, error) {
				r, err := tracker.GetConnectedAgents(rails.ctx(t, nil, "gitlab-kas"), &agenttrackerrpc.GetConnectedAgentsRequest{
					Request: &agenttrackerrpc.GetConnectedAgentsRequest_AgentId{AgentId: glAgentID}})
				return r.GetAgents(), err
			},
		}
		for name, call := range calls {
			agents, err := call()
			if err != nil {
				t.Errorf("%s: %v", name, err)
				continue
			}
			if len(agents) != 1 {
				t.Errorf("%s: %d connections, want the one agentk pod", name, len(agents))
				continue
			}
			a := agents[0]
			meta := a.GetAgentMeta()
			if a.GetAgentId() != glAgentID || a.GetProjectId() != glProjectID ||
				meta.GetPodName() != fmt.Sprintf("agentk-%d", glAgentID) || meta.GetPodNamespace() != "kas-it" ||
				meta.GetVersion() == "" || a.GetConnectionId() == 0 || a.GetConnectedAt().GetSeconds() == 0 {
				t.Errorf("%s: %v", name, a)
			}
			if kv := meta.GetKubernetesVersion(); kv.GetGitVersion() == "" || kv.GetMajor() != "1" || kv.GetPlatform() == "" {
				t.Errorf("%s: Kubernetes version incomplete in %v", name, meta)
			}
		}
		r, err := tracker.GetConnectedAgentksByAgentIDs(rails.ctx(t, nil, "gitlab-kas"), &agenttrackerrpc.GetConnectedAgentksByAgentIDsRequest{AgentIds: []int64{glAgentID + 1}})
		if err != nil || len(r.GetAgents()) != 0 {
			t.Errorf("an agent without connections: %v, %v", r, err)
		}
	})

	t.Run("GitPushEvent answers", func(t *testing.T) {
		notifications := notificationsrpc.NewNotificationsClient(rails.conn)
		_, err := notifications.GitPushEvent(rails.ctx(t, nil, "gitlab-kas"), &notificationsrpc.GitPushEventRequest{
			Event: &event.GitPushEvent{Project: &event.Project{Id: glProjectID, FullPath: glProjectPath}}})
		if err != nil {
			t.Fatal(err)
		}
	})

	t.Run("ListAgentConfigFiles lists the agents whose files exist", func(t *testing.T) {
		list := func() []string {
			t.Helper()
			r, err := configprojectrpc.NewConfigurationProjectClient(rails.conn).ListAgentConfigFiles(rails.ctx(t, nil, "gitlab-kas"),
				&configprojectrpc.ListAgentConfigFilesRequest{
					Repository: &entity.GitalyRepository{StorageName: e.repo.StorageName, RelativePath: e.repo.RelativePath,
						GlRepository: e.repo.GlRepository, GlProjectPath: e.repo.GlProjectPath},
					GitalyInfo: &entity.GitalyInfo{Address: e.gitaly.Address(), Token: e.gitaly.Token(),
						Features: map[string]string{"gitaly-feature-test-flag": "true"}},
				})
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, f := range r.GetConfigFiles() {
				if f.GetName() != ".gitlab/agents/"+f.GetAgentName()+"/config.yaml" {
					t.Errorf("file %q of agent %q", f.GetName(), f.GetAgentName())
				}
				names = append(names, f.GetAgentName())
			}
			return names
		}
		if got := list(); !slices.Equal(got, []string{glAgentName}) {
			t.Errorf("agents %v, want [%s]", got, glAgentName)
		}
		e.repo.WriteFile(".gitlab/agents/staging/config.yaml", "")
		e.repo.WriteFile(".gitlab/agents/NotALabel/config.yaml", "")
		e.repo.WriteFile(".gitlab/agents/dev/config.yml", "")
		e.repo.Commit("more agents, two of them misnamed")
		if got := list(); !slices.Equal(got, []string{glAgentName, "staging"}) {
			t.Errorf("agents %v, want [%s staging]", got, glAgentName)
		}
		e.repo.Remove(".gitlab/agents/staging")
		e.repo.Commit("staging is gone")
		if got := list(); !slices.Equal(got, []string{glAgentName}) {
			t.Errorf("agents %v, want [%s]", got, glAgentName)
		}
	})

	t.Run("GetServerInfo answers", func(t *testing.T) {
		info, err := serverinforpc.NewServerInfoClient(rails.conn).GetServerInfo(rails.ctx(t, nil, "gitlab-kas"), &serverinforpc.GetServerInfoRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if info.GetCurrentServerInfo().GetVersion() == "" {
			t.Errorf("no version: %v", info)
		}
	})

	t.Run("the API survives a reload", func(t *testing.T) {
		e.caddy.reload(t, e.caddy.config, "--force")
		info := serverinforpc.NewServerInfoClient(rails.conn)
		err := kubetest.Eventually(10*time.Second, func() error {
			_, err := info.GetServerInfo(rails.ctx(t, nil, "gitlab-kas"), &serverinforpc.GetServerInfoRequest{})
			return err
		})
		if err != nil {
			t.Fatalf("GetServerInfo after a reload: %v", err)
		}
		r, err := tracker.GetConnectedAgentksByAgentIDs(rails.ctx(t, nil, "gitlab-kas"), &agenttrackerrpc.GetConnectedAgentksByAgentIDsRequest{AgentIds: []int64{glAgentID}})
		if err != nil || len(r.GetAgents()) != 1 {
			t.Errorf("the agent after a reload: %v, %v", r, err)
		}
	})

	t.Run("usage metrics reach GitLab", func(t *testing.T) {
		pat := kubetest.NewToken("token for usage")
		e.gitlab.AddPersonalAccessToken(glMaria.Username, pat, "k8s_proxy")
		for range 2 {
			resp, body := e.caddy.proxyGet(t, "api", http.Header{"Authorization": {"Bearer " + patToken(glAgentID, pat)}})
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("%s %s", resp.Status, body)
			}
		}
		err := kubetest.Eventually(30*time.Second, func() error {
			counters := map[string]int64{}
			unique := map[string]map[int64]bool{}
			for _, r := range e.gitlab.UsageReports() {
				for k, v := range r.Counters {
					counters[k] += v
				}
				for k, ids := range r.UniqueCounters {
					if unique[k] == nil {
						unique[k] = map[int64]bool{}
					}
					for _, id := range ids {
						unique[k][id] = true
					}
				}
			}
			if counters["k8s_api_proxy_requests_via_pat_access"] != 2 || counters["k8s_api_proxy_request"] < 2 ||
				counters["flux_git_push_notifications_total"] != 1 {
				return fmt.Errorf("counters so far: %v", counters)
			}
			if !unique["k8s_api_proxy_requests_unique_users_via_pat_access"][42] ||
				!unique["k8s_api_proxy_requests_unique_agents_via_pat_access"][glAgentID] ||
				!unique["flux_git_push_notified_unique_projects"][glProjectID] {
				return fmt.Errorf("unique counters so far: %v", unique)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
}

// TestGitLabRailsAPIOverTLS: with api_tls, Rails reaches the API as
// grpcs:// and a plain-text client is turned away.
func TestGitLabRailsAPIOverTLS(t *testing.T) {
	s := requireSuite(t)
	ca, err := testca.New("rails api test CA")
	if err != nil {
		t.Fatal(err)
	}
	dir := testDir(t, s)
	certFile, keyFile := filepath.Join(dir, "api.crt"), filepath.Join(dir, "api.key")
	for path, data := range map[string][]byte{certFile: ca.CertPEM, keyFile: ca.KeyPEM} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	apiAddress := fmt.Sprintf("127.0.0.1:%d", mustFreeLoopbackPorts(t, 1)[0])
	e := startGitLabEnv(t, s, gitlabEnvOptions{apiListen: apiAddress, apiTLS: true, extra: []string{"api_tls " + certFile + " " + keyFile}})

	conn, err := grpc.NewClient(apiAddress, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: ca.Pool})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	rails := &railsClient{conn: conn, secret: e.secret}
	r, err := agenttrackerrpc.NewAgentTrackerClient(conn).GetConnectedAgentksByAgentIDs(rails.ctx(t, nil, "gitlab-kas"),
		&agenttrackerrpc.GetConnectedAgentksByAgentIDsRequest{AgentIds: []int64{glAgentID}})
	if err != nil || len(r.GetAgents()) != 1 {
		t.Fatalf("over TLS: %v, %v", r, err)
	}

	plain := newRailsClient(t, apiAddress, e.secret)
	if _, err := serverinforpc.NewServerInfoClient(plain.conn).GetServerInfo(plain.ctx(t, nil, "gitlab-kas"), &serverinforpc.GetServerInfoRequest{}); err == nil {
		t.Error("a plain-text client got an answer from the TLS API")
	}
}
