package fakegitlab

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"reflect"
	"regexp"
	"strings"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// The tests drive a Server with a plain Go HTTP client. Contract violations
// go to a collector through the unexported report hook instead of failing
// the test, so that each case can assert that the one it provokes was seen.

// collector gathers the violations a Server reports.
type collector struct {
	mu   sync.Mutex // guards msgs
	msgs []string
}

func (c *collector) report(msg string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.msgs = append(c.msgs, msg)
}

// take returns the violations reported so far and forgets them.
func (c *collector) take() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	msgs := c.msgs
	c.msgs = nil
	return msgs
}

// fixture is a Server whose violations are collected, with its secret.
type fixture struct {
	*Server
	secret     []byte
	violations *collector
}

func newFixture(t *testing.T, useTLS bool) *fixture {
	t.Helper()
	secret, _ := NewSecret(t)
	c := &collector{}
	s := start(t, Options{Secret: secret, report: c.report}, useTLS)
	t.Cleanup(func() {
		// Every case takes the violations it provoked.
		if left := c.take(); len(left) > 0 {
			t.Errorf("violations nobody expected: %q", left)
		}
	})
	return &fixture{Server: s, secret: secret, violations: c}
}

// validClaims are the claims our KAS promises (kas-spec §2.2).
func validClaims() jwt.MapClaims {
	now := time.Now()
	return jwt.MapClaims{
		"iss": "gitlab-kas",
		"aud": "gitlab",
		"exp": now.Add(30 * time.Second).Unix(),
		"nbf": now.Add(-5 * time.Second).Unix(),
		"iat": now.Unix(),
	}
}

// signJWT signs claims, changed by edit if not nil, with method and key.
func signJWT(t *testing.T, method jwt.SigningMethod, key any, edit func(jwt.MapClaims)) string {
	t.Helper()
	claims := validClaims()
	if edit != nil {
		edit(claims)
	}
	signed, err := jwt.NewWithClaims(method, claims).SignedString(key)
	if err != nil {
		t.Fatalf("sign a JWT: %v", err)
	}
	return signed
}

// kasJWT is a valid KAS JWT for the fixture, with claims changed by edit.
func (f *fixture) kasJWT(t *testing.T, edit func(jwt.MapClaims)) string {
	t.Helper()
	return signJWT(t, jwt.SigningMethodHS256, f.secret, edit)
}

// request is one request of a test case.
type request struct {
	method string
	path   string // with the query, if any
	header http.Header
	body   string
}

type response struct {
	status int
	header http.Header
	body   []byte
}

// do sends req and fails the test if it cannot; only for the test's own
// goroutine.
func (f *fixture) do(t *testing.T, req request) response {
	t.Helper()
	got, err := f.send(req)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// send sends req and reads the answer.
func (f *fixture) send(req request) (response, error) {
	var body io.Reader
	if req.body != "" {
		body = strings.NewReader(req.body)
	}
	r, err := http.NewRequest(req.method, f.URL+req.path, body)
	if err != nil {
		return response{}, err
	}
	for k, vs := range req.header {
		r.Header[k] = vs
	}
	resp, err := f.Client().Do(r)
	if err != nil {
		return response{}, fmt.Errorf("%s %s: %w", req.method, req.path, err)
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		return response{}, fmt.Errorf("%s %s: read the body: %w", req.method, req.path, err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: got}, nil
}

// expect checks the answer (wantBody "" means an empty body; a JSON
// wantBody is compared as JSON, so the shape is exact) and that the
// collected violations are exactly the ones wanted: a regular expression
// each, in order; none for a request that meets the contract.
func (f *fixture) expect(t *testing.T, got response, wantStatus int, wantBody string, wantViolations ...string) {
	t.Helper()
	if got.status != wantStatus {
		t.Errorf("status %d, want %d (body %s)", got.status, wantStatus, got.body)
	}
	switch {
	case wantBody == "":
		if len(got.body) != 0 {
			t.Errorf("body %s, want none", got.body)
		}
	default:
		if ct := got.header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("Content-Type %q, want application/json", ct)
		}
		assertJSON(t, got.body, wantBody)
	}
	violations := f.violations.take()
	if len(violations) != len(wantViolations) {
		t.Errorf("violations %q, want %d matching %q", violations, len(wantViolations), wantViolations)
		return
	}
	for i, want := range wantViolations {
		if !regexp.MustCompile(want).MatchString(violations[i]) {
			t.Errorf("violation %q does not match %q", violations[i], want)
		}
	}
}

// assertJSON compares two JSON documents by value, keys present included.
func assertJSON(t *testing.T, got []byte, want string) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Errorf("answer %s is not JSON: %v", got, err)
		return
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("the wanted answer %s is not JSON: %v", want, err)
	}
	if !reflect.DeepEqual(g, w) {
		t.Errorf("answer\n%s\nwant\n%s", got, want)
	}
}

func header(kv ...string) http.Header {
	h := http.Header{}
	for i := 0; i < len(kv); i += 2 {
		h.Add(kv[i], kv[i+1])
	}
	return h
}

const (
	jwtInvalid   = `{"message":"KAS JWT authentication invalid"}`
	unauthorized = `{"message":"401 Unauthorized"}`
)

// agentInfoAnswer is the agent_info answer for agent 7 of project 3.
const agentInfoAnswer = `{
  "project_id": 3, "agent_id": 7, "agent_name": "my-agent",
  "gitaly_info": {"address": "unix:/var/opt/gitlab/gitaly/gitaly.socket", "token": "", "features": {}},
  "gitaly_repository": {
    "storage_name": "default",
    "relative_path": "@hashed/4e/07/4e07408562bedb8b60ce05c1decfe3ad16b72230967de01f640b7e4729b49fce.git",
    "git_object_directory": "", "git_alternate_object_directories": [],
    "gl_repository": "project-3", "gl_project_path": "group/agents"},
  "default_branch": "main"}`

