package railsapi

import (
	"cmp"
	"context"
	"regexp"
	"slices"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/caddy-kas/caddy-kas/railsapi/pb/agenttracker"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/agenttrackerrpc"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/entity"
	"github.com/caddy-kas/caddy-kas/tunnel"
)

// agentTracker serves gitlab.agent.agent_tracker.rpc.AgentTracker under
// every method name a Rails release has called (gitlab-wire A.1): they all
// answer from the same live connections, so any Rails from 16.5 on finds
// the name it knows.
type agentTracker struct {
	agenttrackerrpc.UnimplementedAgentTrackerServer
	s *Server
}

func (t *agentTracker) GetConnectedAgents(ctx context.Context, req *agenttrackerrpc.GetConnectedAgentsRequest) (*agenttrackerrpc.GetConnectedAgentsResponse, error) {
	var (
		agents []*agenttracker.ConnectedAgentInfo
		err    error
	)
	// The 16.5 request names one project or one agent; the oneof must be
	// set (gitlab-wire A.2).
	switch r := req.GetRequest().(type) {
	case *agenttrackerrpc.GetConnectedAgentsRequest_ProjectId:
		agents, err = t.byProjects(ctx, []int64{r.ProjectId})
	case *agenttrackerrpc.GetConnectedAgentsRequest_AgentId:
		agents, err = t.byAgents(ctx, []int64{r.AgentId})
	default:
		return nil, status.Error(codes.InvalidArgument, "request must set project_id or agent_id")
	}
	if err != nil {
		return nil, err
	}
	return &agenttrackerrpc.GetConnectedAgentsResponse{Agents: agents}, nil
}

func (t *agentTracker) GetConnectedAgentsByProjectIds(ctx context.Context, req *agenttrackerrpc.GetConnectedAgentsByProjectIdsRequest) (*agenttrackerrpc.GetConnectedAgentsByProjectIdsResponse, error) {
	agents, err := t.byProjects(ctx, req.GetProjectIds())
	if err != nil {
		return nil, err
	}
	return &agenttrackerrpc.GetConnectedAgentsByProjectIdsResponse{Agents: agents}, nil
}

func (t *agentTracker) GetConnectedAgentsByAgentIds(ctx context.Context, req *agenttrackerrpc.GetConnectedAgentsByAgentIdsRequest) (*agenttrackerrpc.GetConnectedAgentsByAgentIdsResponse, error) {
	agents, err := t.byAgents(ctx, req.GetAgentIds())
	if err != nil {
		return nil, err
	}
	return &agenttrackerrpc.GetConnectedAgentsByAgentIdsResponse{Agents: agents}, nil
}

func (t *agentTracker) GetConnectedAgentsByProjectIDs(ctx context.Context, req *agenttrackerrpc.GetConnectedAgentsByProjectIDsRequest) (*agenttrackerrpc.GetConnectedAgentsByProjectIDsResponse, error) {
	agents, err := t.byProjects(ctx, req.GetProjectIds())
	if err != nil {
		return nil, err
	}
	return &agenttrackerrpc.GetConnectedAgentsByProjectIDsResponse{Agents: agents}, nil
}

func (t *agentTracker) GetConnectedAgentsByAgentIDs(ctx context.Context, req *agenttrackerrpc.GetConnectedAgentsByAgentIDsRequest) (*agenttrackerrpc.GetConnectedAgentsByAgentIDsResponse, error) {
	agents, err := t.byAgents(ctx, req.GetAgentIds())
	if err != nil {
		return nil, err
	}
	return &agenttrackerrpc.GetConnectedAgentsByAgentIDsResponse{Agents: agents}, nil
}

func (t *agentTracker) GetConnectedAgentksByAgentIDs(ctx context.Context, req *agenttrackerrpc.GetConnectedAgentksByAgentIDsRequest) (*agenttrackerrpc.GetConnectedAgentksByAgentIDsResponse, error) {
	agents, err := t.byAgents(ctx, req.GetAgentIds())
	if err != nil {
		return nil, err
	}
	return &agenttrackerrpc.GetConnectedAgentksByAgentIDsResponse{Agents: agents}, nil
}

// CountAgentsByAgentVersions counts connected agentk pods (not tunnels) per
// agentk version, over all agents. Rails uses it for usage statistics.
func (t *agentTracker) CountAgentsByAgentVersions(ctx context.Context, _ *agenttrackerrpc.CountAgentsByAgentVersionsRequest) (*agenttrackerrpc.CountAgentsByAgentVersionsResponse, error) {
	conns, err := t.connections(ctx, Connections.All)
	if err != nil {
		return nil, err
	}
	counts := make(map[string]int64)
	for _, p := range groupPods(conns) {
		counts[p.meta.Version]++
	}
	return &agenttrackerrpc.CountAgentsByAgentVersionsResponse{AgentVersions: counts}, nil
}

// byAgents reports the pods of the given agents.
func (t *agentTracker) byAgents(ctx context.Context, ids []int64) ([]*agenttracker.ConnectedAgentInfo, error) {
	if err := validateIDs("agent", ids); err != nil {
		return nil, err
	}
	t.s.logger().Debug("listing connected agents", zap.Int64s("agent_ids", ids))
	conns, err := t.connections(ctx, func(c Connections, ctx context.Context) ([]Connection, error) { return c.ByAgentIDs(ctx, ids) })
	if err != nil {
		return nil, err
	}
	return report(conns), nil
}

