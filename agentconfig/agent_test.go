package agentconfig

import (
	"testing"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"

	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentcfg"
)

func TestToAgentConfiguration(t *testing.T) {
	const (
		agentID     = 7
		projectID   = 42
		projectPath = "group/agents"
		externalURL = "https://gitlab.example.com"
	)
	defaults := func(c *agentcfg.AgentConfiguration) *agentcfg.AgentConfiguration {
		c.AgentId, c.ProjectId, c.ProjectPath, c.GitlabExternalUrl = agentID, projectID, projectPath, externalURL
		if c.Observability == nil {
			c.Observability = &agentcfg.ObservabilityCF{Logging: &agentcfg.LoggingCF{GrpcLevel: agentcfg.LogLevelEnum_error.Enum()}}
		}
		if c.Flux == nil {
			c.Flux = &agentcfg.FluxCF{WebhookReceiverUrl: "http://webhook-receiver.flux-system.svc.cluster.local"}
		}
		return c
	}
	tests := []struct {
		name string
		yaml string
		want *agentcfg.AgentConfiguration
	}{
		{"empty file gets the defaults", "", defaults(&agentcfg.AgentConfiguration{})},
		{
			name: "every section is carried, user_access is not",
			yaml: `
gitops: {manifest_projects: [{id: m, reconcile_timeout: 60s}]}
observability: {logging: {level: warn, grpc_level: debug}, google_profiler: {enabled: true}}
ci_access: {projects: [{id: p, access_as: {ci_job: {}}}], groups: [{id: g}]}
container_scanning: {cadence: "0 0 * * *"}
user_access: {access_as: {user: {}}, projects: [{id: p}]}
remote_development: {enabled: true, dns_zone: ws.example.com}
flux: {webhook_receiver_url: "http://flux:9292"}
`,
			want: defaults(&agentcfg.AgentConfiguration{
				Gitops: &agentcfg.GitopsCF{ManifestProjects: []*agentcfg.ManifestProjectCF{{Id: ptr("m"), ReconcileTimeout: dur(60, 0)}}},
				Observability: &agentcfg.ObservabilityCF{
					Logging:        &agentcfg.LoggingCF{Level: agentcfg.LogLevelEnum_warn, GrpcLevel: agentcfg.LogLevelEnum_debug.Enum()},
					GoogleProfiler: &agentcfg.GoogleProfilerCF{Enabled: true},
				},
				CiAccess: &agentcfg.CiAccessCF{
					Projects: []*agentcfg.CiAccessProjectCF{{Id: "p", AccessAs: ciJobAs()}},
					Groups:   []*agentcfg.CiAccessGroupCF{{Id: "g"}},
				},
				ContainerScanning: &agentcfg.ContainerScanningCF{Cadence: "0 0 * * *"},
				RemoteDevelopment: &agentcfg.RemoteDevelopmentCF{Enabled: true, DnsZone: "ws.example.com"},
				Flux:              &agentcfg.FluxCF{WebhookReceiverUrl: "http://flux:9292"},
			}),
		},
		{
			name: "logging level set, grpc_level defaulted",
			yaml: "observability: {logging: {level: debug}}\n",
			want: defaults(&agentcfg.AgentConfiguration{Observability: &agentcfg.ObservabilityCF{
				Logging: &agentcfg.LoggingCF{Level: agentcfg.LogLevelEnum_debug, GrpcLevel: agentcfg.LogLevelEnum_error.Enum()},
			}}),
		},
		{
			name: "grpc_level info is not replaced",
			yaml: "observability: {logging: {grpc_level: info}}\n",
			want: defaults(&agentcfg.AgentConfiguration{Observability: &agentcfg.ObservabilityCF{
				Logging: &agentcfg.LoggingCF{GrpcLevel: agentcfg.LogLevelEnum_info.Enum()},
			}}),
		},
		{
			name: "google_profiler alone gets logging defaults",
			yaml: "observability: {google_profiler: {project_id: x}}\n",
			want: defaults(&agentcfg.AgentConfiguration{Observability: &agentcfg.ObservabilityCF{
				Logging:        &agentcfg.LoggingCF{GrpcLevel: agentcfg.LogLevelEnum_error.Enum()},
				GoogleProfiler: &agentcfg.GoogleProfilerCF{ProjectId: "x"},
			}}),
		},
		{
			name: "empty flux section gets the webhook default",
			yaml: "flux: {}\n",
			want: defaults(&agentcfg.AgentConfiguration{}),
		},
		{
			name: "only user_access",
			yaml: "user_access: {projects: [{id: p}]}\n",
			want: defaults(&agentcfg.AgentConfiguration{}),
		},
	}
	for _, c := range tests {
		t.Run(c.name, func(t *testing.T) {
			f, err := Parse([]byte(c.yaml))
			if err != nil {
				t.Fatal(err)
			}
			before := proto.Clone(f)
			got := ToAgentConfiguration(f, agentID, projectID, projectPath, externalURL)
			if !proto.Equal(got, c.want) {
				t.Errorf("ToAgentConfiguration:\n got %v\nwant %v", prototext.Format(got), prototext.Format(c.want))
			}
			if !proto.Equal(f, before) {
				t.Errorf("ToAgentConfiguration changed its input:\n%v", prototext.Format(f))
			}
		})
	}
}

func TestToAgentConfigurationNilFile(t *testing.T) {
	got := ToAgentConfiguration(nil, 1, 2, "p", "https://gitlab")
	want := ToAgentConfiguration(&agentcfg.ConfigurationFile{}, 1, 2, "p", "https://gitlab")
	if !proto.Equal(got, want) {
		t.Errorf("nil file: got %v, want %v", got, want)
	}
}

func TestToAgentConfigurationSharesNothing(t *testing.T) {
	f, err := Parse([]byte("ci_access: {projects: [{id: p}]}\nflux: {webhook_receiver_url: u}\nobservability: {logging: {level: warn}}\n"))
	if err != nil {
		t.Fatal(err)
	}
	c := ToAgentConfiguration(f, 1, 2, "p", "https://gitlab")
	c.CiAccess.Projects[0].Id = "changed"
	c.Flux.WebhookReceiverUrl = "changed"
	c.Observability.Logging.Level = agentcfg.LogLevelEnum_error
	if f.CiAccess.Projects[0].Id != "p" || f.Flux.WebhookReceiverUrl != "u" || f.Observability.Logging.Level != agentcfg.LogLevelEnum_warn {
		t.Errorf("changing the result changed the file: %v", f)
	}
}