// TestKASJWT checks the KAS to GitLab JWT (kas-spec §2.2) on agent_info:
// a JWT as KAS makes it is accepted, and each way of getting it wrong is
// answered 401 "KAS JWT authentication invalid" and reported.
func TestKASJWT(t *testing.T) {
	f := newFixture(t, false)
	f.AddAgent(Agent{ID: 7, ProjectID: 3, Name: "my-agent", Token: "agent-token", ProjectPath: "group/agents"})
	now := time.Now()
	tests := []struct {
		name          string
		jwts          func(t *testing.T) []string // the header's values
		wantViolation string                      // "" for a valid JWT
	}{
		{"valid", func(t *testing.T) []string { return []string{f.kasJWT(t, nil)} }, ""},
		{"audience as a list", func(t *testing.T) []string {
			return []string{f.kasJWT(t, func(c jwt.MapClaims) { c["aud"] = []string{"gitlab"} })}
		}, ""},
		{"exp just under 30 s ahead plus slack", func(t *testing.T) []string {
			return []string{f.kasJWT(t, func(c jwt.MapClaims) { c["exp"] = now.Add(33 * time.Second).Unix() })}
		}, ""},
		{"no JWT", func(*testing.T) []string { return nil }, `no Gitlab-Kas-Api-Request header`},
		{"empty JWT", func(*testing.T) []string { return []string{""} }, `empty Gitlab-Kas-Api-Request header`},
		{"two JWTs", func(t *testing.T) []string { return []string{f.kasJWT(t, nil), f.kasJWT(t, nil)} }, `2 Gitlab-Kas-Api-Request headers`},
		{"not a JWT", func(*testing.T) []string { return []string{"not-a-jwt"} }, `not a well-formed JWT`},
		{"expired", func(t *testing.T) []string {
			return []string{f.kasJWT(t, func(c jwt.MapClaims) { c["exp"] = now.Add(-10 * time.Second).Unix() })}
		}, `expired: exp is \d`},
		{"exp too far ahead", func(t *testing.T) []string {
			return []string{f.kasJWT(t, func(c jwt.MapClaims) { c["exp"] = now.Add(10 * time.Minute).Unix() })}
		}, `exp is 9m5\d.*s ahead, KAS sets it 30s ahead`},
		{"no exp", func(t *testing.T) []string { return []string{f.kasJWT(t, func(c jwt.MapClaims) { delete(c, "exp") })} }, `no exp claim`},
		{"nbf in the future", func(t *testing.T) []string {
			return []string{f.kasJWT(t, func(c jwt.MapClaims) { c["nbf"] = now.Add(time.Minute).Unix() })}
		}, `nbf is .* in the future`},
		{"no nbf", func(t *testing.T) []string { return []string{f.kasJWT(t, func(c jwt.MapClaims) { delete(c, "nbf") })} }, `no nbf claim`},
		{"iat in the future", func(t *testing.T) []string {
			return []string{f.kasJWT(t, func(c jwt.MapClaims) { c["iat"] = now.Add(time.Minute).Unix() })}
		}, `iat is .* in the future`},
		{"no iat", func(t *testing.T) []string { return []string{f.kasJWT(t, func(c jwt.MapClaims) { delete(c, "iat") })} }, `no iat claim`},
		{"wrong issuer", func(t *testing.T) []string {
			return []string{f.kasJWT(t, func(c jwt.MapClaims) { c["iss"] = "gitlab" })}
		}, `iss is "gitlab", want "gitlab-kas"`},
		{"no issuer", func(t *testing.T) []string { return []string{f.kasJWT(t, func(c jwt.MapClaims) { delete(c, "iss") })} }, `iss is "", want "gitlab-kas"`},
		{"wrong audience", func(t *testing.T) []string {
			return []string{f.kasJWT(t, func(c jwt.MapClaims) { c["aud"] = "gitlab-kas" })}
		}, `aud is \["gitlab-kas"\], want just "gitlab"`},
		{"extra audience", func(t *testing.T) []string {
			return []string{f.kasJWT(t, func(c jwt.MapClaims) { c["aud"] = []string{"gitlab", "other"} })}
		}, `aud is \["gitlab" "other"\]`},
		{"two wrong claims at once", func(t *testing.T) []string {
			return []string{f.kasJWT(t, func(c jwt.MapClaims) { c["iss"] = "x"; delete(c, "iat") })}
		}, `iss is "x", want "gitlab-kas"; no iat claim`},
		{"HS512 instead of HS256", func(t *testing.T) []string {
			return []string{signJWT(t, jwt.SigningMethodHS512, f.secret, nil)}
		}, `algorithm "HS512", want HS256`},
		{"HS384 instead of HS256", func(t *testing.T) []string {
			return []string{signJWT(t, jwt.SigningMethodHS384, f.secret, nil)}
		}, `algorithm "HS384", want HS256`},
		{"unsigned", func(t *testing.T) []string {
			return []string{signJWT(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, nil)}
		}, `algorithm "none", want HS256`},
		{"wrong secret", func(t *testing.T) []string {
			return []string{signJWT(t, jwt.SigningMethodHS256, bytes.Repeat([]byte("x"), SecretSize), nil)}
		}, `signature does not verify with the shared secret`},
	}
	wantCalls := 0
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := header("Authorization", "Bearer agent-token")
			if jwts := tt.jwts(t); jwts != nil {
				h[kasJWTHeader] = jwts
			}
			got := f.do(t, request{method: http.MethodGet, path: PathAgentInfo, header: h})
			if tt.wantViolation == "" {
				wantCalls++
				f.expect(t, got, http.StatusOK, agentInfoAnswer)
				return
			}
			f.expect(t, got, http.StatusUnauthorized, jwtInvalid, `^fakegitlab: GET `+PathAgentInfo+`: .*`+tt.wantViolation)
		})
	}
	if got := f.Calls(PathAgentInfo); got != wantCalls {
		t.Errorf("Calls(agent_info) = %d, want %d: a request with a bad JWT was counted", got, wantCalls)
	}
}

// TestAgentInfo checks agent_info (kas-spec §2.1): the agent token in either
// header, the exact answer, unknown and revoked tokens as legitimate 401s,
// and the violations.
func TestAgentInfo(t *testing.T) {
	f := newFixture(t, false)
	f.AddAgent(Agent{ID: 7, ProjectID: 3, Name: "my-agent", Token: "agent-token", ProjectPath: "group/agents"})
	f.AddAgent(Agent{ID: 7, ProjectID: 3, Name: "my-agent", Token: "second-token", ProjectPath: "group/agents"})
	f.AddAgent(Agent{ID: 8, ProjectID: 4, Name: "other", Token: "revoked-token"})
	f.RevokeAgentToken("revoked-token")

	tests := []struct {
		name       string
		method     string
		query      string
		header     []string
		wantStatus int
		wantBody   string
		violations []string
		counted    bool
	}{
		{name: "bearer", header: []string{"Authorization", "Bearer agent-token"}, wantStatus: 200, wantBody: agentInfoAnswer, counted: true},
		{name: "bearer in lower case", header: []string{"Authorization", "bearer agent-token"}, wantStatus: 200, wantBody: agentInfoAnswer, counted: true},
		{name: "second token of the agent", header: []string{"Authorization", "Bearer second-token"}, wantStatus: 200, wantBody: agentInfoAnswer, counted: true},
		{name: "newer header", header: []string{"Gitlab-Agentk-Api-Request", "agent-token"}, wantStatus: 200, wantBody: agentInfoAnswer, counted: true},
		{name: "both headers agree", header: []string{"Authorization", "Bearer agent-token", "Gitlab-Agentk-Api-Request", "agent-token"}, wantStatus: 200, wantBody: agentInfoAnswer, counted: true},
		{name: "unknown token", header: []string{"Authorization", "Bearer nobody"}, wantStatus: 401, wantBody: unauthorized, counted: true},
		{name: "revoked token", header: []string{"Authorization", "Bearer revoked-token"}, wantStatus: 401, wantBody: unauthorized, counted: true},
		{name: "no token", wantStatus: 401, wantBody: unauthorized, violations: []string{`no agent token`}},
		{name: "not bearer", header: []string{"Authorization", "Token agent-token"}, wantStatus: 401, wantBody: unauthorized, violations: []string{`Authorization header is not "Bearer <agent token>"`}},
		{name: "empty bearer", header: []string{"Authorization", "Bearer "}, wantStatus: 401, wantBody: unauthorized, violations: []string{`Authorization header is not`}},
		{name: "headers disagree", header: []string{"Authorization", "Bearer agent-token", "Gitlab-Agentk-Api-Request", "second-token"}, wantStatus: 401, wantBody: unauthorized, violations: []string{`different agent tokens`}},
		{name: "two bearers", header: []string{"Authorization", "Bearer agent-token", "Authorization", "Bearer agent-token"}, wantStatus: 401, wantBody: unauthorized, violations: []string{`2 Authorization headers`}},
		{name: "POST", method: http.MethodPost, header: []string{"Authorization", "Bearer agent-token"}, wantStatus: 405, wantBody: `{"message":"405 Method Not Allowed"}`, violations: []string{`^fakegitlab: POST .*agent_info: wrong method: the endpoint takes GET`}},
		{name: "query string", query: "?id=3", header: []string{"Authorization", "Bearer agent-token"}, wantStatus: 200, wantBody: agentInfoAnswer, violations: []string{`unexpected query string`}, counted: true},
	}
	wantCalls := 0
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			method := tt.method
			if method == "" {
				method = http.MethodGet
			}
			h := header(tt.header...)
			h.Set(kasJWTHeader, f.kasJWT(t, nil))
			got := f.do(t, request{method: method, path: PathAgentInfo + tt.query, header: h})
			f.expect(t, got, tt.wantStatus, tt.wantBody, tt.violations...)
			if tt.counted {
				wantCalls++
			}
			if got := f.Calls(PathAgentInfo); got != wantCalls {
				t.Errorf("Calls(agent_info) = %d, want %d", got, wantCalls)
			}
		})
	}
}

