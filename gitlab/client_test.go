package gitlab

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

const agentInfoJSON = `{ "project_id": 1, "agent_id": 2, "agent_name": "my-agent",
  "gitaly_info": {"address": "tcp://gitaly:8075", "token": "gitaly-secret", "features": {"gitaly-feature-x": "true"}},
  "gitaly_repository": {"storage_name": "default", "relative_path": "@hashed/ab/cd.git",
     "git_object_directory": "", "git_alternate_object_directories": [],
     "gl_repository": "project-1", "gl_project_path": "group/project"},
  "default_branch": "main", "field_added_by_a_newer_rails": {"x": 1} }`

func TestAgentInfo(t *testing.T) {
	for _, prefix := range []string{"", "/gitlab"} {
		t.Run("prefix "+prefix, func(t *testing.T) {
			f := newFakeGitLab(t, prefix)
			f.handle(PathAgentInfo, func(w http.ResponseWriter, r *http.Request) {
				if got := r.Header.Get("Authorization"); got != "Bearer agent-token" {
					t.Errorf("Authorization %q", got)
				}
				jsonAnswer(http.StatusOK, agentInfoJSON)(w, r)
			})
			info, err := f.client().AgentInfo(context.Background(), "agent-token")
			if err != nil {
				t.Fatal(err)
			}
			want := &AgentInfo{
				ProjectID: 1, AgentID: 2, AgentName: "my-agent",
				GitalyInfo: GitalyInfo{Address: "tcp://gitaly:8075", Token: "gitaly-secret", Features: map[string]string{"gitaly-feature-x": "true"}},
				GitalyRepository: GitalyRepository{StorageName: "default", RelativePath: "@hashed/ab/cd.git",
					GitAlternateObjectDirectories: []string{}, GlRepository: "project-1", GlProjectPath: "group/project"},
				DefaultBranch: "main",
			}
			if !reflect.DeepEqual(info, want) {
				t.Errorf("AgentInfo = %+v\nwant %+v", info, want)
			}
			if s := info.GitalyInfo.String(); strings.Contains(s, "gitaly-secret") {
				t.Errorf("GitalyInfo.String() shows the token: %s", s)
			}
		})
	}
}

func TestClientErrors(t *testing.T) {
	tests := []struct {
		name        string
		status      int
		body        string
		wantMessage string
	}{
		{"401 rails jwt", 401, `{"message":"KAS JWT authentication invalid"}`, "KAS JWT authentication invalid"},
		{"401 token", 401, `{"message":"401 Unauthorized"}`, "401 Unauthorized"},
		{"403 no body", 403, ``, ""},
		{"404 html", 404, `<html>not found</html>`, ""},
		{"400 grape error field", 400, `{"error":"agent_id is missing"}`, "agent_id is missing"},
		{"400 validation object", 400, `{"message":{"counters": ["is invalid"]}}`, `{"counters":["is invalid"]}`},
		{"500", 500, `{"message":"500 Internal Server Error"}`, "500 Internal Server Error"},
		{"long message", 502, `{"message":"` + strings.Repeat("é", 400) + `"}`, strings.Repeat("é", 128) + "…"},
		{"redirect not followed", 302, ``, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeGitLab(t, "")
			f.handle(PathAgentInfo, func(w http.ResponseWriter, r *http.Request) {
				if tt.status == http.StatusFound {
					w.Header().Set("Location", "http://elsewhere.invalid/")
				}
				jsonAnswer(tt.status, tt.body)(w, r)
			})
			c := f.client()
			c.HTTPClient = nil // the default client: it must not follow the redirect
			_, err := c.AgentInfo(context.Background(), "the-agent-token")
			var gerr *Error
			if !errors.As(err, &gerr) {
				t.Fatalf("error %v (%T) is not an *Error", err, err)
			}
			want := &Error{Path: PathAgentInfo, StatusCode: tt.status, Message: tt.wantMessage}
			if *gerr != *want {
				t.Errorf("error %+v, want %+v", gerr, want)
			}
			if strings.Contains(err.Error(), "the-agent-token") {
				t.Errorf("error %q contains the token", err)
			}
		})
	}
}

