// Package grpctunnel is GitLab's own tunnel protocol, the one GitLab's
// agentk speaks (gitlab-wire §B, kas-spec §4): the second [tunnel.Tunnel]
// implementation, next to our package h2tunnel, so that clusters running
// GitLab's agentk need no change when Caddy replaces GitLab's KAS.
//
// GitLab's agentk opens one gRPC connection to KAS, inside a WebSocket with
// the subprotocol [Subprotocol] (package wsconn carries the bytes). The
// WebSocket handshake carries no token: every call has its agent token in
// the "authorization: Bearer" metadata. On that connection agentk calls
//
//   - AgentRegistrar/Register, with its metadata and pod id;
//   - AgentConfiguration/GetConfiguration, a stream of the agent's
//     configuration, which this package holds open;
//   - ReverseTunnel/Connect, many times: each stream first describes the
//     services agentk serves, then waits, idle, for one request. agentk
//     keeps at least two such streams idle and opens more as they are used.
//
// One agentk connection is one [tunnel.Tunnel] ([Server.Serve]); its
// RoundTrip takes an idle Connect stream and makes one
// KubernetesApi/MakeRequest call on it. Calls to services this package
// does not serve answer the gRPC status Unimplemented.
//
// # Encoding of a proxied request
//
// A [tunnel.Request] becomes a stream of gitlab.agent.grpctool.HttpRequest
// messages, each the payload of one ConnectResponse message frame after the
// RequestInfo that names MakeRequest:
//
//   - a header with the method, path, query and headers, the content length
//     (-1 when unknown), and, when the request acts as an identity, a
//     gitlab.agent.kubernetes_api.rpc.HeaderExtra packed in an Any whose
//     impersonation config GitLab's agentk turns into Impersonate-* headers;
//   - the body in data messages, streamed as it arrives (GitLab's KAS reads
//     the whole body first; this package does not), then a trailer;
//   - for an upgrade, after the trailer, the client's bytes in upgradeData
//     messages once the cluster switched protocols.
//
// The answer comes back the same way in HttpResponse messages, in
// ConnectRequest message frames: a header (status and headers), data, a
// trailer, and for a switched protocol the cluster's bytes in upgradeData.
// RoundTrip returns as soon as the header is in, and the response body reads
// the stream as the caller reads the body, so a slow reader holds back only
// its own stream (gRPC flow control). A switched answer becomes the 101 that
// [tunnel.Request] describes.
//
// This package imports no Caddy package.
package grpctunnel