// world fills the fixture with a small GitLab: groups platform (23),
// platform/apps (25) and other (40); the agents' configuration projects
// platform/deployments (3) and platform/agents2 (4), the projects
// platform/apps/web (150), platform/apps/api (151) and other/thing (160);
// agents 5 (of project 3), 9 (of project 4) and 12 (of project 3, no
// configuration posted); users and their memberships, tokens and
// sessions. Then it posts the configurations of agents 5 and 9 as KAS
// does.
func (f *fixture) world(t *testing.T) {
	t.Helper()
	f.AddGroup(Group{ID: 23, Path: "platform"})
	f.AddGroup(Group{ID: 25, Path: "platform/apps"})
	f.AddGroup(Group{ID: 40, Path: "other"})
	for _, p := range []Project{{ID: 3, Path: "platform/deployments"}, {ID: 4, Path: "platform/agents2"},
		{ID: 150, Path: "platform/apps/web"}, {ID: 151, Path: "platform/apps/api"}, {ID: 160, Path: "other/thing"}} {
		f.AddProject(p)
	}
	f.AddAgent(Agent{ID: 5, ProjectID: 3, Name: "prod", Token: "agent-5-token"})
	f.AddAgent(Agent{ID: 9, ProjectID: 4, Name: "other-agent", Token: "agent-9-token"})
	f.AddAgent(Agent{ID: 12, ProjectID: 3, Name: "unconfigured", Token: "agent-12-token"})
	for _, u := range []User{{1, "root"}, {2, "dev"}, {1234, "the-user"}, {1235, "web-user"}, {1236, "reporter"}} {
		f.AddUser(u)
	}
	f.AddMember("root", "platform/apps/web", "maintainer")
	f.AddMember("the-user", "platform", "developer")
	f.AddMember("web-user", "platform/deployments", "maintainer")
	f.AddMember("reporter", "platform", "reporter")
	f.AddPersonalAccessToken("the-user", "glpat-1", "k8s_proxy")
	f.AddPersonalAccessToken("the-user", "glpat-noscope", "api", "read_user")
	f.AddPersonalAccessToken("reporter", "glpat-reporter", "k8s_proxy")
	f.AddPersonalAccessToken("dev", "glpat-dev", "k8s_proxy")
	f.AddSession("web-user", "cookie-1", "csrf-1")
	f.AddSession("web-user", "cookie-expired", "csrf-x")
	f.ExpireSession("cookie-expired")
	f.expect(t, f.postConfig(t, `{"agent_id":5,"agent_config":{
		"ci_access":{"projects":[{"id":"platform/apps/web","default_namespace":"ns","access_as":{"ci_job":{}}},{"id":"other/thing"},{"id":"platform/missing"}],
		             "groups":[{"id":"platform/apps","environments":["staging","review/*"]}]},
		"user_access":{"access_as":{"user":{}},"projects":[{"id":"platform/deployments"}],"groups":[{"id":"platform"}]}}}`), 204, "")
	f.expect(t, f.postConfig(t, `{"agent_id":"9","agent_config":{"ci_access":{"groups":[{"id":"platform"}]},"user_access":{"projects":[{"id":"platform/deployments"}]}}}`), 204, "")
}

// postConfig posts an agent configuration body as KAS does.
func (f *fixture) postConfig(t *testing.T, body string) response {
	t.Helper()
	return f.do(t, request{method: http.MethodPost, path: PathAgentConfiguration,
		header: header(kasJWTHeader, f.kasJWT(t, nil), "Content-Type", "application/json"), body: body})
}

// TestAgentConfiguration checks agent_configuration (kas-spec §3.1): a
// configuration as KAS posts it is answered 204 and kept, an unknown agent
// is a legitimate 404, and a body of another shape is a violation.
func TestAgentConfiguration(t *testing.T) {
	f := newFixture(t, false)
	f.world(t)
	if got := len(f.PostedConfigurations()); got != 2 {
		t.Fatalf("%d configurations kept, want 2", got)
	}
	tests := []struct {
		name       string
		body       string
		wantStatus int
		wantBody   string
		violations []string
	}{
		{name: "empty configuration", body: `{"agent_id":12,"agent_config":{}}`, wantStatus: 204},
		{name: "unknown agent", body: `{"agent_id":77,"agent_config":{}}`, wantStatus: 404, wantBody: `{"message":"404 Not found"}`},
		{name: "no agent_config", body: `{"agent_id":12}`, wantStatus: 400, wantBody: `{"error":"agent_config is missing"}`, violations: []string{`agent_config is missing`}},
		{name: "agent_config a string", body: `{"agent_id":12,"agent_config":"ci_access: {}"}`, wantStatus: 400, wantBody: `{"error":"agent_config is invalid"}`, violations: []string{`not a JSON object`}},
		{name: "agent_id invalid", body: `{"agent_id":"x","agent_config":{}}`, wantStatus: 400, wantBody: `{"error":"agent_id is invalid"}`, violations: []string{`agent_id is invalid`}},
		{name: "unknown field", body: `{"agent_id":12,"agent_config":{},"commit_id":"abc"}`, wantStatus: 400, violations: []string{`unknown field "commit_id"`}},
		{name: "ci_access entry without id", body: `{"agent_id":12,"agent_config":{"ci_access":{"projects":[{"default_namespace":"x"}]}}}`, wantStatus: 400, violations: []string{`entry without a string id`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := f.postConfig(t, tt.body)
			wantBody := tt.wantBody
			if wantBody == "" && tt.wantStatus == http.StatusBadRequest {
				wantBody = string(got.body)
			}
			f.expect(t, got, tt.wantStatus, wantBody, tt.violations...)
		})
	}
	posted := f.PostedConfigurations()
	if len(posted) != 3 || posted[2].AgentID != 12 || string(posted[2].Body) != `{"agent_id":12,"agent_config":{}}` {
		t.Errorf("posted %+v", posted)
	}
}

