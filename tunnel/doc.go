// Package tunnel is the contract between the parts of the agent server
// that reach agents and the ways agents are reached, whatever the protocol
// and whichever node the agent is connected to.
//
//   - A [Tunnel] is one way to send requests to one agent. Every tunnel
//     protocol is one implementation: our own HTTP/2 over WebSocket
//     (package h2tunnel) today; GitLab's gRPC ReverseTunnel, whose agentk
//     opens one gRPC stream per request (gitlab-wire §B), is the next,
//     behind the same interface.
//   - A [Request] is the one internal form of a proxied request: the HTTP
//     request for the cluster, the identity to act as, and the protocol to
//     switch to. The Kubernetes API proxy builds it; each protocol encodes
//     it its own way and its agent decodes it back, so the proxy writes no
//     protocol's headers.
//   - The [Store] keeps this node's tunnels by agent: the agent endpoint
//     adds them, the agent tracker lists them. A store shared by several
//     nodes (Redis) keeps which node holds which agent next to it.
//   - The [Router] finds a tunnel for a request: least loaded first,
//     waiting while the agent has none but is expected back (it was
//     connected, or the node started, a short while ago). A tunnel of
//     another node will be a Tunnel too (a forwarder to that node's
//     private API), found by the same router.
//
// The identity a request acts as is package identity's; the agent's
// description of itself is [AgentMeta], validated the same way on both
// sides.
//
// This package imports no Caddy package.
package tunnel
