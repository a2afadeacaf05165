package railsapi

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/caddy-kas/caddy-kas/railsapi/pb/agenttracker"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/agenttrackerrpc"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel/h2tunneltest"
)

// conn starts a real tunnel of the agent described by info.
func conn(t *testing.T, info tunnel.AgentInfo) tunnel.Tunnel {
	t.Helper()
	return h2tunneltest.NewPair(t, http.NotFoundHandler(), h2tunneltest.Options{Agent: info}).KAS
}

func agentInfo(agentID, projectID, podID int64, podName, version, k8s string) tunnel.AgentInfo {
	return tunnel.AgentInfo{
		ID:        agentID,
		Name:      fmt.Sprintf("agent-%d", agentID),
		ProjectID: projectID,
		Meta: tunnel.AgentMeta{
			Version:           version,
			CommitID:          "c0ffee" + version,
			PodNamespace:      "gitlab-agent",
			PodName:           podName,
			PodID:             podID,
			ConnectionID:      podID*10 + 1,
			KubernetesVersion: k8s,
		},
	}
}

// fleet is a set of tunnels of several agents and pods, made one after the
// other, so that each connects later than the one before.
type fleet struct {
	conns fakeConns
	// first is the first tunnel of each pod, by pod name.
	first map[string]tunnel.Tunnel
}

func newFleet(t *testing.T) *fleet {
	f := &fleet{first: make(map[string]tunnel.Tunnel)}
	add := func(info tunnel.AgentInfo) tunnel.Tunnel {
		c := conn(t, info)
		f.conns = append(f.conns, c)
		if _, ok := f.first[info.Meta.PodName]; !ok {
			f.first[info.Meta.PodName] = c
		}
		return c
	}
	// Agent 1 (project 10) runs two pods; pod a has two tunnels.
	add(agentInfo(1, 10, 100, "agentk-a", "v17.0.0", "v1.32.13"))
	add(agentInfo(2, 20, 300, "agentk-c", "v17.0.0", ""))
	add(agentInfo(1, 10, 200, "agentk-b", "v17.1.0", "v1.30.5-gke.1014001"))
	second := agentInfo(1, 10, 100, "agentk-a", "v17.0.0", "v1.32.13")
	second.Meta.ConnectionID = 1002
	add(second)
	// Agent 3 is in project 10 too.
	add(agentInfo(3, 10, 400, "agentk-d", "v17.1.0", "v1.31.0"))
	// A tunnel that is closing is not reported.
	add(agentInfo(4, 40, 500, "agentk-gone", "v16.0.0", "")).Close()
	// An agentk that sends no pod id is reported per tunnel.
	for i, name := range []string{"agentk-old-1", "agentk-old-2"} {
		old := agentInfo(5, 50, 0, name, "v16.5.0", "")
		old.Meta.ConnectionID = int64(5001 + i)
		add(old)
	}
	return f
}

// pods names the pods of an answer, in order.
func pods(agents []*agenttracker.ConnectedAgentInfo) []string {
	out := []string{}
	for _, a := range agents {
		out = append(out, a.GetAgentMeta().GetPodName())
	}
	return out
}