// TestAllowedAgents checks allowed_agents (kas-spec §2.5): the agents a job
// may use follow from the configurations posted (project entries, then
// group entries from the innermost group out, then the agents of the
// job's own project, each agent once, environments filtering), the roles
// from memberships; an unknown token is a legitimate 401; and the
// violations, the KAS JWT among them.
func TestAllowedAgents(t *testing.T) {
	f := newFixture(t, false)
	f.world(t)
	f.AddJob(Job{Token: "job-token", JobID: 3, PipelineID: 6, ProjectID: 150, Username: "root",
		Environment: &Environment{Name: "production", Tier: "production", Slug: "prod"}})
	f.AddJob(Job{Token: "bare-job-token", JobID: 4, PipelineID: 7, ProjectID: 151, Username: "dev"})
	f.AddJob(Job{Token: "staging-job-token", JobID: 5, PipelineID: 8, ProjectID: 151, Username: "dev",
		Environment: &Environment{Name: "review/feature-x", Tier: "development", Slug: "review-feature-x"}})
	f.AddJob(Job{Token: "own-project-job-token", JobID: 6, PipelineID: 9, ProjectID: 3, Username: "web-user"})
	f.AddJob(Job{Token: "other-root-job-token", JobID: 7, PipelineID: 10, ProjectID: 160, Username: "root"})
	const fullAnswer = `{
	  "allowed_agents": [
	    {"id": 5, "config_project": {"id": 3}, "configuration": {"default_namespace": "ns", "access_as": {"ci_job": {}}}},
	    {"id": 9, "config_project": {"id": 4}, "configuration": {}}],
	  "job": {"id": 3}, "pipeline": {"id": 6},
	  "project": {"id": 150, "groups": [{"id": 23}, {"id": 25}]},
	  "user": {"id": 1, "username": "root", "roles_in_project": ["guest", "reporter", "developer", "maintainer"]},
	  "environment": {"tier": "production", "slug": "prod"}}`
	const bareAnswer = `{
	  "allowed_agents": [{"id": 9, "config_project": {"id": 4}, "configuration": {}}],
	  "job": {"id": 4}, "pipeline": {"id": 7},
	  "project": {"id": 151, "groups": [{"id": 23}, {"id": 25}]},
	  "user": {"id": 2, "username": "dev", "roles_in_project": []}}`
	const stagingAnswer = `{
	  "allowed_agents": [
	    {"id": 5, "config_project": {"id": 3}, "configuration": {"environments": ["staging", "review/*"]}},
	    {"id": 9, "config_project": {"id": 4}, "configuration": {}}],
	  "job": {"id": 5}, "pipeline": {"id": 8},
	  "project": {"id": 151, "groups": [{"id": 23}, {"id": 25}]},
	  "user": {"id": 2, "username": "dev", "roles_in_project": []},
	  "environment": {"tier": "development", "slug": "review-feature-x"}}`
	const ownProjectAnswer = `{
	  "allowed_agents": [
	    {"id": 9, "config_project": {"id": 4}, "configuration": {}},
	    {"id": 5, "config_project": {"id": 3}, "configuration": {}},
	    {"id": 12, "config_project": {"id": 3}, "configuration": {}}],
	  "job": {"id": 6}, "pipeline": {"id": 9},
	  "project": {"id": 3, "groups": [{"id": 23}]},
	  "user": {"id": 1235, "username": "web-user", "roles_in_project": ["guest", "reporter", "developer", "maintainer"]}}`
	const otherRootAnswer = `{
	  "allowed_agents": [], "job": {"id": 7}, "pipeline": {"id": 10},
	  "project": {"id": 160, "groups": [{"id": 40}]},
	  "user": {"id": 1, "username": "root", "roles_in_project": []}}`

	tests := []struct {
		name       string
		method     string
		header     []string
		withJWT    bool
		wantStatus int
		wantBody   string
		violations []string
		counted    bool
	}{
		{name: "project entry first, then a group", header: []string{"Job-Token", "job-token"}, wantStatus: 200, wantBody: fullAnswer, counted: true},
		{name: "group entry with environments, job without", header: []string{"Job-Token", "bare-job-token"}, wantStatus: 200, wantBody: bareAnswer, counted: true},
		{name: "group entry with a matching environment", header: []string{"Job-Token", "staging-job-token"}, wantStatus: 200, wantBody: stagingAnswer, counted: true},
		{name: "agents of the job's own project", header: []string{"Job-Token", "own-project-job-token"}, wantStatus: 200, wantBody: ownProjectAnswer, counted: true},
		{name: "entries outside the root namespace do not count", header: []string{"Job-Token", "other-root-job-token"}, wantStatus: 200, wantBody: otherRootAnswer, counted: true},
		{name: "unknown job token", header: []string{"Job-Token", "nobody"}, wantStatus: 401, wantBody: unauthorized, counted: true},
		{name: "KAS JWT sent", header: []string{"Job-Token", "job-token"}, withJWT: true, wantStatus: 200, wantBody: fullAnswer, violations: []string{`the Gitlab-Kas-Api-Request header must not be sent to this endpoint`}, counted: true},
		{name: "no job token", wantStatus: 401, wantBody: unauthorized, violations: []string{`GET /api/v4/job/allowed_agents: no Job-Token header`}},
		{name: "empty job token", header: []string{"Job-Token", ""}, wantStatus: 401, wantBody: unauthorized, violations: []string{`empty Job-Token header`}},
		{name: "two job tokens", header: []string{"Job-Token", "job-token", "Job-Token", "job-token"}, wantStatus: 401, wantBody: unauthorized, violations: []string{`2 Job-Token headers`}},
		{name: "authorization sent along", header: []string{"Job-Token", "job-token", "Authorization", "Bearer x"}, wantStatus: 200, wantBody: fullAnswer, violations: []string{`an Authorization header was sent with the job token`}, counted: true},
		{name: "POST", method: http.MethodPost, header: []string{"Job-Token", "job-token"}, wantStatus: 405, wantBody: `{"message":"405 Method Not Allowed"}`, violations: []string{`wrong method`}},
	}
	wantCalls := 0
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			method := tt.method
			if method == "" {
				method = http.MethodGet
			}
			h := header(tt.header...)
			if tt.withJWT {
				h.Set(kasJWTHeader, f.kasJWT(t, nil))
			}
			got := f.do(t, request{method: method, path: PathAllowedAgents, header: h})
			f.expect(t, got, tt.wantStatus, tt.wantBody, tt.violations...)
			if tt.counted {
				wantCalls++
			}
			if got := f.Calls(PathAllowedAgents); got != wantCalls {
				t.Errorf("Calls(allowed_agents) = %d, want %d", got, wantCalls)
			}
		})
	}

	// A configuration without the project's entry takes the access away.
	f.expect(t, f.postConfig(t, `{"agent_id":5,"agent_config":{}}`), 204, "")
	got := f.do(t, request{method: http.MethodGet, path: PathAllowedAgents, header: header("Job-Token", "job-token")})
	var answer struct {
		AllowedAgents []struct{ ID int64 } `json:"allowed_agents"`
	}
	if err := json.Unmarshal(got.body, &answer); err != nil || len(answer.AllowedAgents) != 1 || answer.AllowedAgents[0].ID != 9 {
		t.Errorf("after agent 5's ci_access was removed: %s", got.body)
	}
	f.violations.take()
}

