package kasadmin

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/agentadmin"
	"github.com/caddy-kas/caddy-kas/caddymodule/kasapp"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel/h2tunneltest"
)

const testNode = "kas-node-1"

// serve sends one request to a's routes the way Caddy's admin endpoint
// does: the longest matching pattern of its mux, and an error returned by
// the handler becomes the status of the answer.
func serve(t *testing.T, a *Admin, method, path string) (*httptest.ResponseRecorder, error) {
	t.Helper()
	mux := http.NewServeMux()
	var handlerErr error
	for _, r := range a.Routes() {
		mux.Handle(r.Pattern, http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			handlerErr = r.Handler.ServeHTTP(w, req)
		}))
	}
	w := httptest.NewRecorder()
	mux.ServeHTTP(w, httptest.NewRequest(method, path, nil))
	return w, handlerErr
}

// newTestAdmin returns an Admin over a store with agent 7 (two tunnels) and
// agent 3 (one).
func newTestAdmin(t *testing.T) (*Admin, []*h2tunneltest.Pair) {
	t.Helper()
	store := tunnel.NewStore()
	t.Cleanup(func() { store.Close() })
	var pairs []*h2tunneltest.Pair
	for _, c := range []struct{ agentID, connectionID int64 }{{7, 71}, {7, 72}, {3, 31}} {
		p := h2tunneltest.NewPair(t, http.NotFoundHandler(), h2tunneltest.Options{Agent: tunnel.AgentInfo{
			ID: c.agentID, Name: "agent", Meta: tunnel.AgentMeta{Version: "v17.0.0", PodNamespace: "ns", PodName: "agentk", PodID: c.agentID, ConnectionID: c.connectionID},
		}})
		t.Cleanup(store.Add(p.KAS))
		pairs = append(pairs, p)
	}
	return &Admin{store: func() *tunnel.Store { return store }, node: testNode, logger: zap.NewNop()}, pairs
}

func TestRoutes(t *testing.T) {
	a, _ := newTestAdmin(t)
	for _, tc := range []struct {
		method, path string
		wantStatus   int
		wantAllow    string
		// check inspects a 200 answer
		check func(t *testing.T, body []byte)
	}{
		{method: "GET", path: "/kas/agents", wantStatus: 200, check: func(t *testing.T, body []byte) {
			var l agentadmin.Listing
			mustDecode(t, body, &l)
			var got []int64
			for _, a := range l.Agents {
				got = append(got, a.ID)
			}
			if l.Node != testNode || !slices.Equal(got, []int64{3, 7}) || len(l.Agents[1].Connections) != 2 {
				t.Errorf("listing %s, want agents 3 and 7 (with two connections) on %s", body, testNode)
			}
		}},
		{method: "GET", path: "/kas/agents/7", wantStatus: 200, check: func(t *testing.T, body []byte) {
			var a agentadmin.AgentAnswer
			mustDecode(t, body, &a)
			if a.Node != testNode || a.Agent.ID != 7 || len(a.Agent.Connections) != 2 {
				t.Errorf("agent 7: %s, want its two connections on %s", body, testNode)
			}
		}},
		{method: "GET", path: "/kas/agents/4", wantStatus: 404},
		{method: "GET", path: "/kas/agents/", wantStatus: 404},
		{method: "GET", path: "/kas/agents/0", wantStatus: 404},
		{method: "GET", path: "/kas/agents/-7", wantStatus: 404},
		{method: "GET", path: "/kas/agents/seven", wantStatus: 404},
		{method: "GET", path: "/kas/agents/7/", wantStatus: 404},
		{method: "GET", path: "/kas/agents/7/connections", wantStatus: 404},
		{method: "POST", path: "/kas/agents", wantStatus: 405, wantAllow: "GET"},
		{method: "DELETE", path: "/kas/agents/7", wantStatus: 405, wantAllow: "GET"},
		{method: "GET", path: "/kas/agents/7/disconnect", wantStatus: 405, wantAllow: "POST"},
		{method: "DELETE", path: "/kas/agents/7/disconnect", wantStatus: 405, wantAllow: "POST"},
	} {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			w, err := serve(t, a, tc.method, tc.path)
			status := http.StatusOK
			if err != nil {
				var apiErr caddy.APIError
				if !errors.As(err, &apiErr) {
					t.Fatalf("handler error %v is not a caddy.APIError", err)
				}
				status = apiErr.HTTPStatus
			}
			if status != tc.wantStatus {
				t.Fatalf("status %d (error %v), want %d", status, err, tc.wantStatus)
			}
			if got := w.Header().Get("Allow"); got != tc.wantAllow {
				t.Errorf("Allow: %q, want %q", got, tc.wantAllow)
			}
			if status != http.StatusOK {
				return
			}
			if ct := w.Header().Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q, want application/json", ct)
			}
			tc.check(t, w.Body.Bytes())
		})
	}
}

