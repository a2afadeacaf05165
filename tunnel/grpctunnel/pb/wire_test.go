// Package pb_test checks the wire facts of the generated agentk <-> KAS code that GitLab's agentk depends
// on: full method names, Any type URLs, message names and field numbers.
package pb_test

import (
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/caddy-kas/caddy-kas/railsapi/pb/entity"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentcfg"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentconfigurationrpc"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentregistrarrpc"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/grpctool"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/kubernetesapirpc"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/prototool"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/reversetunnelinfo"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/reversetunnelrpc"
)

// agentk unpacks the extra field of the request header by type URL; any other name and it ignores the
// impersonation.
func TestHeaderExtraTypeURL(t *testing.T) {
	want := &kubernetesapirpc.HeaderExtra{ImpConfig: &kubernetesapirpc.ImpersonationConfig{
		Username: "alice",
		Groups:   []string{"dev"},
		Extra:    []*kubernetesapirpc.ExtraKeyVal{{Key: "scopes", Val: []string{"a", "b"}}},
	}}
	extra, err := anypb.New(want)
	if err != nil {
		t.Fatal(err)
	}
	const url = "type.googleapis.com/gitlab.agent.kubernetes_api.rpc.HeaderExtra"
	if extra.GetTypeUrl() != url {
		t.Fatalf("type URL = %q, want %q", extra.GetTypeUrl(), url)
	}

	// Through a whole request frame and back.
	b, err := proto.Marshal(&grpctool.HttpRequest{Message: &grpctool.HttpRequest_Header_{Header: &grpctool.HttpRequest_Header{
		Request:       &prototool.HttpRequest{Method: "GET", UrlPath: "/api"},
		Extra:         extra,
		ContentLength: proto.Int64(0),
	}}})
	if err != nil {
		t.Fatal(err)
	}
	var req grpctool.HttpRequest
	if err := proto.Unmarshal(b, &req); err != nil {
		t.Fatal(err)
	}
	got, err := req.GetHeader().GetExtra().UnmarshalNew()
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(got, want) {
		t.Fatalf("extra = %v, want %v", got, want)
	}
	if req.GetHeader().ContentLength == nil {
		t.Fatal("content_length 0 was lost; it must keep its presence")
	}
}

// Error.status is bytes here and google.rpc.Status in GitLab's proto: both must give the same bytes, and
// the bytes must decode as a google.rpc.Status.
func TestConnectRequestErrorStatus(t *testing.T) {
	st, err := proto.Marshal(status.New(codes.PermissionDenied, "no access to the cluster").Proto())
	if err != nil {
		t.Fatal(err)
	}
	b, err := proto.Marshal(&reversetunnelrpc.ConnectRequest{Msg: &reversetunnelrpc.ConnectRequest_Error{
		Error: &reversetunnelrpc.Error{Status: st},
	}})
	if err != nil {
		t.Fatal(err)
	}

	// What GitLab's encoding of a message-typed field 5 { field 1: Status } looks like.
	inner := protowire.AppendTag(nil, 1, protowire.BytesType)
	inner = protowire.AppendBytes(inner, st)
	gitlab := protowire.AppendTag(nil, 5, protowire.BytesType)
	gitlab = protowire.AppendBytes(gitlab, inner)
	if string(b) != string(gitlab) {
		t.Fatalf("wire bytes = %x, want %x", b, gitlab)
	}

	var req reversetunnelrpc.ConnectRequest
	if err := proto.Unmarshal(b, &req); err != nil {
		t.Fatal(err)
	}
	decoded := status.New(codes.OK, "").Proto() // a fresh google.rpc.Status of genproto's package
	if err := proto.Unmarshal(req.GetError().GetStatus(), decoded); err != nil {
		t.Fatal(err)
	}
	if got := decoded.ProtoReflect().Descriptor().FullName(); got != "google.rpc.Status" {
		t.Fatalf("decoded into %s", got)
	}
	s := status.FromProto(decoded)
	if s.Code() != codes.PermissionDenied || s.Message() != "no access to the cluster" {
		t.Fatalf("status = %v %q", s.Code(), s.Message())
	}
}