// TestAuthorizeProxyUser checks authorize_proxy_user (kas-spec §2.6): the
// exact answers for a personal access token and a session cookie, the
// refusals Rails gives, and the violations of the request shape.
func TestAuthorizeProxyUser(t *testing.T) {
	f := newFixture(t, false)
	f.world(t)

	const (
		patAnswer = `{"agent": {"id": 5, "config_project": {"id": 3}}, "user": {"id": 1234, "username": "the-user"},
		  "access_as": {"user": {"projects": [{"id": 3, "roles": ["guest", "reporter", "developer"]}],
		                         "groups": [{"id": 23, "roles": ["guest", "reporter", "developer"]}]}}}`
		cookieAnswer = `{"agent": {"id": 5, "config_project": {"id": 3}}, "user": {"id": 1235, "username": "web-user"},
		  "access_as": {"user": {"projects": [{"id": 3, "roles": ["guest", "reporter", "developer", "maintainer"]}], "groups": []}}}`
		defaultAnswer = `{"agent": {"id": 9, "config_project": {"id": 4}}, "user": {"id": 1234, "username": "the-user"}}`
		forbidden     = `{"message":"403 Forbidden"}`
	)
	tests := []struct {
		name        string
		method      string
		contentType string // default application/json
		noJWT       bool
		body        string
		wantStatus  int
		wantBody    string
		violations  []string
		counted     bool
	}{
		{name: "personal access token", body: `{"agent_id":5,"access_type":"personal_access_token","access_key":"glpat-1"}`, wantStatus: 200, wantBody: patAnswer, counted: true},
		{name: "token with empty csrf_token", body: `{"agent_id":5,"access_type":"personal_access_token","access_key":"glpat-1","csrf_token":""}`, wantStatus: 200, wantBody: patAnswer, counted: true},
		{name: "session cookie", contentType: "application/json; charset=utf-8", body: `{"agent_id":5,"access_type":"session_cookie","access_key":"cookie-1","csrf_token":"csrf-1"}`, wantStatus: 200, wantBody: cookieAnswer, counted: true},
		{name: "configuration without access_as", body: `{"agent_id":9,"access_type":"personal_access_token","access_key":"glpat-1"}`, wantStatus: 200, wantBody: defaultAnswer, counted: true},
		{name: "cookie with the wrong CSRF token", body: `{"agent_id":5,"access_type":"session_cookie","access_key":"cookie-1","csrf_token":"csrf-2"}`, wantStatus: 401, wantBody: unauthorized, counted: true},
		{name: "expired session", body: `{"agent_id":5,"access_type":"session_cookie","access_key":"cookie-expired","csrf_token":"csrf-x"}`, wantStatus: 401, wantBody: unauthorized, counted: true},
		{name: "unknown token", body: `{"agent_id":5,"access_type":"personal_access_token","access_key":"glpat-nobody"}`, wantStatus: 401, wantBody: unauthorized, counted: true},
		{name: "cookie presented as a token", body: `{"agent_id":5,"access_type":"personal_access_token","access_key":"cookie-1"}`, wantStatus: 401, wantBody: unauthorized, counted: true},
		{name: "token without the k8s_proxy scope", body: `{"agent_id":5,"access_type":"personal_access_token","access_key":"glpat-noscope"}`, wantStatus: 403, wantBody: forbidden, counted: true},
		{name: "a reporter is not enough", body: `{"agent_id":5,"access_type":"personal_access_token","access_key":"glpat-reporter"}`, wantStatus: 403, wantBody: forbidden, counted: true},
		{name: "a member of nothing user_access lists", body: `{"agent_id":5,"access_type":"personal_access_token","access_key":"glpat-dev"}`, wantStatus: 403, wantBody: forbidden, counted: true},
		{name: "a maintainer of a listed project, configuration without access_as", body: `{"agent_id":9,"access_type":"session_cookie","access_key":"cookie-1","csrf_token":"csrf-1"}`, wantStatus: 200,
			wantBody: `{"agent": {"id": 9, "config_project": {"id": 4}}, "user": {"id": 1235, "username": "web-user"}}`, counted: true},
		{name: "agent without a configuration", body: `{"agent_id":12,"access_type":"personal_access_token","access_key":"glpat-1"}`, wantStatus: 403, wantBody: forbidden, counted: true},
		{name: "unknown agent", body: `{"agent_id":1,"access_type":"personal_access_token","access_key":"glpat-1"}`, wantStatus: 404, wantBody: `{"message":"404 Not found"}`, counted: true},
		// Rails coerces agent_id with Ruby's Integer(); GitLab's KAS sends
		// it as a string (protojson's int64).
		{name: "agent_id as a string, as GitLab's KAS sends it", body: `{"agent_id":"5","access_type":"personal_access_token","access_key":"glpat-1"}`, wantStatus: 200, wantBody: patAnswer, counted: true},
		{name: "agent_id as a string Ruby's Integer reads", body: `{"agent_id":" +0d0_5 ","access_type":"personal_access_token","access_key":"glpat-1"}`, wantStatus: 200, wantBody: patAnswer, counted: true},

		{name: "no JWT", noJWT: true, body: `{"agent_id":5,"access_type":"personal_access_token","access_key":"glpat-1"}`, wantStatus: 401, wantBody: jwtInvalid, violations: []string{`no Gitlab-Kas-Api-Request header`}},
		{name: "cookie without csrf_token", body: `{"agent_id":5,"access_type":"session_cookie","access_key":"cookie-1"}`, wantStatus: 400, wantBody: `{"error":"csrf_token is missing (required for session_cookie)"}`, violations: []string{`csrf_token is missing`}},
		{name: "cookie with empty csrf_token", body: `{"agent_id":5,"access_type":"session_cookie","access_key":"cookie-1","csrf_token":""}`, wantStatus: 400, wantBody: `{"error":"csrf_token is missing (required for session_cookie)"}`, violations: []string{`csrf_token is missing`}},
		{name: "token with a csrf_token", body: `{"agent_id":5,"access_type":"personal_access_token","access_key":"glpat-1","csrf_token":"csrf-1"}`, wantStatus: 400, wantBody: `{"error":"csrf_token is set for personal_access_token (it is only for session_cookie)"}`, violations: []string{`csrf_token is set for personal_access_token`}},
		{name: "unknown field", body: `{"agent_id":5,"access_type":"personal_access_token","access_key":"glpat-1","agent_name":"x"}`, wantStatus: 400, violations: []string{`json: unknown field "agent_name"`}},
		{name: "agent_id not an integer", body: `{"agent_id":"5x","access_type":"personal_access_token","access_key":"glpat-1"}`, wantStatus: 400, wantBody: `{"error":"agent_id is invalid"}`, violations: []string{`agent_id is invalid`}},
		{name: "agent_id with a fraction", body: `{"agent_id":5.5,"access_type":"personal_access_token","access_key":"glpat-1"}`, wantStatus: 400, wantBody: `{"error":"agent_id is invalid"}`, violations: []string{`agent_id is invalid`}},
		{name: "agent_id an empty string", body: `{"agent_id":"","access_type":"personal_access_token","access_key":"glpat-1"}`, wantStatus: 400, wantBody: `{"error":"agent_id is invalid"}`, violations: []string{`agent_id is invalid`}},
		{name: "agent_id a list", body: `{"agent_id":[5],"access_type":"personal_access_token","access_key":"glpat-1"}`, wantStatus: 400, wantBody: `{"error":"agent_id is invalid"}`, violations: []string{`agent_id is invalid`}},
		{name: "agent_id with a double underscore", body: `{"agent_id":"5__5","access_type":"personal_access_token","access_key":"glpat-1"}`, wantStatus: 400, wantBody: `{"error":"agent_id is invalid"}`, violations: []string{`agent_id is invalid`}},
		{name: "unknown access_type", body: `{"agent_id":5,"access_type":"oidc","access_key":"glpat-1"}`, wantStatus: 400, wantBody: `{"error":"access_type does not have a valid value"}`, violations: []string{`access_type does not have a valid value`}},
		{name: "missing fields", body: `{}`, wantStatus: 400, wantBody: `{"error":"agent_id is missing, access_type is missing, access_key is missing"}`, violations: []string{`agent_id is missing, access_type is missing, access_key is missing`}},
		{name: "empty access_key", body: `{"agent_id":5,"access_type":"personal_access_token","access_key":""}`, wantStatus: 400, violations: []string{`access_key is empty`}},
		{name: "data after the object", body: `{"agent_id":5,"access_type":"personal_access_token","access_key":"glpat-1"} {}`, wantStatus: 400, violations: []string{`data after its JSON object`}},
		{name: "not an object", body: `[1]`, wantStatus: 400, violations: []string{`not a JSON object`}},
		{name: "form content type", contentType: "application/x-www-form-urlencoded", body: `agent_id=5`, wantStatus: 400, violations: []string{`Content-Type is "application/x-www-form-urlencoded", want application/json`}},
		{name: "GET", method: http.MethodGet, wantStatus: 405, wantBody: `{"message":"405 Method Not Allowed"}`, violations: []string{`GET .*authorize_proxy_user: wrong method: the endpoint takes POST`}},
	}
	wantCalls := 0
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			method := tt.method
			if method == "" {
				method = http.MethodPost
			}
			h := http.Header{}
			if !tt.noJWT {
				h.Set(kasJWTHeader, f.kasJWT(t, nil))
			}
			if tt.body != "" {
				ct := tt.contentType
				if ct == "" {
					ct = "application/json"
				}
				h.Set("Content-Type", ct)
			}
			got := f.do(t, request{method: method, path: PathAuthorizeProxyUser, header: h, body: tt.body})
			wantBody := tt.wantBody
			if wantBody == "" && tt.wantStatus == http.StatusBadRequest {
				// The message is the decoder's; check the body's shape.
				var e struct{ Error string }
				if err := json.Unmarshal(got.body, &e); err != nil || e.Error == "" {
					t.Errorf(`body %s, want {"error": "..."}`, got.body)
				}
				wantBody = string(got.body)
			}
			f.expect(t, got, tt.wantStatus, wantBody, tt.violations...)
			if tt.counted {
				wantCalls++
			}
			if got := f.Calls(PathAuthorizeProxyUser); got != wantCalls {
				t.Errorf("Calls(authorize_proxy_user) = %d, want %d", got, wantCalls)
			}
		})
	}
}

