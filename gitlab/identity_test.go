package gitlab

import (
	"encoding/json"
	"errors"
	"reflect"
	"testing"

	"github.com/caddy-kas/caddy-kas/identity"
)

// allowedAgentsFrom decodes an allowed_agents answer as the client does.
func allowedAgentsFrom(t *testing.T, body string) *AllowedAgents {
	t.Helper()
	var aa AllowedAgents
	if err := json.Unmarshal([]byte(body), &aa); err != nil {
		t.Fatal(err)
	}
	return &aa
}

func TestCIAccessIdentity(t *testing.T) {
	const job = `"job": {"id": 3}, "pipeline": {"id": 6},
	  "project": {"id": 150, "groups": [{"id": 23}, {"id": 25}]},
	  "user": {"id": 1, "username": "root", "roles_in_project": ["developer"]}`
	const env = `, "environment": {"tier": "production", "slug": "prod"}`
	agent := func(accessAs string) string {
		cfg := `{"default_namespace": "ns"}`
		if accessAs != "" {
			cfg = `{"default_namespace": "ns", "access_as": ` + accessAs + `}`
		}
		return `"allowed_agents": [{"id": 5, "config_project": {"id": 33}, "configuration": ` + cfg + `}]`
	}
	tests := []struct {
		name      string
		body      string
		want      *identity.Identity
		wantAllow bool
		wantErr   bool
	}{
		{name: "access_as absent", body: `{` + agent("") + `, ` + job + `}`, wantAllow: true},
		{name: "access_as agent", body: `{` + agent(`{"agent": {}}`) + `, ` + job + `}`, wantAllow: true},
		{name: "access_as empty", body: `{` + agent(`{}`) + `, ` + job + `}`, wantAllow: true},
		{
			name: "impersonate",
			body: `{` + agent(`{"impersonate": {"username": "deployer", "uid": "u-1", "groups": ["ops", "system:masters"],
			        "extra": [{"key": "team", "val": ["a", "b"]}, {"key": "scopes.example.com/x", "val": ["y"]}]}}`) + `, ` + job + env + `}`,
			want: &identity.Identity{Username: "deployer", UID: "u-1", Groups: []string{"ops", "system:masters"},
				Extra: map[string][]string{"team": {"a", "b"}, "scopes.example.com/x": {"y"}}},
		},
		{
			name: "impersonate username only",
			body: `{` + agent(`{"impersonate": {"username": "deployer"}}`) + `, ` + job + `}`,
			want: &identity.Identity{Username: "deployer"},
		},
		{
			name: "ci_job without environment",
			body: `{` + agent(`{"ci_job": {}}`) + `, ` + job + `}`,
			want: &identity.Identity{
				Username: "gitlab:ci_job:3",
				Groups:   []string{"gitlab:ci_job", "gitlab:group:23", "gitlab:group:25", "gitlab:project:150"},
				Extra: map[string][]string{
					"agent.gitlab.com/id":                {"5"},
					"agent.gitlab.com/config_project_id": {"33"},
					"agent.gitlab.com/project_id":        {"150"},
					"agent.gitlab.com/ci_pipeline_id":    {"6"},
					"agent.gitlab.com/ci_job_id":         {"3"},
					"agent.gitlab.com/username":          {"root"},
				},
			},
		},
		{
			name: "ci_job with environment",
			body: `{` + agent(`{"ci_job": {}}`) + `, ` + job + env + `}`,
			want: &identity.Identity{
				Username: "gitlab:ci_job:3",
				Groups: []string{
					"gitlab:ci_job",
					"gitlab:group:23", "gitlab:group_env_tier:23:production",
					"gitlab:group:25", "gitlab:group_env_tier:25:production",
					"gitlab:project:150",
					"gitlab:project_env:150:prod",
					"gitlab:project_env_tier:150:production",
				},
				Extra: map[string][]string{
					"agent.gitlab.com/id":                {"5"},
					"agent.gitlab.com/config_project_id": {"33"},
					"agent.gitlab.com/project_id":        {"150"},
					"agent.gitlab.com/ci_pipeline_id":    {"6"},
					"agent.gitlab.com/ci_job_id":         {"3"},
					"agent.gitlab.com/username":          {"root"},
					"agent.gitlab.com/environment_slug":  {"prod"},
					"agent.gitlab.com/environment_tier":  {"production"},
				},
			},
		},
		{
			name: "ci_job, project in no group",
			body: `{` + agent(`{"ci_job": {}}`) + `, "job": {"id": 9}, "pipeline": {"id": 8}, "project": {"id": 7, "groups": []},
			        "user": {"id": 2, "username": "alice"}}`,
			want: &identity.Identity{
				Username: "gitlab:ci_job:9",
				Groups:   []string{"gitlab:ci_job", "gitlab:project:7"},
				Extra: map[string][]string{
					"agent.gitlab.com/id": {"5"}, "agent.gitlab.com/config_project_id": {"33"},
					"agent.gitlab.com/project_id": {"7"}, "agent.gitlab.com/ci_pipeline_id": {"8"},
					"agent.gitlab.com/ci_job_id": {"9"}, "agent.gitlab.com/username": {"alice"},
				},
			},
		},
		{name: "unknown mode refused", body: `{` + agent(`{"ci_user": {}}`) + `, ` + job + `}`, wantErr: true},
		{name: "unknown key next to agent refused", body: `{` + agent(`{"agent": {}, "something_new": {}}`) + `, ` + job + `}`, wantErr: true},
		{name: "two modes refused", body: `{` + agent(`{"agent": {}, "ci_job": {}}`) + `, ` + job + `}`, wantErr: true},
		{name: "impersonate without username refused", body: `{` + agent(`{"impersonate": {"groups": ["g"]}}`) + `, ` + job + `}`, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			aa := allowedAgentsFrom(t, tt.body)
			id, allow, err := CIAccessIdentity(aa, &aa.AllowedAgents[0])
			if tt.wantErr {
				if !errors.Is(err, ErrUnsupportedAccessAs) {
					t.Errorf("error %v, want ErrUnsupportedAccessAs", err)
				}
				if id != nil || allow {
					t.Errorf("refused access still gives identity %+v, allow %v", id, allow)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(id, tt.want) {
				t.Errorf("identity\n%+v\nwant\n%+v", id, tt.want)
			}
			if allow != tt.wantAllow {
				t.Errorf("allowClientImpersonation = %v, want %v", allow, tt.wantAllow)
			}
		})
	}
}

func TestUserAccessIdentity(t *testing.T) {
	const head = `"agent": {"id": 9999, "config_project": {"id": 1234}}, "user": {"id": 77, "username": "the-user"}`
	userAs := `"access_as": {"user": {"projects": [{"id": 1, "roles": ["reporter", "developer"]}, {"id": 3, "roles": ["maintainer"]}],
	                                "groups": [{"id": 2, "roles": ["developer"]}, {"id": 4, "roles": ["owner", "guest"]}]}}`
	wantUser := func(accessType string) *identity.Identity {
		return &identity.Identity{
			Username: "gitlab:user:the-user",
			Groups: []string{
				"gitlab:user",
				"gitlab:project_role:1:reporter", "gitlab:project_role:1:developer",
				"gitlab:project_role:3:maintainer",
				"gitlab:group_role:2:developer",
				"gitlab:group_role:4:owner", "gitlab:group_role:4:guest",
			},
			Extra: map[string][]string{
				"agent.gitlab.com/id":                {"9999"},
				"agent.gitlab.com/username":          {"the-user"},
				"agent.gitlab.com/access_type":       {accessType},
				"agent.gitlab.com/config_project_id": {"1234"},
			},
		}
	}
	tests := []struct {
		name       string
		body       string
		accessType string
		want       *identity.Identity
		wantAllow  bool
		wantErr    bool
	}{
		{name: "access_as absent (18.3 default)", body: `{` + head + `}`, accessType: AccessTypePersonalAccessToken, wantAllow: true},
		{name: "access_as agent", body: `{` + head + `, "access_as": {"agent": {}}}`, accessType: AccessTypeSessionCookie, wantAllow: true},
		{name: "user via pat", body: `{` + head + `, ` + userAs + `}`, accessType: AccessTypePersonalAccessToken,
			want: wantUser("personal_access_token")},
		{name: "user via cookie", body: `{` + head + `, ` + userAs + `}`, accessType: AccessTypeSessionCookie,
			want: wantUser("session_cookie")},
		{name: "user without shared projects", body: `{` + head + `, "access_as": {"user": {"projects": [], "groups": []}}}`,
			accessType: AccessTypeSessionCookie,
			want: &identity.Identity{Username: "gitlab:user:the-user", Groups: []string{"gitlab:user"}, Extra: map[string][]string{
				"agent.gitlab.com/id": {"9999"}, "agent.gitlab.com/username": {"the-user"},
				"agent.gitlab.com/access_type": {"session_cookie"}, "agent.gitlab.com/config_project_id": {"1234"},
			}}},
		{name: "unknown mode refused", body: `{` + head + `, "access_as": {"oidc": {}}}`, accessType: AccessTypeSessionCookie, wantErr: true},
		{name: "agent and user refused", body: `{` + head + `, "access_as": {"agent": {}, "user": {}}}`, accessType: AccessTypeSessionCookie, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var resp AuthorizeProxyUserResponse
			if err := json.Unmarshal([]byte(tt.body), &resp); err != nil {
				t.Fatal(err)
			}
			id, allow, err := UserAccessIdentity(&resp, tt.accessType)
			if tt.wantErr {
				if !errors.Is(err, ErrUnsupportedAccessAs) || id != nil || allow {
					t.Errorf("got %+v, %v, %v; want ErrUnsupportedAccessAs", id, allow, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(id, tt.want) {
				t.Errorf("identity\n%+v\nwant\n%+v", id, tt.want)
			}
			if allow != tt.wantAllow {
				t.Errorf("allowClientImpersonation = %v, want %v", allow, tt.wantAllow)
			}
		})
	}
}