func TestFullMethodNames(t *testing.T) {
	tests := []struct {
		desc grpc.ServiceDesc
		name string // the stream or method name in desc
		want string
	}{
		{reversetunnelrpc.ReverseTunnel_ServiceDesc, "Connect", "/gitlab.agent.reverse_tunnel.rpc.ReverseTunnel/Connect"},
		{kubernetesapirpc.KubernetesApi_ServiceDesc, "MakeRequest", "/gitlab.agent.kubernetes_api.rpc.KubernetesApi/MakeRequest"},
		{agentregistrarrpc.AgentRegistrar_ServiceDesc, "Register", "/gitlab.agent.agent_registrar.rpc.AgentRegistrar/Register"},
		{agentconfigurationrpc.AgentConfiguration_ServiceDesc, "GetConfiguration", "/gitlab.agent.agent_configuration.rpc.AgentConfiguration/GetConfiguration"},
	}
	for _, tt := range tests {
		found := false
		for _, m := range tt.desc.Methods {
			found = found || m.MethodName == tt.name
		}
		for _, s := range tt.desc.Streams {
			found = found || s.StreamName == tt.name
		}
		if !found {
			t.Errorf("%s has no method %s", tt.desc.ServiceName, tt.name)
		}
		if got := "/" + tt.desc.ServiceName + "/" + tt.name; got != tt.want {
			t.Errorf("method = %s, want %s", got, tt.want)
		}
	}
	// The generated constants that callers use.
	for got, want := range map[string]string{
		reversetunnelrpc.ReverseTunnel_Connect_FullMethodName:                    tests[0].want,
		kubernetesapirpc.KubernetesApi_MakeRequest_FullMethodName:                tests[1].want,
		agentregistrarrpc.AgentRegistrar_Register_FullMethodName:                 tests[2].want,
		agentconfigurationrpc.AgentConfiguration_GetConfiguration_FullMethodName: tests[3].want,
	} {
		if got != want {
			t.Errorf("constant = %s, want %s", got, want)
		}
	}
	// Streaming kinds.
	for _, tt := range []struct {
		desc           grpc.ServiceDesc
		client, server bool
	}{
		{reversetunnelrpc.ReverseTunnel_ServiceDesc, true, true},
		{kubernetesapirpc.KubernetesApi_ServiceDesc, true, true},
		{agentconfigurationrpc.AgentConfiguration_ServiceDesc, false, true},
	} {
		s := tt.desc.Streams[0]
		if s.ClientStreams != tt.client || s.ServerStreams != tt.server {
			t.Errorf("%s/%s: client streams %v, server streams %v", tt.desc.ServiceName, s.StreamName, s.ClientStreams, s.ServerStreams)
		}
	}
	if n := len(agentregistrarrpc.AgentRegistrar_ServiceDesc.Methods); n != 1 {
		t.Errorf("AgentRegistrar has %d unary methods, want 1", n)
	}
}

