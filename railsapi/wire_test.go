package railsapi

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/caddy-kas/caddy-kas/railsapi/pb/agenttracker"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/agenttrackerrpc"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/configprojectrpc"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/notificationsrpc"
	"github.com/caddy-kas/caddy-kas/railsapi/pb/serverinforpc"
)

// The tests here build messages byte by byte from the field numbers in the
// GitLab wire contract (gitlab-wire A.2 to A.6) and decode them with the
// generated code: a wrong number in our .proto files would leave a field
// empty or land it in the wrong place.

// wire builds a message from fields.
type wire []byte

func (w wire) str(num protowire.Number, s string) wire {
	w = protowire.AppendTag(w, num, protowire.BytesType)
	return protowire.AppendString(w, s)
}

func (w wire) msg(num protowire.Number, m wire) wire {
	w = protowire.AppendTag(w, num, protowire.BytesType)
	return protowire.AppendBytes(w, m)
}

func (w wire) varint(num protowire.Number, v int64) wire {
	w = protowire.AppendTag(w, num, protowire.VarintType)
	return protowire.AppendVarint(w, uint64(v))
}

// packed appends a packed repeated int64 field.
func (w wire) packed(num protowire.Number, vs ...int64) wire {
	var b []byte
	for _, v := range vs {
		b = protowire.AppendVarint(b, uint64(v))
	}
	w = protowire.AppendTag(w, num, protowire.BytesType)
	return protowire.AppendBytes(w, b)
}

// connectedAgentWire is a ConnectedAgentInfo as GitLab's KAS sends it.
func connectedAgentWire() wire {
	k8s := wire{}.str(1, "1").str(2, "32").str(3, "v1.32.13").str(4, "linux/amd64")
	meta := wire{}.str(1, "v17.0.0").str(2, "06dbc13d").str(3, "gitlab-agent").str(4, "agentk-7d9f").msg(5, k8s)
	ts := wire{}.varint(1, 1700000000).varint(2, 500)
	warning := wire{}.msg(1, wire{}.str(1, "agent_version_mismatch").str(2, "versions differ"))
	return wire{}.msg(1, meta).msg(2, ts).varint(3, 8123456789).varint(4, 7).varint(5, 42).msg(6, warning)
}

func unmarshal(t *testing.T, b []byte, m proto.Message) {
	t.Helper()
	if err := proto.Unmarshal(b, m); err != nil {
		t.Fatal(err)
	}
	if u := m.ProtoReflect().GetUnknown(); len(u) != 0 {
		t.Fatalf("%T: fields with unknown numbers: %x", m, u)
	}
}

func checkConnectedAgent(t *testing.T, a *agenttracker.ConnectedAgentInfo) {
	t.Helper()
	m := a.GetAgentMeta()
	k := m.GetKubernetesVersion()
	switch {
	case m.GetVersion() != "v17.0.0", m.GetCommitId() != "06dbc13d", m.GetPodNamespace() != "gitlab-agent", m.GetPodName() != "agentk-7d9f":
		t.Errorf("agent_meta = %v", m)
	case k.GetMajor() != "1", k.GetMinor() != "32", k.GetGitVersion() != "v1.32.13", k.GetPlatform() != "linux/amd64":
		t.Errorf("kubernetes_version = %v", k)
	case a.GetConnectedAt().GetSeconds() != 1700000000, a.GetConnectedAt().GetNanos() != 500:
		t.Errorf("connected_at = %v", a.GetConnectedAt())
	case a.GetConnectionId() != 8123456789, a.GetAgentId() != 7, a.GetProjectId() != 42:
		t.Errorf("connection_id, agent_id, project_id = %d, %d, %d", a.GetConnectionId(), a.GetAgentId(), a.GetProjectId())
	case len(a.GetWarnings()) != 1, a.GetWarnings()[0].GetVersion().GetType() != "agent_version_mismatch", a.GetWarnings()[0].GetVersion().GetMessage() != "versions differ":
		t.Errorf("warnings = %v", a.GetWarnings())
	}
}

func TestWireConnectedAgentInfo(t *testing.T) {
	b := connectedAgentWire()
	var a agenttracker.ConnectedAgentInfo
	unmarshal(t, b, &a)
	checkConnectedAgent(t, &a)
	// And back: what we send is what GitLab's KAS would.
	out, err := proto.MarshalOptions{Deterministic: true}.Marshal(&a)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out, b) {
		t.Errorf("marshal:\n got %x\nwant %x", out, []byte(b))
	}
}

