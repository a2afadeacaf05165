// Package tunnel is the transport between the agent server (KAS, inside
// Caddy) and agentk, the agent that runs next to a Kubernetes cluster.
//
// agentk dials out to KAS, so clusters behind NAT or a firewall can be
// reached. Once the byte stream is up, the roles flip: KAS is the HTTP/2
// client and agentk the HTTP/2 server (RFC 9113, prior knowledge, no TLS
// inside the stream because the stream itself already runs over TLS). Every
// request KAS proxies to the cluster is one HTTP/2 stream, so each request
// has its own flow control, request and response bodies stream both ways,
// and a stalled reader only stalls its own stream.
//
// Version 1 of the protocol carries the HTTP/2 connection in binary
// WebSocket messages (RFC 6455) negotiated with the subprotocol
// [Subprotocol]. The framing is done here rather than by a WebSocket
// library, so that an HTTP/2 write costs one frame, one TLS record and one
// system call, and an idle tunnel holds no buffer but 512 bytes; the tests
// hold it to github.com/coder/websocket. The handshake request carries the agent token as
// "Authorization: Bearer <token>" and the agent's metadata ([AgentMeta]).
// Any other byte-stream transport that yields a [net.Conn] (a plain HTTP/2
// stream, say) plugs into the same [Conn] and [Registry].
//
// On the KAS side a connection is a [*Conn], which is an [http.RoundTripper];
// connections are kept in a [Registry] by agent id. On the agent side,
// [Serve] runs an [http.Handler] (a reverse proxy to the kube-apiserver) on
// the connection.
//
// The identity a request must act as travels from KAS to agentk in the
// [IdentityHeader] request header. KAS always removes any client-supplied
// copy before setting its own, so agentk can trust it: nothing but KAS can
// write to the tunnel.
//
// This package imports no Caddy package.
package tunnel