// TestFieldNumbers compares a sample of fields with GitLab's tables: message full name, field number, kind
// and oneof.
func TestFieldNumbers(t *testing.T) {
	type field struct {
		name  protoreflect.Name
		num   protoreflect.FieldNumber
		kind  protoreflect.Kind
		oneof protoreflect.Name // "" when the field is in no oneof (or only in a synthetic one)
	}
	const (
		msg   = protoreflect.MessageKind
		str   = protoreflect.StringKind
		i64   = protoreflect.Int64Kind
		i32   = protoreflect.Int32Kind
		bytes = protoreflect.BytesKind
		boolk = protoreflect.BoolKind
		enum  = protoreflect.EnumKind
	)
	tests := []struct {
		m        proto.Message
		fullName protoreflect.FullName
		fields   []field
		reserved []protoreflect.FieldNumber
	}{
		{m: &reversetunnelrpc.ConnectRequest{}, fullName: "gitlab.agent.reverse_tunnel.rpc.ConnectRequest", fields: []field{
			{"descriptor", 1, msg, "msg"}, {"header", 2, msg, "msg"}, {"message", 3, msg, "msg"},
			{"trailer", 4, msg, "msg"}, {"error", 5, msg, "msg"},
		}},
		{m: &reversetunnelrpc.ConnectResponse{}, fullName: "gitlab.agent.reverse_tunnel.rpc.ConnectResponse", fields: []field{
			{"request_info", 1, msg, "msg"}, {"message", 2, msg, "msg"}, {"close_send", 3, msg, "msg"},
		}},
		{m: &reversetunnelrpc.Descriptor{}, fullName: "gitlab.agent.reverse_tunnel.rpc.Descriptor", fields: []field{
			{"agent_descriptor", 1, msg, ""},
		}},
		{m: &reversetunnelrpc.Header{}, fullName: "gitlab.agent.reverse_tunnel.rpc.Header", fields: []field{{"meta", 1, msg, ""}}},
		{m: &reversetunnelrpc.Message{}, fullName: "gitlab.agent.reverse_tunnel.rpc.Message", fields: []field{{"data", 1, bytes, ""}}},
		{m: &reversetunnelrpc.Error{}, fullName: "gitlab.agent.reverse_tunnel.rpc.Error", fields: []field{{"status", 1, bytes, ""}}},
		{m: &reversetunnelrpc.RequestInfo{}, fullName: "gitlab.agent.reverse_tunnel.rpc.RequestInfo", fields: []field{
			{"method_name", 1, str, ""}, {"meta", 2, msg, ""},
		}},
		{m: &reversetunnelinfo.Service{}, fullName: "gitlab.agent.reverse_tunnel.info.Service", fields: []field{
			{"name", 1, str, ""}, {"methods", 2, msg, ""},
		}},
		{m: &prototool.Values{}, fullName: "gitlab.agent.prototool.Values", fields: []field{{"value", 1, str, ""}}},
		{m: &prototool.HttpRequest{}, fullName: "gitlab.agent.prototool.HttpRequest", fields: []field{
			{"method", 1, str, ""}, {"header", 2, msg, ""}, {"url_path", 3, str, ""}, {"query", 4, msg, ""},
		}},
		{m: &prototool.HttpResponse{}, fullName: "gitlab.agent.prototool.HttpResponse", fields: []field{
			{"status_code", 1, i32, ""}, {"status", 2, str, ""}, {"header", 3, msg, ""},
		}},
		{m: &grpctool.HttpRequest{}, fullName: "gitlab.agent.grpctool.HttpRequest", fields: []field{
			{"header", 1, msg, "message"}, {"data", 2, msg, "message"}, {"trailer", 3, msg, "message"},
			{"upgradeData", 4, msg, "message"},
		}},
		{m: &grpctool.HttpRequest_Header{}, fullName: "gitlab.agent.grpctool.HttpRequest.Header", fields: []field{
			{"request", 1, msg, ""}, {"extra", 2, msg, ""}, {"content_length", 3, i64, ""},
		}},
		{m: &grpctool.HttpResponse{}, fullName: "gitlab.agent.grpctool.HttpResponse", fields: []field{
			{"header", 1, msg, "message"}, {"data", 2, msg, "message"}, {"trailer", 3, msg, "message"},
			{"upgradeData", 4, msg, "message"},
		}},
		{m: &grpctool.HttpResponse_UpgradeData{}, fullName: "gitlab.agent.grpctool.HttpResponse.UpgradeData", fields: []field{
			{"data", 1, bytes, ""},
		}},
		{m: &kubernetesapirpc.ImpersonationConfig{}, fullName: "gitlab.agent.kubernetes_api.rpc.ImpersonationConfig", fields: []field{
			{"username", 1, str, ""}, {"groups", 2, str, ""}, {"uid", 3, str, ""}, {"extra", 4, msg, ""},
		}},
		{m: &agentregistrarrpc.RegisterRequest{}, fullName: "gitlab.agent.agent_registrar.rpc.RegisterRequest", fields: []field{
			{"agent_meta", 1, msg, ""}, {"pod_id", 2, i64, ""},
		}},
		{m: &agentconfigurationrpc.ConfigurationRequest{}, fullName: "gitlab.agent.agent_configuration.rpc.ConfigurationRequest", fields: []field{
			{"commit_id", 1, str, ""}, {"agent_meta", 2, msg, ""}, {"skip_register", 3, boolk, ""},
		}},
		{m: &agentconfigurationrpc.ConfigurationResponse{}, fullName: "gitlab.agent.agent_configuration.rpc.ConfigurationResponse", fields: []field{
			{"configuration", 1, msg, ""}, {"commit_id", 2, str, ""},
		}},
		{m: &agentcfg.AgentConfiguration{}, fullName: "gitlab.agent.agentcfg.AgentConfiguration", fields: []field{
			{"gitops", 1, msg, ""}, {"observability", 2, msg, ""}, {"agent_id", 4, i64, ""}, {"project_id", 5, i64, ""},
			{"ci_access", 6, msg, ""}, {"container_scanning", 7, msg, ""}, {"project_path", 8, str, ""},
			{"remote_development", 9, msg, ""}, {"flux", 10, msg, ""}, {"gitlab_external_url", 11, str, ""},
		}, reserved: []protoreflect.FieldNumber{3}},
		{m: &agentcfg.ConfigurationFile{}, fullName: "gitlab.agent.agentcfg.ConfigurationFile", fields: []field{
			{"gitops", 1, msg, ""}, {"observability", 2, msg, ""}, {"ci_access", 4, msg, ""},
			{"container_scanning", 5, msg, ""}, {"user_access", 6, msg, ""}, {"remote_development", 7, msg, ""},
			{"flux", 8, msg, ""},
		}, reserved: []protoreflect.FieldNumber{3}},
		{m: &agentcfg.ManifestProjectCF{}, fullName: "gitlab.agent.agentcfg.ManifestProjectCF", fields: []field{
			{"id", 1, str, ""}, {"default_namespace", 4, str, ""}, {"paths", 5, msg, ""},
			{"reconcile_timeout", 6, msg, ""}, {"prune", 8, boolk, "prune_oneof"}, {"ref", 12, msg, ""},
		}, reserved: []protoreflect.FieldNumber{2, 3}},
		{m: &agentcfg.LoggingCF{}, fullName: "gitlab.agent.agentcfg.LoggingCF", fields: []field{
			{"level", 1, enum, ""}, {"grpc_level", 2, enum, ""},
		}},
		{m: &agentcfg.CiAccessAsCF{}, fullName: "gitlab.agent.agentcfg.CiAccessAsCF", fields: []field{
			{"agent", 1, msg, "as"}, {"impersonate", 2, msg, "as"}, {"ci_job", 3, msg, "as"},
		}},
		{m: &agentcfg.UserAccessAsCF{}, fullName: "gitlab.agent.agentcfg.UserAccessAsCF", fields: []field{
			{"agent", 1, msg, "as"}, {"user", 3, msg, "as"},
		}, reserved: []protoreflect.FieldNumber{2}},
		{m: &agentcfg.RemoteDevelopmentCF{}, fullName: "gitlab.agent.agentcfg.RemoteDevelopmentCF", fields: []field{
			{"partial_sync_interval", 3, msg, ""}, {"full_sync_interval", 4, msg, ""}, {"network_policy", 6, msg, ""},
		}},
	}
	for _, tt := range tests {
		md := tt.m.ProtoReflect().Descriptor()
		if md.FullName() != tt.fullName {
			t.Errorf("full name %s, want %s", md.FullName(), tt.fullName)
			continue
		}
		for _, want := range tt.fields {
			fd := md.Fields().ByName(want.name)
			if fd == nil {
				t.Errorf("%s has no field %s", md.FullName(), want.name)
				continue
			}
			var oneof protoreflect.Name
			if o := fd.ContainingOneof(); o != nil && !o.IsSynthetic() {
				oneof = o.Name()
			}
			if fd.Number() != want.num || fd.Kind() != want.kind || oneof != want.oneof {
				t.Errorf("%s: number %d, kind %v, oneof %q; want %d, %v, %q",
					fd.FullName(), fd.Number(), fd.Kind(), oneof, want.num, want.kind, want.oneof)
			}
		}
		for _, n := range tt.reserved {
			if !md.ReservedRanges().Has(n) {
				t.Errorf("%s: number %d is not reserved", md.FullName(), n)
			}
		}
	}

	// Types of message fields that matter across packages.
	for _, tt := range []struct {
		fd   protoreflect.FieldDescriptor
		want protoreflect.FullName
	}{
		{(&agentregistrarrpc.RegisterRequest{}).ProtoReflect().Descriptor().Fields().ByNumber(1), "gitlab.agent.entity.AgentMeta"},
		{(&agentconfigurationrpc.ConfigurationRequest{}).ProtoReflect().Descriptor().Fields().ByNumber(2), "gitlab.agent.entity.AgentMeta"},
		{(&grpctool.HttpRequest_Header{}).ProtoReflect().Descriptor().Fields().ByNumber(2), "google.protobuf.Any"},
		{(&kubernetesapirpc.HeaderExtra{}).ProtoReflect().Descriptor().Fields().ByNumber(1), "gitlab.agent.kubernetes_api.rpc.ImpersonationConfig"},
		{(&agentcfg.ManifestProjectCF{}).ProtoReflect().Descriptor().Fields().ByNumber(6), "google.protobuf.Duration"},
		{(&reversetunnelrpc.Header{}).ProtoReflect().Descriptor().Fields().ByNumber(1).MapValue(), "gitlab.agent.prototool.Values"},
	} {
		if got := tt.fd.Message().FullName(); got != tt.want {
			t.Errorf("%s has type %s, want %s", tt.fd.FullName(), got, tt.want)
		}
	}
	// AgentMeta is railsapi's own type, not a second registration of the same name.
	var _ *entity.AgentMeta = (&agentregistrarrpc.RegisterRequest{}).GetAgentMeta()
	if fd := (&grpctool.HttpRequest_Header{}).ProtoReflect().Descriptor().Fields().ByNumber(3); !fd.HasPresence() {
		t.Error("content_length must be optional (explicit presence)")
	}
}
