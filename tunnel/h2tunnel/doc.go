// Package h2tunnel is caddy-kas's own tunnel protocol between KAS (inside
// Caddy) and our agentk: one [tunnel.Tunnel] implementation.
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
// WebSocket messages (package wsconn) negotiated with the subprotocol
// [Subprotocol]. The handshake request carries the agent token as
// "Authorization: Bearer <token>" and the agent's metadata
// ([SetMetaHeaders]). Any other byte stream that yields a [net.Conn]
// plugs into the same [Conn] and [Server].
//
// On the KAS side a connection is a [*Conn]; on the agent side, [Server]
// runs an [http.Handler] (a reverse proxy to the kube-apiserver) on it.
//
// # Encoding of a proxied request
//
// The internal form of a request, [tunnel.Request], travels as one HTTP/2
// request. Every header of this protocol starts with "Kas-"; [Conn]
// removes any such header from a request before it sets its own, so
// agentk can trust them: nothing but KAS can write to the tunnel.
//
//   - The identity to act as is the [IdentityHeader]. agentk removes it
//     and turns it into Kubernetes impersonation headers, as GitLab's
//     agentk does with the identity in its HTTP-over-gRPC header.
//   - Protocol upgrades (RFC 9110 §7.8: "Connection: Upgrade", then
//     "101 Switching Protocols") cannot cross HTTP/2, which has neither
//     the Upgrade header nor the 101 status (RFC 9113 §8.6). kubectl exec,
//     attach, cp and port-forward need them (SPDY/3.1 and WebSocket), so
//     an upgrade is one full-duplex HTTP/2 stream:
//     1. KAS sends the client's request with the Upgrade header's value in
//     [UpgradeHeader] and a request body that stays open.
//     2. agentk makes the HTTP/1.1 upgrade request to the kube-apiserver.
//     If the apiserver switches protocols, agentk answers 200 with
//     [UpgradeStatusHeader] "101", the 101's headers, and the apiserver's
//     Upgrade value in [UpgradeHeader] ([SetSwitched]); from then on the
//     request body carries the client's bytes and the response body the
//     apiserver's. Any other answer goes back unchanged (status, headers,
//     body), so kubectl sees a refused WebSocket upgrade exactly as from a
//     real apiserver and falls back to SPDY.
//     3. [Conn] turns the switched answer back into a 101 for the caller,
//     which answers the client "101 Switching Protocols" with those
//     headers and copies bytes both ways. The end of either direction
//     (EOF) is passed on as a half-close.
//
// # Moving an agent
//
// A node that stops, or a tunnel that reached its maximum age, asks
// agentk to move with a request of KAS's own that carries [MoveHeader]
// (KAS is the HTTP/2 client, so it cannot send the server's GOAWAY that
// would say the same). agentk answers 204, dials a new tunnel at once,
// without backoff, to whatever node its KAS address leads to now, and
// keeps serving the old tunnel until KAS closes it: KAS sends the old one
// no new request while the agent has another, lets the requests on it
// finish within a grace period, and then closes it. A client cannot forge
// the request: [MoveHeader] is one of this protocol's headers, removed from
// every proxied request.
//
// This package imports no Caddy package.
package h2tunnel
