package railsapi

import (
	"slices"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"

	"github.com/caddy-kas/caddy-kas/internal/redistest"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/agenttrackerrpc"
	"github.com/caddy-kas/caddy-kas/tunnel/redisregistry"
)

// TestAgentTrackerShared: with several nodes, Rails asking any node learns
// the agentk pods connected to every node, from the registry they share.
func TestAgentTrackerShared(t *testing.T) {
	srv := redistest.StartServer(t)
	registry := func(url string) *redisregistry.Registry {
		client := redis.NewClient(&redis.Options{Addr: srv.Addr(), ContextTimeoutEnabled: true})
		t.Cleanup(func() { client.Close() })
		r, err := redisregistry.New(redisregistry.Options{Client: client, OwnURLs: []string{url}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close(t.Context()) })
		return r
	}
	a, b := registry("grpc://10.0.0.1:8155"), registry("grpc://10.0.0.2:8155")
	a.Publish(conn(t, agentInfo(1, 10, 100, "agentk-on-a", "v17.0.0", "v1.32.13")))
	b.Publish(conn(t, agentInfo(1, 10, 200, "agentk-on-b", "v17.1.0", "v1.32.13")))
	b.Publish(conn(t, agentInfo(2, 20, 300, "agentk-other", "v17.1.0", "")))

	c := start(t, &Server{Connections: Shared{Registry: a}})
	deadline := time.Now().Add(20 * time.Second)
	for {
		r, err := c.tracker.GetConnectedAgentksByAgentIDs(railsCtx(t), &agenttrackerrpc.GetConnectedAgentksByAgentIDsRequest{AgentIds: []int64{1}})
		if err != nil {
			t.Fatal(err)
		}
		got := pods(r.GetAgents())
		slices.Sort(got)
		if slices.Equal(got, []string{"agentk-on-a", "agentk-on-b"}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent 1's pods through node A: %v, want both nodes' pods", got)
		}
		time.Sleep(50 * time.Millisecond)
	}
	byProject, err := c.tracker.GetConnectedAgentsByProjectIDs(railsCtx(t), &agenttrackerrpc.GetConnectedAgentsByProjectIDsRequest{ProjectIds: []int64{20}})
	if err != nil || !slices.Equal(pods(byProject.GetAgents()), []string{"agentk-other"}) {
		t.Errorf("project 20 through node A: %v, %v", byProject, err)
	}
	counts, err := c.tracker.CountAgentsByAgentVersions(railsCtx(t), &agenttrackerrpc.CountAgentsByAgentVersionsRequest{})
	if err != nil || counts.GetAgentVersions()["v17.1.0"] != 2 || counts.GetAgentVersions()["v17.0.0"] != 1 {
		t.Errorf("versions through node A: %v, %v", counts.GetAgentVersions(), err)
	}

	// Redis out of reach: Rails is told the answer is unavailable, not
	// that no agent is connected.
	srv.Stop()
	_, err = c.tracker.GetConnectedAgentksByAgentIDs(railsCtx(t), &agenttrackerrpc.GetConnectedAgentksByAgentIDsRequest{AgentIds: []int64{1}})
	wantCode(t, err, codes.Unavailable)
}
