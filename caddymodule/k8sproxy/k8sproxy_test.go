package k8sproxy

import (
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/tunnel"
)

func TestUnmarshalCaddyfile(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		want    Handler
		wantErr string
	}{
		{
			name: "full",
			input: `k8s_proxy /k8s/ {
				wait_for_agent 5s
				reconnect_window 2m
				user dev {
					token_file /etc/kas/dev.token
					agents 1 2
					impersonate alice dev viewers
					impersonate_uid 1001
					impersonate_extra team platform sre
				}
				user ops {
					token {env.OPS_TOKEN}
					agents 3
					allow_impersonation
				}
			}`,
			want: Handler{
				PathPrefix:      "/k8s/",
				WaitForAgent:    caddy.Duration(5 * time.Second),
				ReconnectWindow: caddy.Duration(2 * time.Minute),
				Users: []User{
					{Name: "dev", TokenFile: "/etc/kas/dev.token", Agents: []int64{1, 2}, Impersonate: &identity.Identity{
						Username: "alice", UID: "1001", Groups: []string{"dev", "viewers"},
						Extra: map[string][]string{"team": {"platform", "sre"}},
					}, Location: "Testfile:4"},
					{Name: "ops", Token: "{env.OPS_TOKEN}", Agents: []int64{3}, AllowImpersonation: true, Location: "Testfile:11"},
				},
			},
		},
		{
			name:  "extra_allowed_response_headers, repeated",
			input: "k8s_proxy {\nextra_allowed_response_headers X-Custom x-other\nextra_allowed_response_headers Set-Cookie\n}",
			want:  Handler{ExtraAllowedResponseHeaders: []string{"X-Custom", "x-other", "Set-Cookie"}},
		},
		{name: "extra_allowed_response_headers without names", input: "k8s_proxy {\nextra_allowed_response_headers\n}", wantErr: "wrong argument count"},
		{name: "reconnect_window negative", input: "k8s_proxy {\nreconnect_window -1s\n}", want: Handler{ReconnectWindow: caddy.Duration(-time.Second)}},
		{name: "reconnect_window not a duration", input: "k8s_proxy {\nreconnect_window soon\n}", wantErr: "reconnect_window: "},
		{name: "token and token_file", input: "k8s_proxy {\nuser a {\ntoken x\ntoken_file /f\n}\n}", wantErr: "give either token or token_file, not both, at Testfile:4"},
		{name: "no token", input: "k8s_proxy {\nuser a {\nagents 1\n}\n}", wantErr: `user "a" needs a token or token_file, at Testfile:2`},
		{name: "path_prefix subdirective", input: "k8s_proxy {\npath_prefix /p/\n}", want: Handler{PathPrefix: "/p/"}},
		{name: "bad agent id", input: "k8s_proxy {\nuser a {\nagents 1 x\n}\n}", wantErr: `agent id "x" is not a positive integer`},
		{name: "no agents args", input: "k8s_proxy {\nuser a {\nagents\n}\n}", wantErr: "wrong argument count"},
		{name: "impersonate without user", input: "k8s_proxy {\nuser a {\nimpersonate\n}\n}", wantErr: "impersonate needs a username"},
		{name: "extra without value", input: "k8s_proxy {\nuser a {\nimpersonate_extra k\n}\n}", wantErr: "needs a key and at least one value"},
		{name: "user without name", input: "k8s_proxy {\nuser {\n}\n}", wantErr: "user needs a name"},
		{name: "unknown", input: "k8s_proxy {\nusers\n}", wantErr: `unrecognized subdirective "users"`},
		{name: "unknown in user", input: "k8s_proxy {\nuser a {\nagent 1\n}\n}", wantErr: `unrecognized user subdirective "agent"`},
		{name: "allow_impersonation takes no args", input: "k8s_proxy {\nuser a {\nallow_impersonation yes\n}\n}", wantErr: "wrong argument count"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(h, tt.want) {
				t.Errorf("got  %+v\nwant %+v", h, tt.want)
			}
		})
	}
}