// TestUsageMetrics checks usage_metrics (kas-spec §7): reports with the
// documented counters are answered 204 and kept in order; anything else is
// a violation and is not kept.
func TestUsageMetrics(t *testing.T) {
	f := newFixture(t, false)
	const full = `{"counters": {"k8s_api_proxy_request": 3, "flux_git_push_notifications_total": 1,
	    "k8s_api_proxy_requests_via_ci_access": 1, "k8s_api_proxy_requests_via_user_access": 1,
	    "k8s_api_proxy_requests_via_pat_access": 1, "gitops_sync": 0},
	  "unique_counters": {"k8s_api_proxy_requests_unique_users_via_ci_access": [1,2],
	    "k8s_api_proxy_requests_unique_agents_via_ci_access": [5],
	    "k8s_api_proxy_requests_unique_users_via_user_access": [], "k8s_api_proxy_requests_unique_agents_via_user_access": [],
	    "k8s_api_proxy_requests_unique_users_via_pat_access": [], "k8s_api_proxy_requests_unique_agents_via_pat_access": [],
	    "flux_git_push_notified_unique_projects": [7], "agent_users_using_ci_tunnel": [1]}}`
	tests := []struct {
		name       string
		body       string
		noJWT      bool
		wantStatus int
		violations []string
	}{
		{name: "full report", body: full, wantStatus: 204},
		{name: "counters only", body: `{"counters":{"k8s_api_proxy_request":2}}`, wantStatus: 204},
		{name: "no JWT", body: full, noJWT: true, wantStatus: 401, violations: []string{`no Gitlab-Kas-Api-Request header`}},
		{name: "unknown counter", body: `{"counters":{"k8s_api_proxy_request":1,"made_up":1}}`, wantStatus: 400, violations: []string{`unknown counter "made_up"`}},
		{name: "unique counter among counters", body: `{"counters":{"agent_users_using_ci_tunnel":1}}`, wantStatus: 400, violations: []string{`unknown counter "agent_users_using_ci_tunnel"`}},
		{name: "unknown unique counter", body: `{"unique_counters":{"made_up":[1]}}`, wantStatus: 400, violations: []string{`unknown unique counter "made_up"`}},
		{name: "null unique counter", body: `{"unique_counters":{"agent_users_using_ci_tunnel":null}}`, wantStatus: 400, violations: []string{`is null, not a list`}},
		{name: "negative counter", body: `{"counters":{"gitops_sync":-1}}`, wantStatus: 400, violations: []string{`negative counter "gitops_sync"`}},
		{name: "unknown top-level field", body: `{"counters":{},"events":{}}`, wantStatus: 400, violations: []string{`json: unknown field "events"`}},
		{name: "fractional counter", body: `{"counters":{"gitops_sync":1.5}}`, wantStatus: 400, violations: []string{`cannot unmarshal number 1.5`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := header("Content-Type", "application/json")
			if !tt.noJWT {
				h.Set(kasJWTHeader, f.kasJWT(t, nil))
			}
			got := f.do(t, request{method: http.MethodPost, path: PathUsageMetrics, header: h, body: tt.body})
			var wantBody string
			switch tt.wantStatus {
			case http.StatusUnauthorized:
				wantBody = jwtInvalid
			case http.StatusBadRequest:
				var m struct{ Message string }
				if err := json.Unmarshal(got.body, &m); err != nil || !strings.HasPrefix(m.Message, "400 Bad request - ") {
					t.Errorf(`body %s, want {"message": "400 Bad request - ..."}`, got.body)
				}
				wantBody = string(got.body)
			}
			f.expect(t, got, tt.wantStatus, wantBody, tt.violations...)
		})
	}
	want := []UsageReport{
		{
			Counters: map[string]int64{
				"k8s_api_proxy_request": 3, "flux_git_push_notifications_total": 1,
				"k8s_api_proxy_requests_via_ci_access": 1, "k8s_api_proxy_requests_via_user_access": 1,
				"k8s_api_proxy_requests_via_pat_access": 1, "gitops_sync": 0,
			},
			UniqueCounters: map[string][]int64{
				"k8s_api_proxy_requests_unique_users_via_ci_access":    {1, 2},
				"k8s_api_proxy_requests_unique_agents_via_ci_access":   {5},
				"k8s_api_proxy_requests_unique_users_via_user_access":  {},
				"k8s_api_proxy_requests_unique_agents_via_user_access": {},
				"k8s_api_proxy_requests_unique_users_via_pat_access":   {},
				"k8s_api_proxy_requests_unique_agents_via_pat_access":  {},
				"flux_git_push_notified_unique_projects":               {7},
				"agent_users_using_ci_tunnel":                          {1},
			},
		},
		{Counters: map[string]int64{"k8s_api_proxy_request": 2}},
	}
	if got := f.UsageReports(); !reflect.DeepEqual(got, want) {
		t.Errorf("UsageReports() = %+v, want %+v", got, want)
	}
	if got := f.Calls(PathUsageMetrics); got != 2 {
		t.Errorf("Calls(usage_metrics) = %d, want 2", got)
	}
	// The reports handed out are copies.
	f.UsageReports()[0].Counters["gitops_sync"] = 100
	if got := f.UsageReports()[0].Counters["gitops_sync"]; got != 0 {
		t.Errorf("changing a returned report changed the Server's: gitops_sync = %d", got)
	}
}

