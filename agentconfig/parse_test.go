package agentconfig

import (
	"errors"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentcfg"
)

func ptr[T any](v T) *T { return &v }

func dur(seconds int64, nanos int32) *durationpb.Duration {
	return &durationpb.Duration{Seconds: seconds, Nanos: nanos}
}

func agentAs() *agentcfg.CiAccessAsCF {
	return &agentcfg.CiAccessAsCF{As: &agentcfg.CiAccessAsCF_Agent{Agent: &agentcfg.CiAccessAsAgentCF{}}}
}

func ciJobAs() *agentcfg.CiAccessAsCF {
	return &agentcfg.CiAccessAsCF{As: &agentcfg.CiAccessAsCF_CiJob{CiJob: &agentcfg.CiAccessAsCiJobCF{}}}
}

func impersonateAs(imp *agentcfg.CiAccessAsImpersonateCF) *agentcfg.CiAccessAsCF {
	return &agentcfg.CiAccessAsCF{As: &agentcfg.CiAccessAsCF_Impersonate{Impersonate: imp}}
}

type parseCase struct {
	name string
	yaml string
	want *agentcfg.ConfigurationFile
}

// acceptCases are files Parse accepts, one or more per field family.
var acceptCases = []parseCase{
	{name: "empty file", yaml: "", want: &agentcfg.ConfigurationFile{}},
	{name: "blank lines", yaml: "\n  \n\n", want: &agentcfg.ConfigurationFile{}},
	{name: "comments only", yaml: "# nothing yet\n  # really nothing\n", want: &agentcfg.ConfigurationFile{}},
	{name: "document marker only", yaml: "---\n# empty\n", want: &agentcfg.ConfigurationFile{}},
	{name: "empty mapping", yaml: "{}\n", want: &agentcfg.ConfigurationFile{}},
	{name: "null sections", yaml: "ci_access:\nuser_access: ~\ngitops: null\n", want: &agentcfg.ConfigurationFile{}},
	{
		name: "empty sections are present",
		yaml: "ci_access: {}\nflux: {}\n",
		want: &agentcfg.ConfigurationFile{CiAccess: &agentcfg.CiAccessCF{}, Flux: &agentcfg.FluxCF{}},
	},
	{
		name: "gitops",
		yaml: `
gitops:
  manifest_projects:
  - id: group/manifests
    default_namespace: apps
    paths:
    - glob: '/team1/**/*.yaml'
    - glob: /team2/*.json
    reconcile_timeout: 3600s
    dry_run_strategy: server
    prune: false
    prune_timeout: 1.5s
    prune_propagation_policy: background
    inventory_policy: adopt_if_no_inventory
    ref:
      branch: production
  - ref: {tag: v1.2.3}
    dry_run_strategy: none
    prune_propagation_policy: orphan
    inventory_policy: adopt_all
  - id: other
    ref: {commit: 0123456789abcdef}
    dry_run_strategy: client
    prune_propagation_policy: foreground
    inventory_policy: must_match
    prune: true
`,
		want: &agentcfg.ConfigurationFile{Gitops: &agentcfg.GitopsCF{ManifestProjects: []*agentcfg.ManifestProjectCF{
			{
				Id:                     ptr("group/manifests"),
				DefaultNamespace:       "apps",
				Paths:                  []*agentcfg.PathCF{{Glob: "/team1/**/*.yaml"}, {Glob: "/team2/*.json"}},
				ReconcileTimeout:       dur(3600, 0),
				DryRunStrategy:         "server",
				PruneOneof:             &agentcfg.ManifestProjectCF_Prune{Prune: false},
				PruneTimeout:           dur(1, 500000000),
				PrunePropagationPolicy: "background",
				InventoryPolicy:        "adopt_if_no_inventory",
				Ref:                    &agentcfg.GitRefCF{Ref: &agentcfg.GitRefCF_Branch{Branch: "production"}},
			},
			{
				Ref:                    &agentcfg.GitRefCF{Ref: &agentcfg.GitRefCF_Tag{Tag: "v1.2.3"}},
				DryRunStrategy:         "none",
				PrunePropagationPolicy: "orphan",
				InventoryPolicy:        "adopt_all",
			},
			{
				Id:                     ptr("other"),
				Ref:                    &agentcfg.GitRefCF{Ref: &agentcfg.GitRefCF_Commit{Commit: "0123456789abcdef"}},
				DryRunStrategy:         "client",
				PrunePropagationPolicy: "foreground",
				InventoryPolicy:        "must_match",
				PruneOneof:             &agentcfg.ManifestProjectCF_Prune{Prune: true},
			},
		}}},
	},
	{
		name: "observability",
		yaml: `
observability:
  logging:
    level: debug
    grpc_level: warn
  google_profiler:
    enabled: true
    project_id: my-gcp-project
    credentials_file: /etc/creds.json
    debug_logging: yes
`,
		want: &agentcfg.ConfigurationFile{Observability: &agentcfg.ObservabilityCF{
			Logging: &agentcfg.LoggingCF{Level: agentcfg.LogLevelEnum_debug, GrpcLevel: agentcfg.LogLevelEnum_warn.Enum()},
			GoogleProfiler: &agentcfg.GoogleProfilerCF{
				Enabled: true, ProjectId: "my-gcp-project", CredentialsFile: "/etc/creds.json", DebugLogging: true,
			},
		}},
	},
	{
		name: "observability grpc_level info is kept apart from unset",
		yaml: "observability: {logging: {level: error, grpc_level: info}}\n",
		want: &agentcfg.ConfigurationFile{Observability: &agentcfg.ObservabilityCF{
			Logging: &agentcfg.LoggingCF{Level: agentcfg.LogLevelEnum_error, GrpcLevel: agentcfg.LogLevelEnum_info.Enum()},
		}},
	},
	{
		name: "observability level by number, as protojson allows",
		yaml: "observability: {logging: {level: 1, grpc_level: 3}}\n",
		want: &agentcfg.ConfigurationFile{Observability: &agentcfg.ObservabilityCF{
			Logging: &agentcfg.LoggingCF{Level: agentcfg.LogLevelEnum_debug, GrpcLevel: agentcfg.LogLevelEnum_error.Enum()},
		}},
	},
	{
		name: "ci_access projects with each access_as",
		yaml: `
ci_access:
  projects:
  - id: group/app
  - id: group/agent-as
    default_namespace: ns1
    access_as:
      agent: {}
  - id: group/job
    environments: [staging, review/*]
    access_as:
      ci_job: {}
  - id: group/imp
    access_as:
      impersonate:
        username: deployer
        uid: "1000"
        groups: [ops, dev]
        extra:
        - key: example.com/team
          val: [a, b]
        - key: reason
          val: [ci]
`,
		want: &agentcfg.ConfigurationFile{CiAccess: &agentcfg.CiAccessCF{Projects: []*agentcfg.CiAccessProjectCF{
			{Id: "group/app"},
			{Id: "group/agent-as", DefaultNamespace: "ns1", AccessAs: agentAs()},
			{Id: "group/job", Environments: []string{"staging", "review/*"}, AccessAs: ciJobAs()},
			{Id: "group/imp", AccessAs: impersonateAs(&agentcfg.CiAccessAsImpersonateCF{
				Username: "deployer",
				Uid:      "1000",
				Groups:   []string{"ops", "dev"},
				Extra: []*agentcfg.ExtraKeyValCF{
					{Key: "example.com/team", Val: []string{"a", "b"}},
					{Key: "reason", Val: []string{"ci"}},
				},
			})},
		}}},
	},
	{
		name: "ci_access groups with each access_as",
		yaml: `
ci_access:
  groups:
  - id: group
  - id: group/sub
    default_namespace: ns
    environments: [production]
    access_as: {agent: {}}
  - id: other
    access_as: {ci_job: {}}
  - id: third
    access_as: {impersonate: {username: u}}
`,
		want: &agentcfg.ConfigurationFile{CiAccess: &agentcfg.CiAccessCF{Groups: []*agentcfg.CiAccessGroupCF{
			{Id: "group"},
			{Id: "group/sub", DefaultNamespace: "ns", Environments: []string{"production"}, AccessAs: agentAs()},
			{Id: "other", AccessAs: ciJobAs()},
			{Id: "third", AccessAs: impersonateAs(&agentcfg.CiAccessAsImpersonateCF{Username: "u"})},
		}}},
	},
	{
		name: "access_as with one member null and another set",
		yaml: "ci_access: {projects: [{id: p, access_as: {agent: null, ci_job: {}}}]}\n",
		want: &agentcfg.ConfigurationFile{CiAccess: &agentcfg.CiAccessCF{Projects: []*agentcfg.CiAccessProjectCF{
			{Id: "p", AccessAs: ciJobAs()},
		}}},
	},
	{
		name: "user_access as user",
		yaml: `
user_access:
  access_as:
    user: {}
  projects:
  - id: group/app
  groups:
  - id: group/sub
`,
		want: &agentcfg.ConfigurationFile{UserAccess: &agentcfg.UserAccessCF{
			AccessAs: &agentcfg.UserAccessAsCF{As: &agentcfg.UserAccessAsCF_User{User: &agentcfg.UserAccessAsUserCF{}}},
			Projects: []*agentcfg.UserAccessProjectCF{{Id: "group/app"}},
			Groups:   []*agentcfg.UserAccessGroupCF{{Id: "group/sub"}},
		}},
	},
	{
		name: "user_access as agent",
		yaml: "user_access: {access_as: {agent: {}}, groups: [{id: g}]}\n",
		want: &agentcfg.ConfigurationFile{UserAccess: &agentcfg.UserAccessCF{
			AccessAs: &agentcfg.UserAccessAsCF{As: &agentcfg.UserAccessAsCF_Agent{Agent: &agentcfg.UserAccessAsAgentCF{}}},
			Groups:   []*agentcfg.UserAccessGroupCF{{Id: "g"}},
		}},
	},
	{
		name: "user_access without access_as",
		yaml: "user_access: {projects: [{id: p}]}\n",
		want: &agentcfg.ConfigurationFile{UserAccess: &agentcfg.UserAccessCF{
			Projects: []*agentcfg.UserAccessProjectCF{{Id: "p"}},
		}},
	},
	{
		name: "container_scanning",
		yaml: `
container_scanning:
  cadence: '0 0 * * *'
  vulnerability_report:
    namespaces: [default, kube-system]
    filters:
    - namespaces: [a]
      resources: [deployment/x]
      containers: [c]
      kinds: [Deployment, DaemonSet]
  resource_requirements:
    limits: {cpu: 800m, memory: 500Mi}
    requests: {cpu: 400m, memory: 100Mi}
`,
		want: &agentcfg.ConfigurationFile{ContainerScanning: &agentcfg.ContainerScanningCF{
			Cadence: "0 0 * * *",
			VulnerabilityReport: &agentcfg.VulnerabilityReport{
				Namespaces: []string{"default", "kube-system"},
				Filters: []*agentcfg.ContainerScanningFilter{{
					Namespaces: []string{"a"},
					Resources:  []string{"deployment/x"},
					Containers: []string{"c"},
					Kinds:      []string{"Deployment", "DaemonSet"},
				}},
			},
			ResourceRequirements: &agentcfg.ResourceRequirements{
				Limits:   &agentcfg.Resource{Cpu: "800m", Memory: "500Mi"},
				Requests: &agentcfg.Resource{Cpu: "400m", Memory: "100Mi"},
			},
		}},
	},
	{
		name: "remote_development",
		yaml: `
remote_development:
  enabled: true
  dns_zone: workspaces.example.dev
  partial_sync_interval: 10s
  full_sync_interval: 3600s
  gitlab_workspaces_proxy:
    namespace: gitlab-workspaces
  network_policy:
    enabled: false
`,
		want: &agentcfg.ConfigurationFile{RemoteDevelopment: &agentcfg.RemoteDevelopmentCF{
			Enabled:               true,
			DnsZone:               "workspaces.example.dev",
			PartialSyncInterval:   dur(10, 0),
			FullSyncInterval:      dur(3600, 0),
			GitlabWorkspacesProxy: &agentcfg.GitLabWorkspacesProxy{Namespace: "gitlab-workspaces"},
			NetworkPolicy:         &agentcfg.WorkspaceNetworkPolicy{Enabled: ptr(false)},
		}},
	},
	{
		name: "flux",
		yaml: "flux:\n  webhook_receiver_url: http://receiver.flux.svc:9292\n",
		want: &agentcfg.ConfigurationFile{Flux: &agentcfg.FluxCF{WebhookReceiverUrl: "http://receiver.flux.svc:9292"}},
	},
	{
		name: "YAML 1.1 booleans",
		yaml: "remote_development: {enabled: on, network_policy: {enabled: no}}\n",
		want: &agentcfg.ConfigurationFile{RemoteDevelopment: &agentcfg.RemoteDevelopmentCF{
			Enabled: true, NetworkPolicy: &agentcfg.WorkspaceNetworkPolicy{Enabled: ptr(false)},
		}},
	},
	{
		name: "anchors and aliases",
		yaml: `
ci_access:
  projects:
  - &entry {id: shared, access_as: {ci_job: {}}}
  groups:
  - *entry
`,
		want: &agentcfg.ConfigurationFile{CiAccess: &agentcfg.CiAccessCF{
			Projects: []*agentcfg.CiAccessProjectCF{{Id: "shared", AccessAs: ciJobAs()}},
			Groups:   []*agentcfg.CiAccessGroupCF{{Id: "shared", AccessAs: ciJobAs()}},
		}},
	},
	{
		name: "a repeated key keeps the last value, as in GitLab",
		yaml: "flux: {webhook_receiver_url: a}\nflux: {webhook_receiver_url: b}\n",
		want: &agentcfg.ConfigurationFile{Flux: &agentcfg.FluxCF{WebhookReceiverUrl: "b"}},
	},
	{
		name: "a second YAML document is ignored, as in GitLab",
		yaml: "flux: {webhook_receiver_url: a}\n---\nbogus: 1\n",
		want: &agentcfg.ConfigurationFile{Flux: &agentcfg.FluxCF{WebhookReceiverUrl: "a"}},
	},
}

