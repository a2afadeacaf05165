package integration

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/integration/fakegitlab"
	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/agenttracker"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/agenttrackerrpc"
)

// TestGitLabAgentkTracked: GitLab's agentk registers its pod, and GitLab's
// agent pages, which ask the Rails gRPC API, list it with its version and
// pod, as for GitLab's own KAS.
func TestGitLabAgentkTracked(t *testing.T) {
	t.Parallel()
	s := requireGitLabAgentk(t)
	apiAddress := fmt.Sprintf("127.0.0.1:%d", mustFreeLoopbackPorts(t, 1)[0])
	e := startGitLabEnv(t, s, gitlabEnvOptions{apiListen: apiAddress, noAgentk: true})
	// A CI job of the agent's own project, to probe the tunnel with.
	job := fakegitlab.Job{
		JobID: 4201, PipelineID: 521, ProjectID: glProjectID, Username: glDeployBot.Username,
		Token: kubetest.NewToken("ci job token for the tracker test"),
	}
	e.gitlab.AddJob(job)
	e.caddy.startGitLabAgentk(t, gitlabAgentkOptions{agentID: glAgentID, token: e.agentToken, podName: "gitlab-agentk-tracked"}).
		waitConnected(t, fmt.Sprintf("Bearer ci:%d:%s", glAgentID, job.Token))

	rails := newRailsClient(t, apiAddress, e.secret)
	tracker := agenttrackerrpc.NewAgentTrackerClient(rails.conn)
	var agents []*agenttracker.ConnectedAgentInfo
	// agentk registers once at start, next to opening its tunnel streams:
	// wait for the pod to show up rather than assume the order.
	err := kubetest.Eventually(time.Minute, func() error {
		r, err := tracker.GetConnectedAgentksByAgentIDs(rails.ctx(t, nil, "gitlab-kas"), &agenttrackerrpc.GetConnectedAgentksByAgentIDsRequest{AgentIds: []int64{glAgentID}})
		if err != nil {
			return err
		}
		agents = r.GetAgents()
		if len(agents) != 1 || agents[0].GetAgentMeta().GetPodName() == "" {
			return fmt.Errorf("tracker lists %v", agents)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	a := agents[0]
	m := a.GetAgentMeta()
	if a.GetAgentId() != glAgentID || a.GetProjectId() != glProjectID || a.GetConnectionId() == 0 {
		t.Errorf("agent %d, project %d, connection %d; want agent %d of project %d with its pod id", a.GetAgentId(), a.GetProjectId(), a.GetConnectionId(), glAgentID, glProjectID)
	}
	if m.GetPodName() != "gitlab-agentk-tracked" || m.GetPodNamespace() == "" || !strings.HasPrefix(m.GetVersion(), "v16.5") {
		t.Errorf("agent meta %+v, want GitLab's agentk v16.5 in pod gitlab-agentk-tracked", m)
	}
	if m.GetKubernetesVersion().GetGitVersion() == "" {
		t.Errorf("no Kubernetes version in %+v", m)
	}
}