// TestUnknownPaths checks that a path GitLab does not serve to KAS, newer
// endpoints included, is answered 404 and reported.
func TestUnknownPaths(t *testing.T) {
	f := newFixture(t, false)
	for _, path := range []string{
		"/api/v4/internal/kubernetes/agent_events",
		"/api/v4/internal/agents/agentk/agent_info",
		"/api/v4/internal/kubernetes/agent_info/",
		"/",
	} {
		t.Run(path, func(t *testing.T) {
			h := header(kasJWTHeader, f.kasJWT(t, nil))
			got := f.do(t, request{method: http.MethodGet, path: path, header: h})
			f.expect(t, got, http.StatusNotFound, `{"message":"404 Not Found"}`,
				`^fakegitlab: GET `+regexp.QuoteMeta(path)+`: KAS called a path GitLab Rails does not serve to it$`)
			if got := f.Calls(path); got != 0 {
				t.Errorf("Calls(%s) = %d, want 0", path, got)
			}
		})
	}
}

// TestSetFailure checks that an injected failure answers requests that
// meet the contract, which are still counted, while a violation is still
// answered and reported as such; and that 0 resets it.
func TestSetFailure(t *testing.T) {
	f := newFixture(t, false)
	f.AddAgent(Agent{ID: 7, ProjectID: 3, Name: "my-agent", Token: "agent-token", ProjectPath: "group/agents"})
	agentInfo := func(t *testing.T, withJWT bool) response {
		h := header("Authorization", "Bearer agent-token")
		if withJWT {
			h.Set(kasJWTHeader, f.kasJWT(t, nil))
		}
		return f.do(t, request{method: http.MethodGet, path: PathAgentInfo, header: h})
	}

	f.SetFailure(PathAgentInfo, http.StatusInternalServerError)
	f.expect(t, agentInfo(t, true), 500, `{"message":"500 Internal Server Error"}`)
	f.expect(t, agentInfo(t, false), 401, jwtInvalid, `no Gitlab-Kas-Api-Request header`)
	f.SetFailure(PathAgentInfo, http.StatusServiceUnavailable)
	f.expect(t, agentInfo(t, true), 503, `{"message":"503 Service Unavailable"}`)
	f.SetFailure(PathAgentInfo, 0)
	f.expect(t, agentInfo(t, true), 200, agentInfoAnswer)
	if got := f.Calls(PathAgentInfo); got != 3 {
		t.Errorf("Calls(agent_info) = %d, want 3", got)
	}

	// Other endpoints are not affected, and a failing usage_metrics keeps
	// no report.
	f.SetFailure(PathUsageMetrics, http.StatusInternalServerError)
	h := header(kasJWTHeader, f.kasJWT(t, nil), "Content-Type", "application/json")
	f.expect(t, f.do(t, request{method: http.MethodPost, path: PathUsageMetrics, header: h, body: `{"counters":{"gitops_sync":1}}`}),
		500, `{"message":"500 Internal Server Error"}`)
	if got := f.UsageReports(); len(got) != 0 {
		t.Errorf("UsageReports() = %+v after a failed call, want none", got)
	}
	f.expect(t, agentInfo(t, true), 200, agentInfoAnswer)
}

// TestStartTLS checks the HTTPS Server: CAFile holds the CA a client needs
// to reach it, as KAS does with "the CA for GitLab".
func TestStartTLS(t *testing.T) {
	f := newFixture(t, true)
	f.AddAgent(Agent{ID: 7, ProjectID: 3, Name: "my-agent", Token: "agent-token", ProjectPath: "group/agents"})
	if !strings.HasPrefix(f.URL, "https://127.0.0.1:") {
		t.Errorf("URL %q, want https://127.0.0.1:PORT", f.URL)
	}
	caPEM, err := os.ReadFile(f.CAFile())
	if err != nil {
		t.Fatalf("read CAFile: %v", err)
	}
	if !bytes.Equal(caPEM, f.CAPEM()) {
		t.Errorf("CAFile and CAPEM differ")
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatalf("CAFile holds no PEM certificate: %q", caPEM)
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	t.Cleanup(client.CloseIdleConnections)

	r, err := http.NewRequest(http.MethodGet, f.URL+PathAgentInfo, nil)
	if err != nil {
		t.Fatal(err)
	}
	r.Header.Set("Authorization", "Bearer agent-token")
	r.Header.Set(kasJWTHeader, f.kasJWT(t, nil))
	resp, err := client.Do(r)
	if err != nil {
		t.Fatalf("agent_info over TLS with the CA of CAFile: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	f.expect(t, response{status: resp.StatusCode, header: resp.Header, body: body}, 200, agentInfoAnswer)

	// Without the CA the certificate is not trusted.
	if resp, err := (&http.Client{Transport: &http.Transport{}}).Get(f.URL + PathAgentInfo); err == nil {
		resp.Body.Close()
		t.Errorf("a client without the CA reached the Server")
	}

	if plain := newFixture(t, false); plain.CAFile() != "" || plain.CAPEM() != nil {
		t.Errorf("a plain HTTP Server has CAFile %q", plain.CAFile())
	}
}

// TestNewSecret checks the secret and its file as Omnibus writes them:
// 32 hex digits, strictly base64 encoded with no newline.
func TestNewSecret(t *testing.T) {
	secret, file := NewSecret(t)
	if len(secret) != SecretSize {
		t.Errorf("secret is %d bytes, want %d", len(secret), SecretSize)
	}
	if !regexp.MustCompile(`^[0-9a-f]{32}$`).Match(secret) {
		t.Errorf("secret %q is not 32 hex digits", secret)
	}
	content, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	decoded, err := base64.StdEncoding.Strict().DecodeString(string(content))
	if err != nil {
		t.Fatalf("the secret file is not strict base64: %v", err)
	}
	if !bytes.Equal(decoded, secret) {
		t.Errorf("the secret file decodes to %q, want %q", decoded, secret)
	}
	if other, _ := NewSecret(t); bytes.Equal(other, secret) {
		t.Errorf("two secrets are equal")
	}
}

// fakeTB is a testing.TB whose Errorf is recorded rather than failing the
// test; everything else goes to the real test.
type fakeTB struct {
	testing.TB
	mu     sync.Mutex // guards errors
	errors []string
}

func (tb *fakeTB) Errorf(format string, args ...any) {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	tb.errors = append(tb.errors, fmt.Sprintf(format, args...))
}

func (tb *fakeTB) taken() []string {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	out := tb.errors
	tb.errors = nil
	return out
}

// TestViolationsFailTheTest checks the path a Server takes outside this
// package's tests: a violation goes to the test's Errorf while the test
// runs, and once its Cleanup began to the standard error only.
func TestViolationsFailTheTest(t *testing.T) {
	tb := &fakeTB{TB: t}
	secret, _ := NewSecret(t)
	s := Start(tb, Options{Secret: secret})
	resp, err := s.Client().Get(s.URL + PathUsageMetrics)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("status %d, want 405", resp.StatusCode)
	}
	if got := tb.taken(); len(got) != 1 || !strings.Contains(got[0], "wrong method: the endpoint takes POST") {
		t.Errorf("Errorf calls %q, want one about the method", got)
	}

	var late bytes.Buffer
	s.lateOutput = &late
	s.shutdown()
	r, _ := http.NewRequest(http.MethodGet, "/late", nil)
	s.violation(r, "a late violation")
	if got := tb.taken(); len(got) != 0 {
		t.Errorf("Errorf called after the Server was shut down: %q", got)
	}
	if !strings.Contains(late.String(), "GET /late: a late violation (after the test ended)") {
		t.Errorf("late output %q", late.String())
	}
}

// TestConcurrentCalls drives every endpoint from many goroutines at once,
// for the race detector and the counts.
func TestConcurrentCalls(t *testing.T) {
	f := newFixture(t, false)
	f.world(t)
	f.AddAgent(Agent{ID: 7, ProjectID: 3, Name: "my-agent", Token: "agent-token"})
	f.AddJob(Job{Token: "job-token", JobID: 1, PipelineID: 1, ProjectID: 3, Username: "root"})
	const workers, rounds = 8, 10
	jwtHeader := f.kasJWT(t, nil) // valid for 30 s, long enough
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range rounds {
				calls := []struct {
					req  request
					want int
				}{
					{request{method: "GET", path: PathAgentInfo, header: header(kasJWTHeader, jwtHeader, "Authorization", "Bearer agent-token")}, 200},
					{request{method: "GET", path: PathAllowedAgents, header: header("Job-Token", "job-token")}, 200},
					{request{method: "POST", path: PathAuthorizeProxyUser, header: header(kasJWTHeader, jwtHeader, "Content-Type", "application/json"),
						body: `{"agent_id":5,"access_type":"personal_access_token","access_key":"glpat-1"}`}, 200},
					{request{method: "POST", path: PathAgentConfiguration, header: header(kasJWTHeader, jwtHeader, "Content-Type", "application/json"),
						body: `{"agent_id":9,"agent_config":{"ci_access":{"groups":[{"id":"platform"}]},"user_access":{"projects":[{"id":"platform/deployments"}]}}}`}, 204},
					{request{method: "POST", path: PathUsageMetrics, header: header(kasJWTHeader, jwtHeader, "Content-Type", "application/json"),
						body: fmt.Sprintf(`{"counters":{"gitops_sync":%d}}`, w*rounds+i)}, 204},
				}
				for _, c := range calls {
					got, err := f.send(c.req)
					switch {
					case err != nil:
						t.Error(err)
					case got.status != c.want:
						t.Errorf("%s %s: status %d, want %d (%s)", c.req.method, c.req.path, got.status, c.want, got.body)
					}
				}
				if i == rounds/2 {
					f.SetFailure(PathAgentInfo, 0) // a concurrent writer
				}
			}
		})
	}
	wg.Wait()
	for _, path := range []string{PathAgentInfo, PathAllowedAgents, PathAuthorizeProxyUser, PathUsageMetrics, PathAgentConfiguration} {
		want := workers * rounds
		if path == PathAgentConfiguration {
			want += 2 // world's
		}
		if got := f.Calls(path); got != want {
			t.Errorf("Calls(%s) = %d, want %d", path, got, want)
		}
	}
	seen := make(map[int64]bool)
	for _, r := range f.UsageReports() {
		seen[r.Counters["gitops_sync"]] = true
	}
	if len(seen) != workers*rounds {
		t.Errorf("%d distinct usage reports, want %d", len(seen), workers*rounds)
	}
	if v := f.violations.take(); len(v) != 0 {
		t.Errorf("violations: %q", v)
	}
}