func TestClientTransportErrors(t *testing.T) {
	f := newFakeGitLab(t, "")
	f.handle(PathAllowedAgents, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"allowed_agents": [`)) // cut short
	})
	_, err := f.client().AllowedAgents(context.Background(), "job-token-secret")
	if err == nil || strings.Contains(err.Error(), "job-token-secret") {
		t.Errorf("truncated JSON: error %v", err)
	}
	var gerr *Error
	if errors.As(err, &gerr) {
		t.Errorf("truncated JSON gave *Error %v", gerr)
	}

	big := strings.Repeat(" ", maxResponseBody) + "{}"
	f.handle(PathAllowedAgents, jsonAnswer(http.StatusOK, big))
	if _, err := f.client().AllowedAgents(context.Background(), "job-token-secret"); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("huge answer: error %v", err)
	}

	// Nobody listens: the *url.Error is wrapped, with no token in it.
	c := f.client()
	f.srv.Close()
	_, err = c.AgentInfo(context.Background(), "agent-token-secret")
	var uerr *url.Error
	if !errors.As(err, &uerr) {
		t.Errorf("closed server: error %v does not wrap *url.Error", err)
	}
	if err != nil && strings.Contains(err.Error(), "agent-token-secret") {
		t.Errorf("error %q contains the token", err)
	}

	for _, bad := range []string{"", "a\nb", "a\x00b"} {
		_, err := c.AllowedAgents(context.Background(), bad)
		if err == nil || (bad != "" && strings.Contains(err.Error(), bad)) {
			t.Errorf("token %q: error %v", bad, err)
		}
	}
	if _, err := (&Client{Secret: f.secret}).AgentInfo(context.Background(), "x"); err == nil {
		t.Error("client without base URL: no error")
	}
}

func TestAllowedAgents(t *testing.T) {
	f := newFakeGitLab(t, "")
	f.handle(PathAllowedAgents, func(w http.ResponseWriter, r *http.Request) {
		if got := r.Header.Get("Job-Token"); got != "job-token" {
			t.Errorf("Job-Token %q", got)
		}
		jsonAnswer(http.StatusOK, `{ "allowed_agents": [
		    { "id": 5, "config_project": {"id": 3, "path_with_namespace": "g/p"},
		      "configuration": {"default_namespace": "ns", "access_as": {"ci_job": {}}} },
		    { "id": 6, "config_project": {"id": 4},
		      "configuration": {"access_as": {"impersonate": {"username": "u", "uid": "1", "groups": ["a","b"], "extra": [{"key": "k", "val": ["v1","v2"]}]}}} },
		    { "id": 7, "config_project": {"id": 4}, "configuration": {} } ],
		  "job": {"id": 3}, "pipeline": {"id": 6},
		  "project": {"id": 150, "groups": [{"id": 23}, {"id": 25}]},
		  "user": {"id": 1, "username": "root", "roles_in_project": ["guest","reporter"]},
		  "environment": {"tier": "production", "slug": "prod"} }`)(w, r)
	})
	got, err := f.client().AllowedAgents(context.Background(), "job-token")
	if err != nil {
		t.Fatal(err)
	}
	want := &AllowedAgents{
		AllowedAgents: []AllowedAgent{
			{ID: 5, ConfigProject: ConfigProject{ID: 3}, Configuration: AgentConfiguration{DefaultNamespace: "ns", AccessAs: &AccessAsCI{CIJob: &struct{}{}}}},
			{ID: 6, ConfigProject: ConfigProject{ID: 4}, Configuration: AgentConfiguration{AccessAs: &AccessAsCI{Impersonate: &ImpersonateConfig{
				Username: "u", UID: "1", Groups: []string{"a", "b"}, Extra: []ExtraKeyVal{{Key: "k", Val: []string{"v1", "v2"}}}}}}},
			{ID: 7, ConfigProject: ConfigProject{ID: 4}},
		},
		Job: Job{ID: 3}, Pipeline: Pipeline{ID: 6},
		Project:     Project{ID: 150, Groups: []Group{{ID: 23}, {ID: 25}}},
		User:        CIUser{ID: 1, Username: "root", RolesInProject: []string{"guest", "reporter"}},
		Environment: &Environment{Tier: "production", Slug: "prod"},
	}
	if !reflect.DeepEqual(got, want) {
		gj, _ := json.Marshal(got)
		wj, _ := json.Marshal(want)
		t.Errorf("AllowedAgents =\n%s\nwant\n%s", gj, wj)
	}
}

func TestAuthorizeProxyUser(t *testing.T) {
	tests := []struct {
		name     string
		req      AuthorizeProxyUserRequest
		wantBody string
	}{
		{"pat", AuthorizeProxyUserRequest{AgentID: 9999, AccessType: AccessTypePersonalAccessToken, AccessKey: "glpat-x"},
			`{"agent_id":9999,"access_type":"personal_access_token","access_key":"glpat-x"}`},
		{"cookie", AuthorizeProxyUserRequest{AgentID: 1, AccessType: AccessTypeSessionCookie, AccessKey: "sess id", CSRFToken: "csrf"},
			`{"agent_id":1,"access_type":"session_cookie","access_key":"sess id","csrf_token":"csrf"}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeGitLab(t, "")
			f.handle(PathAuthorizeProxyUser, func(w http.ResponseWriter, r *http.Request) {
				if got := string(readBody(t, r)); got != tt.wantBody {
					t.Errorf("body %s, want %s", got, tt.wantBody)
				}
				jsonAnswer(http.StatusOK, `{"agent": {"id": 9999, "config_project": {"id": 1234}},
				  "user": {"id": 1234, "username": "the-user", "name": "ignored"},
				  "access_as": {"user": {"projects": [{"id": 1, "roles": ["reporter","developer"]}],
				                         "groups": [{"id": 2, "roles": ["developer"]}]}}}`)(w, r)
			})
			got, err := f.client().AuthorizeProxyUser(context.Background(), tt.req)
			if err != nil {
				t.Fatal(err)
			}
			want := &AuthorizeProxyUserResponse{
				Agent: ProxyAgent{ID: 9999, ConfigProject: ConfigProject{ID: 1234}},
				User:  User{ID: 1234, Username: "the-user"},
				AccessAs: &AccessAsProxyUser{User: &AccessAsUser{
					Projects: []ProjectRoles{{ID: 1, Roles: []string{"reporter", "developer"}}},
					Groups:   []GroupRoles{{ID: 2, Roles: []string{"developer"}}},
				}},
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("AuthorizeProxyUser = %+v, want %+v", got, want)
			}
		})
	}
}

