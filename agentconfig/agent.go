package agentconfig

import (
	"google.golang.org/protobuf/proto"

	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentcfg"
)

// Defaults of the agent configuration stated by kas-spec §3.2. GitLab's
// agentk applies them itself to fields left unset, so filling them in
// changes nothing for it; ToAgentConfiguration does so that every agent
// gets the same values.
const (
	// DefaultFluxWebhookReceiverURL is where agentk notifies Flux's
	// webhook receiver when flux.webhook_receiver_url is unset.
	DefaultFluxWebhookReceiverURL = "http://webhook-receiver.flux-system.svc.cluster.local"
	// DefaultGRPCLogLevel is agentk's gRPC log level when
	// observability.logging.grpc_level is unset.
	DefaultGRPCLogLevel = agentcfg.LogLevelEnum_error
)

// ToAgentConfiguration builds the configuration the agent server streams to
// an agent (kas-spec §3.1, gitlab-wire §B.5): the sections of f agentk acts
// on, copied so that f and the result share nothing, the agent's and its
// configuration project's ids, the project's full path, and GitLab's
// external URL, with the defaults of kas-spec §3.2 filled in (see
// [DefaultFluxWebhookReceiverURL] and [DefaultGRPCLogLevel]).
//
// user_access is not part of it: GitLab applies it (kas-spec §2.6). A nil f
// is an empty configuration.
func ToAgentConfiguration(f *agentcfg.ConfigurationFile, agentID, projectID int64, projectPath, gitlabExternalURL string) *agentcfg.AgentConfiguration {
	c := &agentcfg.AgentConfiguration{
		Gitops:            clone(f.GetGitops()),
		Observability:     clone(f.GetObservability()),
		AgentId:           agentID,
		ProjectId:         projectID,
		CiAccess:          clone(f.GetCiAccess()),
		ContainerScanning: clone(f.GetContainerScanning()),
		ProjectPath:       projectPath,
		RemoteDevelopment: clone(f.GetRemoteDevelopment()),
		Flux:              clone(f.GetFlux()),
		GitlabExternalUrl: gitlabExternalURL,
	}
	if c.Observability == nil {
		c.Observability = &agentcfg.ObservabilityCF{}
	}
	if c.Observability.Logging == nil {
		c.Observability.Logging = &agentcfg.LoggingCF{}
	}
	if c.Observability.Logging.GrpcLevel == nil {
		c.Observability.Logging.GrpcLevel = DefaultGRPCLogLevel.Enum()
	}
	if c.Flux == nil {
		c.Flux = &agentcfg.FluxCF{}
	}
	if c.Flux.WebhookReceiverUrl == "" {
		c.Flux.WebhookReceiverUrl = DefaultFluxWebhookReceiverURL
	}
	return c
}

// clone deep-copies m, keeping nil as nil.
func clone[T interface {
	comparable
	proto.Message
}](m T) T {
	var zero T
	if m == zero {
		return zero
	}
	return proto.Clone(m).(T)
}
