package railsapi

import (
	"context"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/caddy-kas/caddy-kas/railsapi/pb/configprojectrpc"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/notificationsrpc"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/serverinfo"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/serverinforpc"
)

// notifications serves gitlab.agent.notifications.rpc.Notifications
// (gitlab-wire A.4).
type notifications struct {
	notificationsrpc.UnimplementedNotificationsServer
	s *Server
}

// GitPushEvent takes note of a push and answers at once: Rails calls it
// from a background job with a short deadline, and a slow answer shows up
// there as DeadlineExceeded.
func (n *notifications) GitPushEvent(_ context.Context, req *notificationsrpc.GitPushEventRequest) (*notificationsrpc.GitPushEventResponse, error) {
	p := req.GetEvent().GetProject()
	switch {
	case p == nil:
		return nil, status.Error(codes.InvalidArgument, "event.project is required")
	case p.GetId() <= 0:
		return nil, status.Errorf(codes.InvalidArgument, "event.project.id must be positive, got %d", p.GetId())
	case p.GetFullPath() == "":
		return nil, status.Error(codes.InvalidArgument, "event.project.full_path is required")
	}
	n.s.logger().Debug("git push event", zap.Int64("project_id", p.GetId()), zap.String("project_path", p.GetFullPath()))
	if n.s.OnGitPush != nil {
		n.s.OnGitPush(p.GetId(), p.GetFullPath())
	}
	return &notificationsrpc.GitPushEventResponse{}, nil
}

// serverInfo serves gitlab.agent.server_info.rpc.ServerInfo. Rails 18.x
// needs it for its agent list and install commands (gitlab-wire A.6).
type serverInfo struct {
	serverinforpc.UnimplementedServerInfoServer
	s *Server
}

func (i *serverInfo) GetServerInfo(context.Context, *serverinforpc.GetServerInfoRequest) (*serverinforpc.GetServerInfoResponse, error) {
	return &serverinforpc.GetServerInfoResponse{
		CurrentServerInfo: &serverinfo.ServerInfo{Version: i.s.Version, GitRef: i.s.GitRef},
	}, nil
}

// configProject serves
// gitlab.agent.configuration_project.rpc.ConfigurationProject
// (gitlab-wire A.5).
type configProject struct {
	configprojectrpc.UnimplementedConfigurationProjectServer
	s *Server
}

// ListAgentConfigFiles validates the request and answers with an empty
// list. Listing the files means reading the repository's tree from Gitaly
// (gitlab-wire D), which a later change will add. Until then Rails' list of
// configured agents is empty, while agents that are registered in GitLab
// keep working.
func (c *configProject) ListAgentConfigFiles(_ context.Context, req *configprojectrpc.ListAgentConfigFilesRequest) (*configprojectrpc.ListAgentConfigFilesResponse, error) {
	repo, gitaly := req.GetRepository(), req.GetGitalyInfo()
	var missing string
	switch {
	case repo == nil:
		missing = "repository"
	case repo.GetStorageName() == "":
		missing = "repository.storage_name"
	case repo.GetRelativePath() == "":
		missing = "repository.relative_path"
	case repo.GetGlRepository() == "":
		missing = "repository.gl_repository"
	case repo.GetGlProjectPath() == "":
		missing = "repository.gl_project_path"
	case gitaly == nil:
		missing = "gitaly_info"
	case gitaly.GetAddress() == "":
		missing = "gitaly_info.address"
	}
	if missing != "" {
		return nil, status.Errorf(codes.InvalidArgument, "%s is required", missing)
	}
	c.s.logger().Debug("listing agent configuration files (not implemented: empty list)",
		zap.String("project_path", repo.GetGlProjectPath()))
	return &configprojectrpc.ListAgentConfigFilesResponse{}, nil
}