func TestAgentTracker(t *testing.T) {
	f := newFleet(t)
	c := start(t, &Server{Connections: Local{f.conns}})

	type call func(context.Context, []int64) ([]*agenttracker.ConnectedAgentInfo, error)
	byAgent := map[string]call{
		"GetConnectedAgents": func(ctx context.Context, ids []int64) ([]*agenttracker.ConnectedAgentInfo, error) {
			if len(ids) != 1 {
				return nil, nil // the 16.5 method takes one id
			}
			r, err := c.tracker.GetConnectedAgents(ctx, &agenttrackerrpc.GetConnectedAgentsRequest{Request: &agenttrackerrpc.GetConnectedAgentsRequest_AgentId{AgentId: ids[0]}})
			return r.GetAgents(), err
		},
		"GetConnectedAgentsByAgentIds": func(ctx context.Context, ids []int64) ([]*agenttracker.ConnectedAgentInfo, error) {
			r, err := c.tracker.GetConnectedAgentsByAgentIds(ctx, &agenttrackerrpc.GetConnectedAgentsByAgentIdsRequest{AgentIds: ids})
			return r.GetAgents(), err
		},
		"GetConnectedAgentsByAgentIDs": func(ctx context.Context, ids []int64) ([]*agenttracker.ConnectedAgentInfo, error) {
			r, err := c.tracker.GetConnectedAgentsByAgentIDs(ctx, &agenttrackerrpc.GetConnectedAgentsByAgentIDsRequest{AgentIds: ids})
			return r.GetAgents(), err
		},
		"GetConnectedAgentksByAgentIDs": func(ctx context.Context, ids []int64) ([]*agenttracker.ConnectedAgentInfo, error) {
			r, err := c.tracker.GetConnectedAgentksByAgentIDs(ctx, &agenttrackerrpc.GetConnectedAgentksByAgentIDsRequest{AgentIds: ids})
			return r.GetAgents(), err
		},
	}
	byProject := map[string]call{
		"GetConnectedAgents": func(ctx context.Context, ids []int64) ([]*agenttracker.ConnectedAgentInfo, error) {
			if len(ids) != 1 {
				return nil, nil
			}
			r, err := c.tracker.GetConnectedAgents(ctx, &agenttrackerrpc.GetConnectedAgentsRequest{Request: &agenttrackerrpc.GetConnectedAgentsRequest_ProjectId{ProjectId: ids[0]}})
			return r.GetAgents(), err
		},
		"GetConnectedAgentsByProjectIds": func(ctx context.Context, ids []int64) ([]*agenttracker.ConnectedAgentInfo, error) {
			r, err := c.tracker.GetConnectedAgentsByProjectIds(ctx, &agenttrackerrpc.GetConnectedAgentsByProjectIdsRequest{ProjectIds: ids})
			return r.GetAgents(), err
		},
		"GetConnectedAgentsByProjectIDs": func(ctx context.Context, ids []int64) ([]*agenttracker.ConnectedAgentInfo, error) {
			r, err := c.tracker.GetConnectedAgentsByProjectIDs(ctx, &agenttrackerrpc.GetConnectedAgentsByProjectIDsRequest{ProjectIds: ids})
			return r.GetAgents(), err
		},
	}

	tooMany := make([]int64, maxIDs+1)
	for i := range tooMany {
		tooMany[i] = int64(i + 1)
	}
	tests := []struct {
		name    string
		project bool // ids are project ids
		ids     []int64
		want    []string // pod names in order
		code    codes.Code
	}{
		// Pods in order of connection; pod a once although it has two tunnels.
		{name: "one agent, two pods", ids: []int64{1}, want: []string{"agentk-a", "agentk-b"}},
		{name: "another agent", ids: []int64{2}, want: []string{"agentk-c"}},
		{name: "sorted by agent id", ids: []int64{3, 2, 1}, want: []string{"agentk-a", "agentk-b", "agentk-c", "agentk-d"}},
		{name: "duplicate ids", ids: []int64{2, 2}, want: []string{"agentk-c"}},
		{name: "not connected", ids: []int64{99}, want: []string{}},
		{name: "closing tunnel", ids: []int64{4}, want: []string{}},
		{name: "no pod id", ids: []int64{5}, want: []string{"agentk-old-1", "agentk-old-2"}},
		{name: "no ids", ids: nil, want: []string{}},
		{name: "zero id", ids: []int64{1, 0}, code: codes.InvalidArgument},
		{name: "negative id", ids: []int64{-1}, code: codes.InvalidArgument},
		{name: "too many ids", ids: tooMany, code: codes.InvalidArgument},

		{name: "project of three agents", project: true, ids: []int64{10}, want: []string{"agentk-a", "agentk-b", "agentk-d"}},
		{name: "two projects", project: true, ids: []int64{20, 10}, want: []string{"agentk-a", "agentk-b", "agentk-c", "agentk-d"}},
		{name: "project without agents", project: true, ids: []int64{99}, want: []string{}},
		{name: "no project ids", project: true, ids: nil, want: []string{}},
		{name: "zero project id", project: true, ids: []int64{0}, code: codes.InvalidArgument},
		{name: "too many project ids", project: true, ids: tooMany, code: codes.InvalidArgument},
	}
	for _, tt := range tests {
		calls := byAgent
		if tt.project {
			calls = byProject
		}
		for _, method := range slices.Sorted(maps.Keys(calls)) {
			if method == "GetConnectedAgents" && len(tt.ids) != 1 {
				continue
			}
			t.Run(method+"/"+tt.name, func(t *testing.T) {
				agents, err := calls[method](railsCtx(t), tt.ids)
				wantCode(t, err, tt.code)
				if err != nil {
					return
				}
				if got := pods(agents); !slices.Equal(got, tt.want) {
					t.Errorf("pods = %v, want %v", got, tt.want)
				}
			})
		}
	}
}

// The 16.5 request must name a project or an agent.
func TestGetConnectedAgentsUnset(t *testing.T) {
	c := start(t, &Server{})
	_, err := c.tracker.GetConnectedAgents(railsCtx(t), &agenttrackerrpc.GetConnectedAgentsRequest{})
	wantCode(t, err, codes.InvalidArgument)
}

