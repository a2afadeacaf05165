package kubernetesagent

import (
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/agentserver"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
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
			input: `kubernetes_agent /agents/ {
				keepalive_interval 30s
				keepalive_timeout 10s
				connections_per_token_per_minute 600
				agent 1 prod {
					token_file /etc/kas/prod.token
				}
				agent 2 staging {
					token {env.STAGING_TOKEN}
				}
			}`,
			want: Handler{
				Path:                         "/agents/",
				KeepaliveInterval:            caddy.Duration(30 * time.Second),
				KeepaliveTimeout:             caddy.Duration(10 * time.Second),
				ConnectionsPerTokenPerMinute: 600,
				Agents: []Agent{
					{ID: 1, Name: "prod", TokenFile: "/etc/kas/prod.token", Location: "Testfile:5"},
					{ID: 2, Name: "staging", Token: "{env.STAGING_TOKEN}", Location: "Testfile:8"},
				},
			},
		},
		{name: "token and token_file", input: "kubernetes_agent {\nagent 1 a {\ntoken_file /f\ntoken x\n}\n}", wantErr: "give either token or token_file, not both, at Testfile:4"},
		{name: "no token", input: "kubernetes_agent {\nagent 1 a\n}", wantErr: "agent 1 (a) needs a token or token_file, at Testfile:2"},
		{name: "path subdirective", input: "kubernetes_agent {\npath /x/\n}", want: Handler{Path: "/x/"}},
		{name: "bad id", input: "kubernetes_agent {\nagent one x {\n}\n}", wantErr: `agent id "one" is not a positive integer`},
		{name: "zero id", input: "kubernetes_agent {\nagent 0 x\n}", wantErr: "not a positive integer"},
		{name: "no name", input: "kubernetes_agent {\nagent 1\n}", wantErr: "agent needs an id and a name"},
		{name: "unknown", input: "kubernetes_agent {\nfoo\n}", wantErr: `unrecognized subdirective "foo"`},
		{name: "unknown in agent", input: "kubernetes_agent {\nagent 1 a {\ntokn x\n}\n}", wantErr: `unrecognized agent subdirective "tokn"`},
		{name: "bad duration", input: "kubernetes_agent {\nkeepalive_interval soon\n}", wantErr: "keepalive_interval"},
		{name: "two paths", input: "kubernetes_agent /a/ /b/", wantErr: "wrong argument count"},
		{name: "connection limit zero is the default", input: "kubernetes_agent {\nconnections_per_token_per_minute 0\n}", want: Handler{}},
		{name: "connection limit negative", input: "kubernetes_agent {\nconnections_per_token_per_minute -1\n}", wantErr: `"-1" is not a whole number`},
		{name: "connection limit not a number", input: "kubernetes_agent {\nconnections_per_token_per_minute lots\n}", wantErr: `"lots" is not a whole number`},
		{name: "connection limit missing", input: "kubernetes_agent {\nconnections_per_token_per_minute\n}", wantErr: "wrong argument count"},
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

func provision(t *testing.T, h *Handler) error {
	t.Helper()
	if err := h.setup(tunnel.NewStore(), nil, new(agentserver.MemoryConnectionCounter), nil, zap.NewNop()); err != nil {
		return err
	}
	return h.Validate()
}

func TestProvision(t *testing.T) {
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "agent.token")
	os.WriteFile(tokenFile, []byte("secret-one\n"), 0o600)
	t.Setenv("KAS_TEST_AGENT2", "secret-two")
	tests := []struct {
		name    string
		h       Handler
		wantErr string
	}{
		{"ok", Handler{Agents: []Agent{{ID: 1, Name: "a", TokenFile: tokenFile}, {ID: 2, Name: "b", Token: "{env.KAS_TEST_AGENT2}"}}}, ""},
		{"no agents", Handler{}, "no agents declared"},
		{"missing file", Handler{Agents: []Agent{{ID: 1, Name: "a", TokenFile: filepath.Join(dir, "nope")}}}, "agent 1 (a): reading token file"},
		{"missing file, with its place in the Caddyfile", Handler{Agents: []Agent{{ID: 1, Name: "a", TokenFile: filepath.Join(dir, "nope"), Location: "Caddyfile:7"}}}, "no such file or directory, at Caddyfile:7"},
		{"unset env", Handler{Agents: []Agent{{ID: 1, Name: "a", Token: "{env.KAS_TEST_UNSET}"}}}, "agent 1 (a): token {env.KAS_TEST_UNSET} is empty"},
		{"shared token", Handler{Agents: []Agent{{ID: 1, Name: "a", Token: "x"}, {ID: 2, Name: "b", Token: "x"}}}, "agent 2: same token as another agent"},
		{"relative path", Handler{Path: "agents/", Agents: []Agent{{ID: 1, Name: "a", Token: "x"}}}, "must start with /"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := provision(t, &tt.h)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				if tt.h.Path != DefaultPath {
					t.Errorf("path %q, want the default", tt.h.Path)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("err = %v, want %q", err, tt.wantErr)
			}
			if err != nil && strings.Contains(err.Error(), "secret-") {
				t.Errorf("error reveals a token: %v", err)
			}
		})
	}
}

func TestServeHTTPPassesOtherPaths(t *testing.T) {
	h := &Handler{Agents: []Agent{{ID: 1, Name: "a", Token: "x"}}}
	if err := provision(t, h); err != nil {
		t.Fatal(err)
	}
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		w.WriteHeader(http.StatusTeapot)
		return nil
	})
	tests := []struct {
		path string
		want int
	}{
		{"/-/kubernetes-agent/", http.StatusBadRequest}, // ours: not a WebSocket
		{"/-/kubernetes-agent", http.StatusBadRequest},
		{"/-/kubernetes-agent/k8s-proxy/api", http.StatusTeapot},
		{"/", http.StatusTeapot},
		{"/-/kubernetes-agentx", http.StatusTeapot},
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

// TestConnectionLimitApplied: the handler's endpoint counts the
// connections of a valid token against connections_per_token_per_minute.
// A handshake counts once its token is valid, before its metadata is
// read, so handshakes with malformed metadata (400, no hijacking needed)
// show the count.
func TestConnectionLimitApplied(t *testing.T) {
	h := &Handler{Agents: []Agent{{ID: 1, Name: "a", Token: "agent-token"}}, ConnectionsPerTokenPerMinute: 2}
	if err := provision(t, h); err != nil {
		t.Fatal(err)
	}
	var codes []int
	for range 3 {
		r := httptest.NewRequest(http.MethodGet, DefaultPath, nil)
		r.Header = http.Header{
			"Connection": {"Upgrade"}, "Upgrade": {"websocket"}, "Sec-Websocket-Version": {"13"},
			"Sec-Websocket-Key": {"dGhlIHNhbXBsZSBub25jZQ=="}, "Sec-Websocket-Protocol": {h2tunnel.Subprotocol},
			"Authorization": {"Bearer agent-token"}, h2tunnel.HeaderPodID: {"not a number"},
		}
		rec := httptest.NewRecorder()
		if err := h.ServeHTTP(rec, r, nil); err != nil {
			t.Fatal(err)
		}
		codes = append(codes, rec.Code)
	}
	if want := []int{http.StatusBadRequest, http.StatusBadRequest, http.StatusTooManyRequests}; !reflect.DeepEqual(codes, want) {
		t.Errorf("answers %v, want %v", codes, want)
	}
}
