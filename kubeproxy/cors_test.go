package kubeproxy

import (
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel/h2tunneltest"
)

const gitlabOrigin = "https://gitlab.example.com"

func TestCORS(t *testing.T) {
	store := tunnel.NewStore()
	agent := h2tunneltest.NewPair(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// A cluster with its own, wider CORS policy: it must not show.
		w.Header().Set("Access-Control-Allow-Origin", "*")
		w.Header().Set("Access-Control-Expose-Headers", "X-Secret")
		io.WriteString(w, "ok")
	}), h2tunneltest.Options{Agent: tunnel.AgentInfo{ID: 1}})
	t.Cleanup(store.Add(agent.KAS))
	auth, err := NewStaticAuthenticator([]User{{Name: "plain", Token: "plain-token", Agents: []int64{1}}})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(&Proxy{Prefix: prefix, Auth: auth, Router: tunnel.NewRouter(store), WaitForAgent: 200 * time.Millisecond, AllowedOrigin: gitlabOrigin})
	t.Cleanup(srv.Close)

	tests := []struct {
		name       string
		method     string
		header     http.Header
		wantStatus int
		wantHeader http.Header // exact values; a nil slice means absent
		wantBody   string      // checked when not empty; "-" means empty
	}{
		{
			name: "no origin", method: http.MethodGet,
			header:     http.Header{"Authorization": {"Bearer pat:1:plain-token"}},
			wantStatus: http.StatusOK,
			wantHeader: http.Header{"Access-Control-Allow-Origin": nil, "Access-Control-Expose-Headers": nil},
			wantBody:   "ok",
		},
		{
			name: "gitlab origin", method: http.MethodGet,
			header:     http.Header{"Authorization": {"Bearer pat:1:plain-token"}, "Origin": {gitlabOrigin}},
			wantStatus: http.StatusOK,
			wantHeader: http.Header{
				"Access-Control-Allow-Origin":      {gitlabOrigin},
				"Access-Control-Allow-Credentials": {"true"},
				"Vary":                             {"Origin"},
				"Access-Control-Expose-Headers":    nil,
			},
			wantBody: "ok",
		},
		{
			name: "other origin", method: http.MethodGet,
			header:     http.Header{"Authorization": {"Bearer pat:1:plain-token"}, "Origin": {"https://evil.example.com"}},
			wantStatus: http.StatusForbidden,
			wantHeader: http.Header{"Access-Control-Allow-Origin": nil},
			wantBody:   "-",
		},
		{
			name: "origin differing only in port", method: http.MethodGet,
			header:     http.Header{"Origin": {gitlabOrigin + ":8443"}},
			wantStatus: http.StatusForbidden,
			wantBody:   "-",
		},
		{
			name: "two origins", method: http.MethodGet,
			header:     http.Header{"Origin": {gitlabOrigin, gitlabOrigin}},
			wantStatus: http.StatusForbidden,
			wantBody:   "-",
		},
		{
			name: "preflight without credentials", method: http.MethodOptions,
			header: http.Header{"Origin": {gitlabOrigin}, "Access-Control-Request-Method": {"GET"},
				"Access-Control-Request-Headers": {"gitlab-agent-id, x-csrf-token"}},
			wantStatus: http.StatusOK,
			wantHeader: http.Header{
				"Access-Control-Allow-Origin":      {gitlabOrigin},
				"Access-Control-Allow-Credentials": {"true"},
				"Access-Control-Allow-Headers":     {"gitlab-agent-id, x-csrf-token"},
				"Access-Control-Allow-Methods":     {preflightMethods},
				"Access-Control-Max-Age":           {"86400"},
			},
			wantBody: "-",
		},
		{
			name: "preflight from another origin", method: http.MethodOptions,
			header:     http.Header{"Origin": {"https://evil.example.com"}, "Access-Control-Request-Method": {"GET"}},
			wantStatus: http.StatusForbidden,
			wantHeader: http.Header{"Access-Control-Allow-Methods": nil},
			wantBody:   "-",
		},
		{
			name: "gitlab origin without credentials", method: http.MethodGet,
			header:     http.Header{"Origin": {gitlabOrigin}},
			wantStatus: http.StatusUnauthorized,
			// The browser must be able to read the refusal.
			wantHeader: http.Header{"Access-Control-Allow-Origin": {gitlabOrigin}, "Gitlab-Unauthorized": {"true"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := http.NewRequest(tt.method, srv.URL+prefix+"api/v1/namespaces", nil)
			if err != nil {
				t.Fatal(err)
			}
			for k, vs := range tt.header {
				req.Header[k] = vs
			}
			resp, err := srv.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tt.wantStatus {
				t.Fatalf("status %d, want %d (body %q)", resp.StatusCode, tt.wantStatus, body)
			}
			for k, want := range tt.wantHeader {
				got := resp.Header.Values(k)
				if len(got) != len(want) || (len(want) > 0 && got[0] != want[0]) {
					t.Errorf("%s: %q, want %q", k, got, want)
				}
			}
			switch tt.wantBody {
			case "":
			case "-":
				if len(body) != 0 {
					t.Errorf("body %q, want none", body)
				}
			default:
				if string(body) != tt.wantBody {
					t.Errorf("body %q, want %q", body, tt.wantBody)
				}
			}
		})
	}
}