// Every response of the agent tracker carries the agents in field 1.
func TestWireAgentTrackerResponses(t *testing.T) {
	b := wire{}.msg(1, connectedAgentWire())
	type resp interface {
		proto.Message
		GetAgents() []*agenttracker.ConnectedAgentInfo
	}
	for _, r := range []resp{
		&agenttrackerrpc.GetConnectedAgentsResponse{},
		&agenttrackerrpc.GetConnectedAgentsByAgentIdsResponse{},
		&agenttrackerrpc.GetConnectedAgentsByAgentIDsResponse{},
		&agenttrackerrpc.GetConnectedAgentksByAgentIDsResponse{},
		&agenttrackerrpc.GetConnectedAgentsByProjectIdsResponse{},
		&agenttrackerrpc.GetConnectedAgentsByProjectIDsResponse{},
	} {
		t.Run(string(r.ProtoReflect().Descriptor().Name()), func(t *testing.T) {
			unmarshal(t, b, r)
			if len(r.GetAgents()) != 1 {
				t.Fatalf("agents = %v", r.GetAgents())
			}
			checkConnectedAgent(t, r.GetAgents()[0])
		})
	}
}

// The id lists are field 1, packed as proto3 writes them, or unpacked as
// a proto2 writer might; a parser must take both.
func TestWireAgentTrackerRequests(t *testing.T) {
	encodings := map[string]wire{
		"packed":   wire{}.packed(1, 3, 1, 300),
		"unpacked": wire{}.varint(1, 3).varint(1, 1).varint(1, 300),
	}
	type agentReq interface {
		proto.Message
		GetAgentIds() []int64
	}
	type projectReq interface {
		proto.Message
		GetProjectIds() []int64
	}
	for enc, b := range encodings {
		for _, r := range []agentReq{
			&agenttrackerrpc.GetConnectedAgentsByAgentIdsRequest{},
			&agenttrackerrpc.GetConnectedAgentsByAgentIDsRequest{},
			&agenttrackerrpc.GetConnectedAgentksByAgentIDsRequest{},
		} {
			t.Run(enc+"/"+string(r.ProtoReflect().Descriptor().Name()), func(t *testing.T) {
				unmarshal(t, b, r)
				if got := r.GetAgentIds(); len(got) != 3 || got[0] != 3 || got[1] != 1 || got[2] != 300 {
					t.Errorf("agent_ids = %v", got)
				}
			})
		}
		for _, r := range []projectReq{
			&agenttrackerrpc.GetConnectedAgentsByProjectIdsRequest{},
			&agenttrackerrpc.GetConnectedAgentsByProjectIDsRequest{},
		} {
			t.Run(enc+"/"+string(r.ProtoReflect().Descriptor().Name()), func(t *testing.T) {
				unmarshal(t, b, r)
				if got := r.GetProjectIds(); len(got) != 3 || got[0] != 3 || got[1] != 1 || got[2] != 300 {
					t.Errorf("project_ids = %v", got)
				}
			})
		}
	}

	// The 16.5 request: project_id = 1, agent_id = 2, in one oneof.
	var byProject, byAgent agenttrackerrpc.GetConnectedAgentsRequest
	unmarshal(t, wire{}.varint(1, 42), &byProject)
	unmarshal(t, wire{}.varint(2, 7), &byAgent)
	if byProject.GetProjectId() != 42 || byAgent.GetAgentId() != 7 || byProject.GetAgentId() != 0 {
		t.Errorf("GetConnectedAgentsRequest: project %v, agent %v", &byProject, &byAgent)
	}

	// The version counts: agent_versions = 1, a map of string to int64.
	var counts agenttrackerrpc.CountAgentsByAgentVersionsResponse
	unmarshal(t, wire{}.msg(1, wire{}.str(1, "v17.0.0").varint(2, 3)).msg(1, wire{}.str(1, "v17.1.0").varint(2, 1)), &counts)
	if v := counts.GetAgentVersions(); len(v) != 2 || v["v17.0.0"] != 3 || v["v17.1.0"] != 1 {
		t.Errorf("agent_versions = %v", v)
	}
}

