package kubeproxy

import (
	"errors"
	"github.com/caddy-kas/caddy-kas/identity"
	"net/http"
	"strings"
	"testing"
)

func TestParseCredential(t *testing.T) {
	tests := []struct {
		name    string
		headers []string
		want    Credential
		wantErr string // "" = ok, "none" = errNoAuthorization, else the Error reason
	}{
		{"pat", []string{"Bearer pat:5:glpat-abc"}, Credential{KindPAT, 5, "glpat-abc"}, ""},
		{"ci", []string{"Bearer ci:12:job-token"}, Credential{KindCIJob, 12, "job-token"}, ""},
		{"colons in token", []string{"Bearer pat:5:a:b:c"}, Credential{KindPAT, 5, "a:b:c"}, ""},
		{"lowercase scheme", []string{"bearer pat:5:x"}, Credential{KindPAT, 5, "x"}, ""},
		{"no header", nil, Credential{}, "none"},
		{"two headers", []string{"Bearer pat:5:x", "Bearer pat:5:y"}, Credential{}, "more than one Authorization header"},
		{"basic auth", []string{"Basic dXNlcjpwYXNz"}, Credential{}, "authorization is not a bearer token"},
		{"plain bearer", []string{"Bearer sometoken"}, Credential{}, "bearer token is not of the form <kind>:<agent id>:<token>"},
		{"unknown kind", []string{"Bearer oidc:5:x"}, Credential{}, "unknown token kind (want ci or pat)"},
		{"id not a number", []string{"Bearer pat:five:x"}, Credential{}, "agent id in bearer token is not a positive integer"},
		{"id negative", []string{"Bearer pat:-5:x"}, Credential{}, "agent id in bearer token is not a positive integer"},
		{"id with leading zero", []string{"Bearer pat:05:x"}, Credential{}, "agent id in bearer token is not a positive integer"},
		{"id with plus sign", []string{"Bearer pat:+5:x"}, Credential{}, "agent id in bearer token is not a positive integer"},
		{"empty token", []string{"Bearer pat:5:"}, Credential{}, "empty token"},
		{"short", []string{"Bear"}, Credential{}, "authorization is not a bearer token"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := http.Header{}
			for _, v := range tt.headers {
				h.Add("Authorization", v)
			}
			got, err := ParseCredential(h)
			switch tt.wantErr {
			case "":
				if err != nil || got != tt.want {
					t.Errorf("got %+v, %v; want %+v", got, err, tt.want)
				}
			case "none":
				if !errors.Is(err, errNoAuthorization) {
					t.Errorf("err = %v, want errNoAuthorization", err)
				}
			default:
				var e *Error
				if !errors.As(err, &e) || e.Code != http.StatusUnauthorized || e.Reason != tt.wantErr {
					t.Errorf("err = %v, want 401 with reason %q", err, tt.wantErr)
				}
			}
		})
	}
}

func TestStaticAuthenticator(t *testing.T) {
	alice := &identity.Identity{Username: "alice", Groups: []string{"dev"}}
	a, err := NewStaticAuthenticator([]User{
		{Name: "dev", Token: "dev-token", Agents: []int64{1}, Impersonate: alice},
		{Name: "ops", Token: "ops-token", Agents: []int64{1, 2}, AllowImpersonation: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name      string
		auth      string
		wantCode  int // 0 = allowed
		wantAgent int64
		wantUser  string
	}{
		{"dev on its agent", "Bearer pat:1:dev-token", 0, 1, "user dev"},
		{"ops on agent 2", "Bearer pat:2:ops-token", 0, 2, "user ops"},
		{"dev on another agent", "Bearer pat:2:dev-token", http.StatusForbidden, 2, ""},
		{"unknown token", "Bearer pat:1:guess", http.StatusUnauthorized, 1, ""},
		{"prefix of a token", "Bearer pat:1:dev-toke", http.StatusUnauthorized, 1, ""},
		{"ci token in standalone mode", "Bearer ci:1:dev-token", http.StatusUnauthorized, 1, ""},
		{"no credentials", "", http.StatusUnauthorized, 0, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, _ := http.NewRequest(http.MethodGet, "/api", nil)
			if tt.auth != "" {
				r.Header.Set("Authorization", tt.auth)
			}
			access, err := a.Authenticate(r)
			if tt.wantCode == 0 {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if access.AgentID != tt.wantAgent || access.Principal != tt.wantUser {
					t.Errorf("access = %+v", access)
				}
				return
			}
			var e *Error
			if !errors.As(err, &e) || e.Code != tt.wantCode || e.AgentID != tt.wantAgent {
				t.Fatalf("err = %v, want code %d for agent %d", err, tt.wantCode, tt.wantAgent)
			}
			if strings.Contains(e.Error(), "token\"") || strings.Contains(e.Error(), "dev-token") || strings.Contains(e.Error(), "guess") {
				t.Errorf("error text contains a token: %q", e.Error())
			}
		})
	}
	r, _ := http.NewRequest(http.MethodGet, "/api", nil)
	r.Header.Set("Authorization", "Bearer pat:1:dev-token")
	access, _ := a.Authenticate(r)
	if access.Identity != alice || access.AllowClientImpersonation {
		t.Errorf("dev access = %+v, want alice's identity and no client impersonation", access)
	}
}

func TestNewStaticAuthenticatorRejects(t *testing.T) {
	id := &identity.Identity{Username: "alice"}
	tests := []struct {
		name  string
		users []User
		want  string
	}{
		{"no name", []User{{Token: "t", Agents: []int64{1}}}, "user without a name"},
		{"empty token", []User{{Name: "a", Agents: []int64{1}}}, `user "a": empty token`},
		{"no agents", []User{{Name: "a", Token: "t"}}, `user "a": no agents listed`},
		{"duplicate name", []User{{Name: "a", Token: "t", Agents: []int64{1}}, {Name: "a", Token: "u", Agents: []int64{1}}}, `user "a": declared twice`},
		{"shared token", []User{{Name: "a", Token: "t", Agents: []int64{1}}, {Name: "b", Token: "t", Agents: []int64{1}}}, `user "b": same token as another user`},
		{"nested", []User{{Name: "a", Token: "t", Agents: []int64{1}, Impersonate: id, AllowImpersonation: true}}, "nested impersonation"},
		{"no username", []User{{Name: "a", Token: "t", Agents: []int64{1}, Impersonate: &identity.Identity{}}}, "impersonation without a username"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewStaticAuthenticator(tt.users)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %v, want it to mention %q", err, tt.want)
			}
		})
	}
}