// refuseCases are files Parse refuses, with the whole message.
var refuseCases = []struct {
	name, yaml, err string
}{
	// Unknown fields.
	{"unknown top-level field", "ci_acess: {}\n", `unknown field "ci_acess"`},
	{"unknown nested field", "ci_access:\n  projects:\n  - id: a\n    access_as:\n      impersonat: {}\n",
		`ci_access.projects[0].access_as: unknown field "impersonat"`},
	{"camelCase name", "ciAccess: {}\n", `unknown field "ciAccess" (did you mean "ci_access"?)`},
	{"camelCase nested name", "ci_access: {projects: [{id: a, defaultNamespace: x}]}\n",
		`ci_access.projects[0]: unknown field "defaultNamespace" (did you mean "default_namespace"?)`},
	{"removed gitops charts", "gitops: {charts: []}\n", `gitops: unknown field "charts"`},
	{"user_access entry with more than id", "user_access: {projects: [{id: a, access_as: {agent: {}}}]}\n",
		`user_access.projects[0]: unknown field "access_as"`},
	{"alias where the shape differs", "ci_access: {projects: [&p {id: a, access_as: {agent: {}}}]}\nuser_access: {projects: [*p]}\n",
		`user_access.projects[0]: unknown field "access_as"`},
	{"AgentConfiguration-only field", "agent_id: 5\n", `unknown field "agent_id"`},
	{"newer ci_access field", "ci_access: {projects: [{id: a, protected_branches_only: true}]}\n",
		`ci_access.projects[0]: unknown field "protected_branches_only"`},

	// Wrong shapes and types.
	{"top-level list", "- a\n", "want an object, got a list"},
	{"top-level string", "hello\n", `want an object, got "hello"`},
	{"section is a list", "ci_access: []\n", "ci_access: want an object, got a list"},
	{"section is a string", "flux: yes please\n", `flux: want an object, got "yes please"`},
	{"list is an object", "ci_access: {projects: {id: a}}\n", "ci_access.projects: want a list, got an object"},
	{"list is a string", "ci_access: {projects: [{id: a, environments: prod}]}\n",
		`ci_access.projects[0].environments: want a list, got "prod"`},
	{"null list item", "ci_access:\n  projects:\n  -\n", "ci_access.projects[0]: want an object, got null"},
	{"null string item", "ci_access: {projects: [{id: a, environments: [~]}]}\n",
		"ci_access.projects[0].environments[0]: want a string, got null"},
	{"number for a string", "ci_access: {projects: [{id: 42}]}\n",
		"ci_access.projects[0].id: want a string, got number 42; quote the value to make it a string"},
	{"boolean for a string", "remote_development: {dns_zone: no}\n",
		"remote_development.dns_zone: want a string, got boolean false; quote the value to make it a string (YAML reads yes, no, on, off, true and false as booleans)"},
	{"object for a string", "flux: {webhook_receiver_url: {a: b}}\n",
		"flux.webhook_receiver_url: want a string, got an object"},
	{"string for a boolean", `remote_development: {enabled: "true"}` + "\n",
		`remote_development.enabled: want a boolean, got "true"`},
	{"number for a boolean", "observability: {google_profiler: {enabled: 1}}\n",
		"observability.google_profiler.enabled: want a boolean, got number 1"},
	{"unknown log level", "observability: {logging: {level: verbose}}\n",
		`observability.logging.level: invalid value "verbose": want one of info, debug, warn, error`},
	{"log level in capitals", "observability: {logging: {grpc_level: DEBUG}}\n",
		`observability.logging.grpc_level: invalid value "DEBUG": want one of info, debug, warn, error`},
	{"undefined log level number", "observability: {logging: {level: 7}}\n",
		`observability.logging.level: invalid value number 7: want one of info, debug, warn, error`},
	{"log level boolean", "observability: {logging: {level: true}}\n",
		`observability.logging.level: want one of info, debug, warn, error, got boolean true`},
	{"duration without unit", "remote_development: {partial_sync_interval: 10}\n",
		`remote_development.partial_sync_interval: want a duration such as "300s", got number 10`},
	{"duration in minutes", "gitops: {manifest_projects: [{reconcile_timeout: 5m}]}\n",
		`gitops.manifest_projects[0].reconcile_timeout: invalid duration "5m": want a number of seconds followed by "s", such as "300s" or "1.5s"`},
	{"duration out of range", "gitops: {manifest_projects: [{prune_timeout: 999999999999999s}]}\n",
		`gitops.manifest_projects[0].prune_timeout: invalid duration "999999999999999s": want a number of seconds followed by "s", such as "300s" or "1.5s"`},

	// Oneofs.
	{"access_as empty", "ci_access: {projects: [{id: a, access_as: {}}]}\n",
		`ci_access.projects[0].access_as: must set one of agent, impersonate or ci_job, such as "agent: {}"`},
	{"access_as member without value", "ci_access:\n  groups:\n  - id: a\n    access_as:\n      agent:\n",
		`ci_access.groups[0].access_as: must set one of agent, impersonate or ci_job, such as "agent: {}"`},
	{"access_as two members", "ci_access: {projects: [{id: a, access_as: {agent: {}, ci_job: {}}}]}\n",
		`ci_access.projects[0].access_as: only one of agent, impersonate or ci_job may be set, not both "agent" and "ci_job"`},
	{"user_access access_as empty", "user_access: {access_as: {}}\n",
		`user_access.access_as: must set one of agent or user, such as "agent: {}"`},
	{"user_access access_as two members", "user_access: {access_as: {agent: {}, user: {}}}\n",
		`user_access.access_as: only one of agent or user may be set, not both "agent" and "user"`},
	{"ref empty", "gitops: {manifest_projects: [{id: a, ref: {}}]}\n",
		"gitops.manifest_projects[0].ref: must set one of tag, branch or commit"},
	{"ref two members", "gitops: {manifest_projects: [{id: a, ref: {branch: a, tag: b}}]}\n",
		`gitops.manifest_projects[0].ref: only one of tag, branch or commit may be set, not both "branch" and "tag"`},

	// Validation rules.
	{"ci_access project id missing", "ci_access: {projects: [{default_namespace: a}]}\n",
		"ci_access.projects[0].id: must not be empty"},
	{"ci_access group id empty", "ci_access: {groups: [{id: a}, {id: ''}]}\n",
		"ci_access.groups[1].id: must not be empty"},
	{"ci_access environment empty", "ci_access: {projects: [{id: a, environments: [prod, '']}]}\n",
		"ci_access.projects[0].environments[1]: must not be empty"},
	{"ci_access group environment empty", "ci_access: {groups: [{id: a, environments: ['']}]}\n",
		"ci_access.groups[0].environments[0]: must not be empty"},
	{"impersonate username missing", "ci_access: {projects: [{id: a, access_as: {impersonate: {groups: [g]}}}]}\n",
		"ci_access.projects[0].access_as.impersonate.username: must not be empty"},
	{"impersonate group empty", "ci_access: {groups: [{id: a, access_as: {impersonate: {username: u, groups: ['']}}}]}\n",
		"ci_access.groups[0].access_as.impersonate.groups[0]: must not be empty"},
	{"extra key empty", "ci_access: {projects: [{id: a, access_as: {impersonate: {username: u, extra: [{val: [v]}]}}}]}\n",
		"ci_access.projects[0].access_as.impersonate.extra[0].key: must not be empty"},
	{"extra val missing", "ci_access: {projects: [{id: a, access_as: {impersonate: {username: u, extra: [{key: k}]}}}]}\n",
		"ci_access.projects[0].access_as.impersonate.extra[0].val: must have at least one value"},
	{"extra val empty list", "ci_access: {projects: [{id: a, access_as: {impersonate: {username: u, extra: [{key: k, val: []}]}}}]}\n",
		"ci_access.projects[0].access_as.impersonate.extra[0].val: must have at least one value"},
	{"extra val item empty", "ci_access: {projects: [{id: a, access_as: {impersonate: {username: u, extra: [{key: k, val: [x, '']}]}}}]}\n",
		"ci_access.projects[0].access_as.impersonate.extra[0].val[1]: must not be empty"},
	{"user_access project id empty", "user_access: {projects: [{id: ''}]}\n",
		"user_access.projects[0].id: must not be empty"},
	{"user_access group id missing", "user_access: {groups: [{}]}\n",
		"user_access.groups[0].id: must not be empty"},
	{"manifest project id empty", "gitops: {manifest_projects: [{id: ''}]}\n",
		"gitops.manifest_projects[0].id: must not be empty"},
	{"manifest glob empty", "gitops: {manifest_projects: [{id: a, paths: [{glob: x}, {}]}]}\n",
		"gitops.manifest_projects[0].paths[1].glob: must not be empty"},
	{"dry_run_strategy unknown", "gitops: {manifest_projects: [{id: a, dry_run_strategy: all}]}\n",
		`gitops.manifest_projects[0].dry_run_strategy: invalid value "all": want one of none, client or server`},
	{"prune_propagation_policy unknown", "gitops: {manifest_projects: [{id: a, prune_propagation_policy: Foreground}]}\n",
		`gitops.manifest_projects[0].prune_propagation_policy: invalid value "Foreground": want one of orphan, background or foreground`},
	{"inventory_policy unknown", "gitops: {manifest_projects: [{id: a, inventory_policy: adopt}]}\n",
		`gitops.manifest_projects[0].inventory_policy: invalid value "adopt": want one of must_match, adopt_if_no_inventory or adopt_all`},
	{"ref tag empty", "gitops: {manifest_projects: [{id: a, ref: {tag: ''}}]}\n",
		"gitops.manifest_projects[0].ref.tag: must not be empty"},
	{"ref branch empty", "gitops: {manifest_projects: [{id: a, ref: {branch: ''}}]}\n",
		"gitops.manifest_projects[0].ref.branch: must not be empty"},
	{"ref commit empty", "gitops: {manifest_projects: [{id: a, ref: {commit: ''}}]}\n",
		"gitops.manifest_projects[0].ref.commit: must not be empty"},
	{"container_scanning without cadence", "container_scanning: {vulnerability_report: {namespaces: [a]}}\n",
		"container_scanning.cadence: must not be empty"},
	{"partial_sync_interval zero", "remote_development: {partial_sync_interval: 0s}\n",
		"remote_development.partial_sync_interval: must be greater than 0s"},
	{"full_sync_interval negative", "remote_development: {full_sync_interval: -0.5s}\n",
		"remote_development.full_sync_interval: must be greater than 0s"},

	// Not YAML.
	{"YAML syntax error", "ci_access:\n  projects: [\n", "invalid YAML: yaml: line 2: did not find expected node content"},
	{"tab indentation", "ci_access:\n\tprojects: []\n", "invalid YAML: yaml: line 2: found character that cannot start any token"},
	{"infinity", "remote_development: {dns_zone: .inf}\n", "invalid YAML: json: unsupported value: +Inf"},
}