func TestSendUsageMetrics(t *testing.T) {
	for _, status := range []int{http.StatusNoContent, http.StatusOK, http.StatusBadRequest} {
		f := newFakeGitLab(t, "")
		f.handle(PathUsageMetrics, func(w http.ResponseWriter, r *http.Request) {
			want := `{"counters":{"k8s_api_proxy_request":3},"unique_counters":{"agent_users_using_ci_tunnel":[1,2]}}`
			if got := string(readBody(t, r)); got != want {
				t.Errorf("body %s, want %s", got, want)
			}
			w.WriteHeader(status)
		})
		err := f.client().SendUsageMetrics(context.Background(), &UsageMetrics{
			Counters:       map[string]int64{"k8s_api_proxy_request": 3},
			UniqueCounters: map[string][]int64{"agent_users_using_ci_tunnel": {1, 2}},
		})
		if (err == nil) != (status < 300) {
			t.Errorf("status %d: error %v", status, err)
		}
	}
}

func TestPostAgentConfiguration(t *testing.T) {
	const body = `{"agent_id":5,"agent_config":{"user_access":{"projects":[{"id":"group/app"}]}}}`
	for _, tt := range []struct {
		status  int
		wantErr bool
	}{
		{http.StatusNoContent, false},
		{http.StatusNotFound, false}, // the agent was deleted meanwhile
		{http.StatusBadRequest, true},
		{http.StatusInternalServerError, true},
	} {
		f := newFakeGitLab(t, "")
		f.handle(PathAgentConfiguration, func(w http.ResponseWriter, r *http.Request) {
			if got := r.Header.Get("Content-Type"); got != "application/json" {
				t.Errorf("Content-Type %q", got)
			}
			if got := string(readBody(t, r)); got != body {
				t.Errorf("body %s, want %s", got, body)
			}
			w.WriteHeader(tt.status)
		})
		err := f.client().PostAgentConfiguration(context.Background(), json.RawMessage(body))
		if (err != nil) != tt.wantErr {
			t.Errorf("status %d: error %v", tt.status, err)
		}
	}
}

func TestClientNow(t *testing.T) {
	// The injected clock signs the JWT. A plain server records the token:
	// the fake GitLab would (rightly) refuse a token from another time.
	var got string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = r.Header.Get(JWTRequestHeader)
		w.WriteHeader(http.StatusNoContent)
	}))
	defer srv.Close()
	u, _ := url.Parse(srv.URL)
	secret := make([]byte, SecretLength)
	then := time.Unix(1_700_000_000, 0)
	c := &Client{BaseURL: u, Secret: secret, Now: func() time.Time { return then }}
	if err := c.SendUsageMetrics(context.Background(), &UsageMetrics{}); err != nil {
		t.Fatal(err)
	}
	if msg := verifyKASJWT(got, secret, then); msg != "" {
		t.Errorf("token signed at the injected time: %s", msg)
	}
	if verifyKASJWT(got, secret, time.Now()) == "" {
		t.Error("token from 2023 verified now")
	}
}

type recordedCall struct {
	path string
	code int
}

type callRecorder struct {
	mu    sync.Mutex // guards calls
	calls []recordedCall
}

func (r *callRecorder) GitLabCall(path string, code int, _ time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, recordedCall{path, code})
}

// GitLabRateLimited records a call not made as code -1.
func (r *callRecorder) GitLabRateLimited(path string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, recordedCall{path, -1})
}

func TestClientObserver(t *testing.T) {
	f := newFakeGitLab(t, "")
	f.handle(PathAgentInfo, jsonAnswer(http.StatusUnauthorized, `{"message":"401 Unauthorized"}`))
	rec := &callRecorder{}
	c := f.client()
	c.Observer = rec
	c.AgentInfo(context.Background(), "agent-token")

	down := &Client{BaseURL: &url.URL{Scheme: "http", Host: "127.0.0.1:1"}, Secret: c.Secret, Observer: rec}
	down.AgentInfo(context.Background(), "agent-token")

	want := []recordedCall{{PathAgentInfo, http.StatusUnauthorized}, {PathAgentInfo, 0}}
	if !reflect.DeepEqual(rec.calls, want) {
		t.Errorf("observed %v, want %v", rec.calls, want)
	}
}