// TestGetNotConnected: the 404 for an agent without tunnels says so, for
// Caddy's error handler to send as {"error": ...}.
func TestGetNotConnected(t *testing.T) {
	a, _ := newTestAdmin(t)
	_, err := serve(t, a, "GET", "/kas/agents/4")
	var apiErr caddy.APIError
	if !errors.As(err, &apiErr) || !errors.Is(apiErr.Err, tunnel.ErrNoConnection) || !strings.Contains(err.Error(), "agent 4") {
		t.Errorf("error %v, want one naming agent 4 and wrapping tunnel.ErrNoConnection", err)
	}
}

func TestDisconnect(t *testing.T) {
	a, pairs := newTestAdmin(t)
	w, err := serve(t, a, "POST", "/kas/agents/7/disconnect")
	if err != nil {
		t.Fatal(err)
	}
	var d agentadmin.Disconnected
	mustDecode(t, w.Body.Bytes(), &d)
	slices.Sort(d.ConnectionIDs)
	if d.Node != testNode || d.AgentID != 7 || d.Closed != 2 || !slices.Equal(d.ConnectionIDs, []int64{71, 72}) {
		t.Errorf("answer %s, want agent 7's connections 71 and 72 closed on %s", w.Body, testNode)
	}
	h2tunneltest.WaitDone(t, pairs[0].KAS.Done(), "agent 7's first tunnel")
	h2tunneltest.WaitDone(t, pairs[1].KAS.Done(), "agent 7's second tunnel")
	if err := pairs[2].KAS.Err(); err != nil {
		t.Errorf("agent 3's tunnel was closed: %v", err)
	}
	if _, err := serve(t, a, "GET", "/kas/agents/7"); err == nil {
		t.Error("agent 7 is still listed after its tunnels were closed")
	}
}

// TestProvisionFollowsKasApp: a provisioned module finds the tunnels of the
// kas app, whichever was provisioned first, and none once no configuration
// holds the store.
func TestProvisionFollowsKasApp(t *testing.T) {
	var a Admin
	if err := a.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	if host, _ := os.Hostname(); a.node != host {
		t.Errorf("node %q, want the host name %q", a.node, host)
	}
	list := func() agentadmin.Listing {
		t.Helper()
		w, err := serve(t, &a, "GET", "/kas/agents")
		if err != nil {
			t.Fatal(err)
		}
		var l agentadmin.Listing
		mustDecode(t, w.Body.Bytes(), &l)
		return l
	}
	if l := list(); len(l.Agents) != 0 {
		t.Fatalf("agents %+v before any kas app", l.Agents)
	}

	var app kasapp.App
	if err := app.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	p := h2tunneltest.NewPair(t, http.NotFoundHandler(), h2tunneltest.Options{Agent: tunnel.AgentInfo{ID: 9}})
	defer app.Store().Add(p.KAS)()
	if l := list(); len(l.Agents) != 1 || l.Agents[0].ID != 9 {
		t.Errorf("agents %+v, want agent 9 of the kas app's store", l.Agents)
	}
	if err := app.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if l := list(); len(l.Agents) != 0 {
		t.Errorf("agents %+v after the last kas app was cleaned up", l.Agents)
	}
}

func mustDecode(t *testing.T, body []byte, v any) {
	t.Helper()
	if err := json.Unmarshal(body, v); err != nil {
		t.Fatalf("answer %s is not JSON: %v", body, err)
	}
}