func TestParseAccepts(t *testing.T) {
	for _, c := range acceptCases {
		t.Run(c.name, func(t *testing.T) {
			got, err := Parse([]byte(c.yaml))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if !proto.Equal(got, c.want) {
				t.Errorf("Parse:\n got %v\nwant %v", prototext.Format(got), prototext.Format(c.want))
			}
		})
	}
}

func TestParseRefuses(t *testing.T) {
	for _, c := range refuseCases {
		t.Run(c.name, func(t *testing.T) {
			got, err := Parse([]byte(c.yaml))
			if err == nil {
				t.Fatalf("Parse accepted it: %v", prototext.Format(got))
			}
			if got != nil {
				t.Errorf("Parse returned a configuration with its error")
			}
			if err.Error() != c.err {
				t.Errorf("Parse error\n got %s\nwant %s", err, c.err)
			}
			var e *Error
			if !errors.As(err, &e) {
				t.Errorf("error %T is not an *Error", err)
			}
		})
	}
}

func TestParseErrorPath(t *testing.T) {
	_, err := Parse([]byte("ci_access: {projects: [{id: a}, {id: b, access_as: {impersonat: {}}}]}"))
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v is not an *Error", err)
	}
	if e.Path != "ci_access.projects[1].access_as" || e.Msg != `unknown field "impersonat"` {
		t.Errorf("got Path %q, Msg %q", e.Path, e.Msg)
	}
}