func setup(h *Handler) error {
	if err := h.setup(tunnel.NewRouter(tunnel.NewStore()), nil, zap.NewNop()); err != nil {
		return err
	}
	return h.Validate()
}

func TestSetup(t *testing.T) {
	tests := []struct {
		name    string
		h       Handler
		wantErr string
	}{
		{"ok", Handler{Users: []User{{Name: "a", Token: "t", Agents: []int64{1}}}}, ""},
		{"no users", Handler{}, "no users declared"},
		{"no token", Handler{Users: []User{{Name: "a", Agents: []int64{1}}}}, `user "a": no token configured`},
		{"missing token file, with its place in the Caddyfile", Handler{Users: []User{{Name: "a", TokenFile: "/nonexistent/token", Agents: []int64{1}, Location: "Caddyfile:9"}}},
			`user "a": reading token file: open /nonexistent/token: no such file or directory, at Caddyfile:9`},
		{"nested", Handler{Users: []User{{Name: "a", Token: "t", Agents: []int64{1}, Impersonate: &identity.Identity{Username: "x"}, AllowImpersonation: true}}}, "nested impersonation"},
		{"uid without username", Handler{Users: []User{{Name: "a", Token: "t", Agents: []int64{1}, Impersonate: &identity.Identity{UID: "1"}}}}, "impersonation without a username"},
		{"extra allowed header", Handler{ExtraAllowedResponseHeaders: []string{"X-Custom"}, Users: []User{{Name: "a", Token: "t", Agents: []int64{1}}}}, ""},
		{"extra allowed KAS header", Handler{ExtraAllowedResponseHeaders: []string{"X-Custom", "gitlab-unauthorized"}, Users: []User{{Name: "a", Token: "t", Agents: []int64{1}}}}, "extra_allowed_response_headers: gitlab-unauthorized cannot be allowed"},
		{"extra allowed bad name", Handler{ExtraAllowedResponseHeaders: []string{"X Custom"}, Users: []User{{Name: "a", Token: "t", Agents: []int64{1}}}}, `"X Custom" is not a valid header name`},
		{"negative wait", Handler{WaitForAgent: -1, Users: []User{{Name: "a", Token: "t", Agents: []int64{1}}}}, "must not be negative"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := setup(&tt.h)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				if tt.h.PathPrefix != DefaultPathPrefix || time.Duration(tt.h.WaitForAgent) != 20*time.Second {
					t.Errorf("defaults not applied: %+v", tt.h)
				}
				if !reflect.DeepEqual(tt.h.proxy.ExtraAllowedResponseHeaders, tt.h.ExtraAllowedResponseHeaders) {
					t.Errorf("the proxy allows %q, want %q", tt.h.proxy.ExtraAllowedResponseHeaders, tt.h.ExtraAllowedResponseHeaders)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("err = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

func TestServeHTTPPassesOtherPaths(t *testing.T) {
	h := &Handler{PathPrefix: "/k8s", Users: []User{{Name: "a", Token: "t", Agents: []int64{1}}}}
	if err := setup(h); err != nil {
		t.Fatal(err)
	}
	if h.PathPrefix != "/k8s/" {
		t.Errorf("prefix %q, want a trailing slash added", h.PathPrefix)
	}
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		w.WriteHeader(http.StatusTeapot)
		return nil
	})
	tests := []struct {
		path string
		want int
	}{
		{"/k8s/api", http.StatusUnauthorized}, // ours: no credentials
		{"/k8s", http.StatusUnauthorized},
		{"/k8sx/api", http.StatusTeapot},
		{"/", http.StatusTeapot},
	}
	for _, tt := range tests {
		rec := httptest.NewRecorder()
		if err := h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, tt.path, nil), next); err != nil {
			t.Fatal(err)
		}
		if rec.Code != tt.want {
			t.Errorf("%s: status %d, want %d", tt.path, rec.Code, tt.want)
		}
	}
}
