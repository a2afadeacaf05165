package agentadmin

import (
	"context"
	"encoding/json"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel/h2tunneltest"
	"github.com/caddy-kas/caddy-kas/tunnel/redisregistry"
)

const testNode = "kas-node-1"

// agentkMeta is what a test agentk says about itself.
func agentkMeta(podName string, podID, connectionID int64) tunnel.AgentMeta {
	return tunnel.AgentMeta{
		Version: "v17.0.0", CommitID: "abc123",
		PodNamespace: "gitlab-agent", PodName: podName, PodID: podID,
		ConnectionID:      connectionID,
		KubernetesVersion: "v1.32.1", KubernetesPlatform: "linux/amd64",
	}
}

// connect adds a real tunnel to store whose agent side serves h (nil: 404
// for everything).
func connect(t *testing.T, store *tunnel.Store, info tunnel.AgentInfo, h http.Handler) *h2tunneltest.Pair {
	t.Helper()
	if h == nil {
		h = http.NotFoundHandler()
	}
	p := h2tunneltest.NewPair(t, h, h2tunneltest.Options{Agent: info})
	t.Cleanup(store.Add(p.KAS))
	return p
}

// testStore holds agent 7 with two tunnels of one pod and a third of
// another, and agent 3 with one tunnel, connected in the order of their
// connection ids.
func testStore(t *testing.T) (*tunnel.Store, map[int64]*h2tunneltest.Pair) {
	t.Helper()
	store := tunnel.NewStore()
	t.Cleanup(func() { store.Close() })
	pairs := make(map[int64]*h2tunneltest.Pair)
	for _, c := range []struct {
		agentID      int64
		name         string
		pod          string
		podID        int64
		connectionID int64
	}{
		{7, "seven", "agentk-a", 100, 1001},
		{7, "seven", "agentk-a", 100, 1002},
		{3, "three", "agentk-x", 300, 3001},
		{7, "seven", "agentk-b", 200, 2001},
	} {
		pairs[c.connectionID] = connect(t, store, tunnel.AgentInfo{
			ID: c.agentID, Name: c.name, ProjectID: 42,
			Meta:       agentkMeta(c.pod, c.podID, c.connectionID),
			RemoteAddr: "192.0.2.1:4000",
		}, nil)
	}
	return store, pairs
}

func connectionIDs(a Agent) []int64 {
	var ids []int64
	for _, c := range a.Connections {
		ids = append(ids, c.ConnectionID)
	}
	return ids
}

func TestList(t *testing.T) {
	store, pairs := testStore(t)
	l := List(store, testNode)
	if l.Node != testNode {
		t.Errorf("node = %q, want %q", l.Node, testNode)
	}
	var ids []int64
	for _, a := range l.Agents {
		ids = append(ids, a.ID)
	}
	if !slices.Equal(ids, []int64{3, 7}) {
		t.Fatalf("agents %v, want [3 7] (sorted by id)", ids)
	}
	seven := l.Agents[1]
	if seven.Name != "seven" || seven.ProjectID != 42 {
		t.Errorf("agent 7 is %q of project %d, want %q of project 42", seven.Name, seven.ProjectID, "seven")
	}
	if got, want := connectionIDs(seven), []int64{1001, 1002, 2001}; !slices.Equal(got, want) {
		t.Errorf("agent 7's connections %v, want %v (in connection order)", got, want)
	}
	got := seven.Connections[2]
	want := Connection{
		Node: testNode, ConnectionID: 2001,
		Pod:           Pod{Namespace: "gitlab-agent", Name: "agentk-b", ID: 200},
		AgentkVersion: "v17.0.0", AgentkCommit: "abc123",
		KubernetesVersion: "v1.32.1", KubernetesPlatform: "linux/amd64",
		RemoteAddr:  "192.0.2.1:4000",
		ConnectedAt: pairs[2001].KAS.ConnectedAt().UTC(),
	}
	if got != want {
		t.Errorf("connection 2001:\n got %+v\nwant %+v", got, want)
	}
}

// TestListJSON pins the names of the JSON fields: they are the API.
func TestListJSON(t *testing.T) {
	store := tunnel.NewStore()
	defer store.Close()
	p := connect(t, store, tunnel.AgentInfo{ID: 5, Name: "five", Meta: agentkMeta("agentk-5", 55, 555), RemoteAddr: "192.0.2.5:5"}, nil)
	body, err := json.Marshal(List(store, testNode))
	if err != nil {
		t.Fatal(err)
	}
	connectedAt, _ := p.KAS.ConnectedAt().UTC().MarshalJSON()
	want := `{"node":"kas-node-1","agents":[{"id":5,"name":"five","connections":[{"node":"kas-node-1","connection_id":555,` +
		`"pod":{"namespace":"gitlab-agent","name":"agentk-5","id":55},"agentk_version":"v17.0.0","agentk_commit":"abc123",` +
		`"kubernetes_version":"v1.32.1","kubernetes_platform":"linux/amd64","remote_addr":"192.0.2.5:5",` +
		`"connected_at":` + string(connectedAt) + `,"requests_in_flight":0}]}]}`
	if string(body) != want {
		t.Errorf("JSON\n got %s\nwant %s", body, want)
	}
}

func TestListEmpty(t *testing.T) {
	for _, tc := range []struct {
		name  string
		store *tunnel.Store
	}{
		{"no store", nil},
		{"empty store", tunnel.NewStore()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body, err := json.Marshal(List(tc.store, testNode))
			if err != nil {
				t.Fatal(err)
			}
			if want := `{"node":"kas-node-1","agents":[]}`; string(body) != want {
				t.Errorf("JSON %s, want %s", body, want)
			}
		})
	}
}