// byProjects reports the pods of the agents whose configuration project is
// one of the given projects.
func (t *agentTracker) byProjects(ctx context.Context, ids []int64) ([]*agenttracker.ConnectedAgentInfo, error) {
	if err := validateIDs("project", ids); err != nil {
		return nil, err
	}
	t.s.logger().Debug("listing connected agents", zap.Int64s("project_ids", ids))
	conns, err := t.connections(ctx, func(c Connections, ctx context.Context) ([]Connection, error) { return c.ByProjectIDs(ctx, ids) })
	if err != nil {
		return nil, err
	}
	return report(conns), nil
}

// connections runs list on the server's Connections; a registry out of
// reach is Unavailable, which Rails shows as the agent's status unknown.
func (t *agentTracker) connections(ctx context.Context, list func(Connections, context.Context) ([]Connection, error)) ([]Connection, error) {
	if t.s.Connections == nil {
		return nil, nil
	}
	conns, err := list(t.s.Connections, ctx)
	if err != nil {
		t.s.logger().Warn("cannot list connected agents", zap.Error(err))
		return nil, status.Error(codes.Unavailable, "cannot list connected agents now")
	}
	return conns, nil
}

// validateIDs checks the ids of a request: positive, and not too many of
// them. GitLab's KAS rejects such requests the same way (gitlab-wire A.2).
func validateIDs(what string, ids []int64) error {
	if len(ids) > maxIDs {
		return status.Errorf(codes.InvalidArgument, "at most %d %s ids per request, got %d", maxIDs, what, len(ids))
	}
	for _, id := range ids {
		if id <= 0 {
			return status.Errorf(codes.InvalidArgument, "%s id must be positive, got %d", what, id)
		}
	}
	return nil
}

// pod is one agentk process with its tunnel connections: what Rails calls
// a connected agent.
type pod struct {
	agentID, projectID int64
	connectionID       int64
	connectedAt        time.Time
	meta               tunnel.AgentMeta
}

// podKey tells pods apart: agentk picks its pod id once at start and sends
// it on every tunnel.
type podKey struct{ agentID, podID int64 }

// groupPods groups connections into agentk pods, in a stable order: by
// agent id, then connection time, then connection id. A pod's connected_at
// is when its first live tunnel connected, and its metadata comes from
// that tunnel.
//
// An agentk that sends no pod id gets one entry per tunnel, named by its
// connection id, rather than all such tunnels folding into one entry.
func groupPods(conns []Connection) []*pod {
	byKey := make(map[podKey]*pod)
	for _, c := range conns {
		id := c.Meta.PodID
		if id == 0 {
			id = c.Meta.ConnectionID
		}
		k := podKey{agentID: c.AgentID, podID: id}
		p, ok := byKey[k]
		if !ok || c.ConnectedAt.Before(p.connectedAt) {
			byKey[k] = &pod{
				agentID:      c.AgentID,
				projectID:    c.ProjectID,
				connectionID: id,
				connectedAt:  c.ConnectedAt,
				meta:         c.Meta,
			}
		}
	}
	out := make([]*pod, 0, len(byKey))
	for _, p := range byKey {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b *pod) int {
		return cmp.Or(
			cmp.Compare(a.agentID, b.agentID),
			a.connectedAt.Compare(b.connectedAt),
			cmp.Compare(a.connectionID, b.connectionID),
		)
	})
	return out
}

// report describes the pods of conns in the shape Rails reads
// (gitlab-wire A.2). Warnings are left empty for now.
func report(conns []Connection) []*agenttracker.ConnectedAgentInfo {
	ps := groupPods(conns)
	out := make([]*agenttracker.ConnectedAgentInfo, 0, len(ps))
	for _, p := range ps {
		out = append(out, &agenttracker.ConnectedAgentInfo{
			AgentMeta: &entity.AgentMeta{
				Version:           p.meta.Version,
				CommitId:          p.meta.CommitID,
				PodNamespace:      p.meta.PodNamespace,
				PodName:           p.meta.PodName,
				KubernetesVersion: kubernetesVersion(p.meta.KubernetesVersion, p.meta.KubernetesPlatform),
			},
			ConnectedAt:  timestamppb.New(p.connectedAt),
			ConnectionId: p.connectionID,
			AgentId:      p.agentID,
			ProjectId:    p.projectID,
		})
	}
	return out
}

// semverPrefix matches the start of a Kubernetes gitVersion such as
// "v1.32.13" or "v1.30.5-gke.1014001".
var semverPrefix = regexp.MustCompile(`^v(\d+)\.(\d+)\.\d+`)

// kubernetesVersion turns the version agentk reported into GitLab's
// shape. Major and minor are only filled in when the version looks like
// vX.Y.Z.
func kubernetesVersion(gitVersion, platform string) *entity.KubernetesVersion {
	v := &entity.KubernetesVersion{GitVersion: gitVersion, Platform: platform}
	if m := semverPrefix.FindStringSubmatch(gitVersion); m != nil {
		v.Major, v.Minor = m[1], m[2]
	}
	return v
}