// Each pod is described with the fields Rails shows: the pod's first tunnel
// gives its connection time and metadata, its pod id is the connection id.
func TestAgentTrackerDetails(t *testing.T) {
	f := newFleet(t)
	c := start(t, &Server{Connections: Local{f.conns}})
	resp, err := c.tracker.GetConnectedAgentsByAgentIDs(railsCtx(t), &agenttrackerrpc.GetConnectedAgentsByAgentIDsRequest{AgentIds: []int64{1, 2, 5}})
	if err != nil {
		t.Fatal(err)
	}
	type want struct {
		agentID, projectID, connectionID  int64
		version, major, minor, gitVersion string
	}
	wants := map[string]want{
		"agentk-a":     {1, 10, 100, "v17.0.0", "1", "32", "v1.32.13"},
		"agentk-b":     {1, 10, 200, "v17.1.0", "1", "30", "v1.30.5-gke.1014001"},
		"agentk-c":     {2, 20, 300, "v17.0.0", "", "", ""},
		"agentk-old-1": {5, 50, 5001, "v16.5.0", "", "", ""},
		"agentk-old-2": {5, 50, 5002, "v16.5.0", "", "", ""},
	}
	if len(resp.GetAgents()) != len(wants) {
		t.Fatalf("pods = %v", pods(resp.GetAgents()))
	}
	for _, a := range resp.GetAgents() {
		m := a.GetAgentMeta()
		w := wants[m.GetPodName()]
		first := f.first[m.GetPodName()]
		if a.GetAgentId() != w.agentID || a.GetProjectId() != w.projectID {
			t.Errorf("%s: agent %d project %d, want %d %d", m.GetPodName(), a.GetAgentId(), a.GetProjectId(), w.agentID, w.projectID)
		}
		if a.GetConnectionId() != w.connectionID {
			t.Errorf("%s: connection id %d, want %d", m.GetPodName(), a.GetConnectionId(), w.connectionID)
		}
		if !a.GetConnectedAt().AsTime().Equal(first.ConnectedAt()) {
			t.Errorf("%s: connected at %v, want %v", m.GetPodName(), a.GetConnectedAt().AsTime(), first.ConnectedAt())
		}
		if m.GetVersion() != w.version || m.GetCommitId() != "c0ffee"+w.version || m.GetPodNamespace() != "gitlab-agent" {
			t.Errorf("%s: meta %v", m.GetPodName(), m)
		}
		k := m.GetKubernetesVersion()
		if k.GetMajor() != w.major || k.GetMinor() != w.minor || k.GetGitVersion() != w.gitVersion || k.GetPlatform() != "" {
			t.Errorf("%s: kubernetes version %v", m.GetPodName(), k)
		}
		if len(a.GetWarnings()) != 0 {
			t.Errorf("%s: warnings %v", m.GetPodName(), a.GetWarnings())
		}
	}
}

func TestCountAgentsByAgentVersions(t *testing.T) {
	f := newFleet(t)
	tests := []struct {
		name  string
		conns Connections
		want  map[string]int64
	}{
		// Pods, not tunnels: agentk-a counts once.
		{"fleet", Local{f.conns}, map[string]int64{"v17.0.0": 2, "v17.1.0": 2, "v16.5.0": 2}},
		{"nothing connected", Local{fakeConns(nil)}, map[string]int64{}},
		{"no store", nil, map[string]int64{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := start(t, &Server{Connections: tt.conns})
			resp, err := c.tracker.CountAgentsByAgentVersions(railsCtx(t), &agenttrackerrpc.CountAgentsByAgentVersionsRequest{})
			if err != nil {
				t.Fatal(err)
			}
			if got := resp.GetAgentVersions(); !maps.Equal(got, tt.want) {
				t.Errorf("versions = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestKubernetesVersion(t *testing.T) {
	tests := []struct{ in, major, minor string }{
		{"v1.32.13", "1", "32"},
		{"v1.30.5-gke.1014001", "1", "30"},
		{"v1.29.3+k3s1", "1", "29"},
		{"", "", ""},
		{"1.32.13", "", ""},
		{"v1.32", "", ""},
		{"unknown", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			v := kubernetesVersion(tt.in, "linux/amd64")
			if v.GetMajor() != tt.major || v.GetMinor() != tt.minor || v.GetGitVersion() != tt.in || v.GetPlatform() != "linux/amd64" {
				t.Errorf("kubernetesVersion(%q) = %v", tt.in, v)
			}
		})
	}
}