// TestRequestsInFlight: a request the cluster has not answered yet counts
// on its tunnel.
func TestRequestsInFlight(t *testing.T) {
	store := tunnel.NewStore()
	defer store.Close()
	entered, release := make(chan struct{}), make(chan struct{})
	p := connect(t, store, tunnel.AgentInfo{ID: 1, Meta: agentkMeta("agentk", 1, 11)}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		<-release
	}))
	answered := make(chan error, 1)
	go func() {
		resp, err := p.Get(context.Background(), "/slow")
		if err == nil {
			resp.Body.Close()
		}
		answered <- err
	}()
	h2tunneltest.WaitDone(t, entered, "request reaching the agent")
	a, ok := Get(store, testNode, 1)
	close(release)
	if err := <-answered; err != nil {
		t.Fatalf("request through the tunnel: %v", err)
	}
	if !ok {
		t.Fatal("agent 1 not found")
	}
	if got := a.Agent.Connections[0].RequestsInFlight; got != 1 {
		t.Errorf("requests in flight = %d while one request waits for the cluster, want 1", got)
	}
}

func TestGet(t *testing.T) {
	store, _ := testStore(t)
	for _, tc := range []struct {
		id      int64
		wantOK  bool
		wantIDs []int64
	}{
		{id: 7, wantOK: true, wantIDs: []int64{1001, 1002, 2001}},
		{id: 3, wantOK: true, wantIDs: []int64{3001}},
		{id: 4},
	} {
		a, ok := Get(store, testNode, tc.id)
		if ok != tc.wantOK {
			t.Errorf("Get(%d) found = %v, want %v", tc.id, ok, tc.wantOK)
			continue
		}
		if !ok {
			continue
		}
		if a.Node != testNode || a.Agent.ID != tc.id || !slices.Equal(connectionIDs(a.Agent), tc.wantIDs) {
			t.Errorf("Get(%d) = node %q, agent %d with connections %v; want node %q, agent %d with %v",
				tc.id, a.Node, a.Agent.ID, connectionIDs(a.Agent), testNode, tc.id, tc.wantIDs)
		}
	}
	if _, ok := Get(nil, testNode, 7); ok {
		t.Error("Get without a store found an agent")
	}
}

func TestDisconnect(t *testing.T) {
	store, pairs := testStore(t)
	d := Disconnect(store, testNode, 7)
	slices.Sort(d.ConnectionIDs)
	if d.Node != testNode || d.AgentID != 7 || d.Closed != 3 || !slices.Equal(d.ConnectionIDs, []int64{1001, 1002, 2001}) {
		t.Errorf("Disconnect(7) = %+v, want 3 closed: 1001, 1002, 2001 on %s", d, testNode)
	}
	for _, id := range []int64{1001, 1002, 2001} {
		h2tunneltest.WaitDone(t, pairs[id].KAS.Done(), "closed tunnel")
	}
	if err := pairs[3001].KAS.Err(); err != nil {
		t.Errorf("agent 3's tunnel was closed too: %v", err)
	}
	l := List(store, testNode)
	if len(l.Agents) != 1 || l.Agents[0].ID != 3 {
		t.Errorf("after disconnecting agent 7 the listing holds %+v, want agent 3 only", l.Agents)
	}

	again := Disconnect(store, testNode, 7)
	if again.Closed != 0 || again.ConnectionIDs == nil {
		t.Errorf("second Disconnect(7) = %+v, want none closed and an empty list", again)
	}
	if d := Disconnect(nil, testNode, 7); d.Closed != 0 {
		t.Errorf("Disconnect without a store closed %d", d.Closed)
	}
}

func TestListShared(t *testing.T) {
	at := time.Date(2026, 11, 26, 3, 0, 0, 0, time.UTC)
	conns := []redisregistry.Connection{
		{AgentID: 7, AgentName: "old-name", ProjectID: 3, Node: "grpc://10.0.0.2:8155", ConnectedAt: at,
			Meta: tunnel.AgentMeta{ConnectionID: 2, PodName: "agentk-b", PodNamespace: "gitlab-agent", Version: "v17.0.0"}},
		{AgentID: 7, AgentName: "prod", ProjectID: 3, Node: "grpc://10.0.0.1:8155", ConnectedAt: at.Add(time.Second),
			Meta: tunnel.AgentMeta{ConnectionID: 1, PodName: "agentk-a", PodNamespace: "gitlab-agent", Version: "v17.0.0"}},
		{AgentID: 2, AgentName: "dev", Node: "grpc://10.0.0.1:8155", ConnectedAt: at},
	}
	l := ListShared(conns, "node-c")
	if l.Node != "node-c" || len(l.Agents) != 2 || l.Agents[0].ID != 2 || l.Agents[1].ID != 7 {
		t.Fatalf("listing %+v", l)
	}
	a := l.Agents[1]
	if a.Name != "prod" || a.ProjectID != 3 || len(a.Connections) != 2 ||
		a.Connections[0].Node != "grpc://10.0.0.2:8155" || a.Connections[0].Pod.Name != "agentk-b" || a.Connections[1].Node != "grpc://10.0.0.1:8155" {
		t.Errorf("agent 7: %+v", a)
	}
	if empty := ListShared(nil, "node-c"); empty.Agents == nil || len(empty.Agents) != 0 {
		t.Errorf("empty listing %+v", empty)
	}
}
