package railsapi

import (
	"context"
	"errors"

	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/caddy-kas/caddy-kas/gitaly"
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

// ListAgentConfigFiles lists the agent configuration files of a
// repository from its Gitaly server: the files .gitlab/agents/<name>/
// config.yaml of its default branch (or of the branch the request names),
// as GitLab's agent server lists them (gitlab-wire §A.5, kas-spec §3.1).
// A repository without such files, or without commits, has none. Rails
// shows the list as the project's configured agents.
func (c *configProject) ListAgentConfigFiles(ctx context.Context, req *configprojectrpc.ListAgentConfigFilesRequest) (*configprojectrpc.ListAgentConfigFilesResponse, error) {
	repo, info := req.GetRepository(), req.GetGitalyInfo()
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
	case info == nil:
		missing = "gitaly_info"
	case info.GetAddress() == "":
		missing = "gitaly_info.address"
	}
	if missing != "" {
		return nil, status.Errorf(codes.InvalidArgument, "%s is required", missing)
	}
	if c.s.Gitaly == nil {
		return nil, status.Error(codes.Unavailable, "no Gitaly client is configured")
	}
	client, err := c.s.Gitaly.Client(gitaly.Info{Address: info.GetAddress(), Token: info.GetToken(), Features: info.GetFeatures()})
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "gitaly_info: %v", err)
	}
	defer client.Release()
	revision := "HEAD"
	if b := req.GetDefaultBranch(); b != "" {
		revision = "refs/heads/" + b
	}
	files, err := client.AgentConfigFiles(ctx, gitaly.Repository{
		StorageName:                   repo.GetStorageName(),
		RelativePath:                  repo.GetRelativePath(),
		GitObjectDirectory:            repo.GetGitObjectDirectory(),
		GitAlternateObjectDirectories: repo.GetGitAlternateObjectDirectories(),
		GlRepository:                  repo.GetGlRepository(),
		GlProjectPath:                 repo.GetGlProjectPath(),
	}, revision)
	if err != nil {
		c.s.logger().Warn("cannot list agent configuration files", zap.String("project_path", repo.GetGlProjectPath()), zap.Error(err))
		return nil, status.Errorf(gitalyCode(err), "listing agent configuration files: %v", err)
	}
	resp := &configprojectrpc.ListAgentConfigFilesResponse{}
	for _, f := range files {
		resp.ConfigFiles = append(resp.ConfigFiles, &configprojectrpc.AgentConfigFile{Name: f.Path, AgentName: f.AgentName})
	}
	return resp, nil
}

// gitalyCode is the gRPC code to answer Rails with for a failed Gitaly
// call.
func gitalyCode(err error) codes.Code {
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	case errors.Is(err, gitaly.ErrUnavailable):
		return codes.Unavailable
	default:
		return codes.Unknown
	}
}