func TestWireOtherServices(t *testing.T) {
	var push notificationsrpc.GitPushEventRequest
	unmarshal(t, wire{}.msg(1, wire{}.msg(1, wire{}.varint(1, 7).str(2, "group/project"))), &push)
	if p := push.GetEvent().GetProject(); p.GetId() != 7 || p.GetFullPath() != "group/project" {
		t.Errorf("GitPushEventRequest = %v", &push)
	}

	var info serverinforpc.GetServerInfoResponse
	unmarshal(t, wire{}.msg(1, wire{}.str(1, "v17.0.0-rc1-24-g06dbc13d").str(2, "06dbc13d")), &info)
	if si := info.GetCurrentServerInfo(); si.GetVersion() != "v17.0.0-rc1-24-g06dbc13d" || si.GetGitRef() != "06dbc13d" {
		t.Errorf("GetServerInfoResponse = %v", &info)
	}

	repo := wire{}.str(2, "default").str(3, "@hashed/aa/bb.git").str(4, "objects").str(5, "alt1").str(5, "alt2").str(6, "project-1").str(8, "group/project")
	gitaly := wire{}.str(1, "tcp://gitaly:8075").str(2, "token").msg(3, wire{}.str(1, "gitaly-feature-x").str(2, "true"))
	var list configprojectrpc.ListAgentConfigFilesRequest
	unmarshal(t, wire{}.msg(1, repo).msg(2, gitaly).str(3, "main"), &list)
	r, g := list.GetRepository(), list.GetGitalyInfo()
	if r.GetStorageName() != "default" || r.GetRelativePath() != "@hashed/aa/bb.git" || r.GetGitObjectDirectory() != "objects" ||
		len(r.GetGitAlternateObjectDirectories()) != 2 || r.GetGlRepository() != "project-1" || r.GetGlProjectPath() != "group/project" {
		t.Errorf("repository = %v", r)
	}
	if g.GetAddress() != "tcp://gitaly:8075" || g.GetToken() != "token" || g.GetFeatures()["gitaly-feature-x"] != "true" || list.GetDefaultBranch() != "main" {
		t.Errorf("gitaly_info = %v, default_branch = %q", g, list.GetDefaultBranch())
	}

	var files configprojectrpc.ListAgentConfigFilesResponse
	unmarshal(t, wire{}.msg(1, wire{}.str(1, ".gitlab/agents/foo/config.yaml").str(2, "foo")), &files)
	if f := files.GetConfigFiles(); len(f) != 1 || f[0].GetName() != ".gitlab/agents/foo/config.yaml" || f[0].GetAgentName() != "foo" {
		t.Errorf("ListAgentConfigFilesResponse = %v", &files)
	}
}

// The method paths Rails calls (gitlab-wire A.1); a typo in a service or
// method name shows up as "unknown service" or Unimplemented in Rails.
func TestMethodPaths(t *testing.T) {
	const tracker = "/gitlab.agent.agent_tracker.rpc.AgentTracker/"
	paths := map[string]string{
		agenttrackerrpc.AgentTracker_GetConnectedAgents_FullMethodName:             tracker + "GetConnectedAgents",
		agenttrackerrpc.AgentTracker_GetConnectedAgentsByProjectIds_FullMethodName: tracker + "GetConnectedAgentsByProjectIds",
		agenttrackerrpc.AgentTracker_GetConnectedAgentsByAgentIds_FullMethodName:   tracker + "GetConnectedAgentsByAgentIds",
		agenttrackerrpc.AgentTracker_GetConnectedAgentsByProjectIDs_FullMethodName: tracker + "GetConnectedAgentsByProjectIDs",
		agenttrackerrpc.AgentTracker_GetConnectedAgentsByAgentIDs_FullMethodName:   tracker + "GetConnectedAgentsByAgentIDs",
		agenttrackerrpc.AgentTracker_GetConnectedAgentksByAgentIDs_FullMethodName:  tracker + "GetConnectedAgentksByAgentIDs",
		agenttrackerrpc.AgentTracker_CountAgentsByAgentVersions_FullMethodName:     tracker + "CountAgentsByAgentVersions",
		notificationsrpc.Notifications_GitPushEvent_FullMethodName:                 "/gitlab.agent.notifications.rpc.Notifications/GitPushEvent",
		serverinforpc.ServerInfo_GetServerInfo_FullMethodName:                      "/gitlab.agent.server_info.rpc.ServerInfo/GetServerInfo",
		configprojectrpc.ConfigurationProject_ListAgentConfigFiles_FullMethodName:  "/gitlab.agent.configuration_project.rpc.ConfigurationProject/ListAgentConfigFiles",
	}
	for got, want := range paths {
		if got != want {
			t.Errorf("method path %q, want %q", got, want)
		}
	}
	// The message types keep GitLab's full names too (only they matter
	// inside a google.protobuf.Any, but logs and tools show them).
	if n := (&agenttracker.ConnectedAgentInfo{}).ProtoReflect().Descriptor().FullName(); n != "gitlab.agent.agent_tracker.ConnectedAgentInfo" {
		t.Errorf("ConnectedAgentInfo full name = %s", n)
	}
}