func TestParseSizeLimit(t *testing.T) {
	// A valid file padded with a comment to exactly n bytes.
	file := func(n int) []byte {
		head := "flux: {webhook_receiver_url: http://x}\n#"
		return []byte(head + strings.Repeat("x", n-len(head)-1) + "\n")
	}
	if MaxFileSize != 128*1024 {
		t.Fatalf("MaxFileSize = %d, want 128 KiB", MaxFileSize)
	}

	at := file(MaxFileSize)
	if len(at) != MaxFileSize {
		t.Fatalf("test file is %d bytes", len(at))
	}
	f, err := Parse(at)
	if err != nil {
		t.Fatalf("Parse of exactly %d bytes: %v", len(at), err)
	}
	if f.GetFlux().GetWebhookReceiverUrl() != "http://x" {
		t.Errorf("Parse of exactly %d bytes: got %v", len(at), f)
	}

	over := file(MaxFileSize + 1)
	f, err = Parse(over)
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("Parse of %d bytes: got %v, %v; want ErrTooLarge", len(over), f, err)
	}
	if f != nil {
		t.Errorf("Parse of %d bytes returned a configuration", len(over))
	}
	want := "configuration file is 131073 bytes, more than the limit of 131072 (128 KiB): configuration file too large"
	if err.Error() != want {
		t.Errorf("error\n got %s\nwant %s", err, want)
	}

	// The limit is on the bytes, not on what they hold.
	if _, err := Parse([]byte(strings.Repeat(" ", MaxFileSize+1))); !errors.Is(err, ErrTooLarge) {
		t.Errorf("Parse of %d blanks: %v, want ErrTooLarge", MaxFileSize+1, err)
	}
}

func TestParseReturnsFreshConfiguration(t *testing.T) {
	a, err := Parse(nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Parse(nil)
	if err != nil {
		t.Fatal(err)
	}
	if a == nil || a == b {
		t.Fatalf("Parse(nil) = %p, %p; want two distinct empty configurations", a, b)
	}
}