func TestServePages(t *testing.T) {
	f := newFixture(t, false)
	f.AddUser(User{ID: 1235, Username: "web-user"})
	f.AddSession("web-user", "cookie 1", "csrf-1")
	f.AddSession("web-user", "cookie-expired", "csrf-x")
	f.ExpireSession("cookie-expired")
	files := fstest.MapFS{
		"index.html": {Data: []byte(`<meta name="csrf-token" content="{{.CSRFToken}}"><meta name="k8s-proxy-url" content="{{.K8sProxyURL}}">`)},
		"bundle.js":  {Data: []byte(`console.log("<not a template>")`)},
	}
	get := func(t *testing.T, name, session string) (*http.Response, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, f.URL+PathPages+name, nil)
		if session != "" {
			req.AddCookie(&http.Cookie{Name: SessionCookie, Value: url.QueryEscape(session)})
		}
		resp, err := f.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp, string(body)
	}

	tests := []struct {
		name, proxyURL       string
		wantDomain, wantPath string
	}{
		{"split: KAS on a subdomain", "https://kas.gitlab.example.com/k8s-proxy/", "gitlab.example.com", "/k8s-proxy/"},
		{"same host", "https://gitlab.example.com/-/kubernetes-agent/k8s-proxy/", "", "/-/kubernetes-agent/k8s-proxy/"},
		{"another domain", "https://kas.example.net/", "", "/"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f.ServePages(Pages{Files: files, ExternalURL: "https://gitlab.example.com", K8sProxyURL: tt.proxyURL})
			resp, body := get(t, "index.html", "cookie 1")
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("index.html: %s %s", resp.Status, body)
			}
			want := `<meta name="csrf-token" content="csrf-1"><meta name="k8s-proxy-url" content="` + tt.proxyURL + `">`
			if body != want {
				t.Errorf("index.html:\n got %s\nwant %s", body, want)
			}
			cookies := resp.Cookies()
			if len(cookies) != 1 {
				t.Fatalf("Set-Cookie: %q, want one cookie", resp.Header.Values("Set-Cookie"))
			}
			c := cookies[0]
			if c.Name != KASCookie || c.Value != url.QueryEscape("cookie 1") || c.Domain != tt.wantDomain || c.Path != tt.wantPath ||
				!c.HttpOnly || !c.Secure || c.SameSite != http.SameSiteLaxMode || time.Until(c.Expires) < 23*time.Hour {
				t.Errorf("Set-Cookie %q: want _gitlab_kas, domain %q, path %q, HttpOnly, Secure, SameSite=Lax, a day", resp.Header.Get("Set-Cookie"), tt.wantDomain, tt.wantPath)
			}
		})
	}

	t.Run("assets as they are", func(t *testing.T) {
		resp, body := get(t, "bundle.js", "")
		if resp.StatusCode != http.StatusOK || body != `console.log("<not a template>")` || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/javascript") {
			t.Errorf("bundle.js: %s %q %q", resp.Status, resp.Header.Get("Content-Type"), body)
		}
	})
	for name, session := range map[string]string{"no session": "", "unknown session": "cookie-2", "expired session": "cookie-expired"} {
		t.Run(name, func(t *testing.T) {
			if resp, _ := get(t, "index.html", session); resp.StatusCode != http.StatusUnauthorized || len(resp.Cookies()) != 0 {
				t.Errorf("%s: %s with cookies %q, want 401 and none", name, resp.Status, resp.Header.Values("Set-Cookie"))
			}
		})
	}
	t.Run("missing pages", func(t *testing.T) {
		for _, name := range []string{"", "nothing.html", "../server.go"} {
			if resp, _ := get(t, name, "cookie 1"); resp.StatusCode != http.StatusNotFound {
				t.Errorf("%q: %s, want 404", name, resp.Status)
			}
		}
	})
	if n := f.Calls(PathPages); n != 0 {
		t.Errorf("page requests counted as KAS calls: %d", n)
	}
}
