// Package nodetunnel forwards a proxied request from the node that received
// it to the node that holds a tunnel of its agent, when several agent
// servers share a registry of tunnels (kas-spec §4.3, §1.4). It is the
// remote kind of [tunnel.Tunnel]: a [Remote] is what [tunnel.Router] hands
// the proxy when the agent is connected elsewhere, as tailscale's derp puts
// local and remote peers behind one forwarder.
//
// # Wire
//
// The nodes speak HTTP/2 to each other's private listener (h2c, or TLS),
// one stream per forwarded request, in two steps, as GitLab's KAS does with
// its TunnelReady/StartStreaming exchange (gitlab-wire §C):
//
//  1. The forwarding node opens POST /v1/tunnel with the headers
//     Authorization: Bearer <JWT> and Kas-Agent-Id: <id>, and a request
//     body it keeps open. The JWT is HS256 with the private secret, issuer
//     and audience "gitlab-kas", valid for 5 s from 5 s in the past
//     (kas-spec §2.4), and names the agent (claim agent_id). The receiving
//     node answers at once: 404 (header Kas-Tunnel: none) if it holds no
//     tunnel of the agent, 200 (Kas-Tunnel: ready) if it does. It never
//     forwards again: one hop, no cycles.
//  2. After 200 the forwarding node writes the request into the stream's
//     body in HTTP/1.1 form (request line, headers, and the body framed by
//     Content-Length or chunked encoding); the identity the request acts as
//     travels in header Kas-Node-Identity (JSON), trusted because the JWT
//     is. The receiving node answers in the response body the same way:
//     the cluster's status line, headers and body, chunked when its length
//     is unknown and flushed as it comes, so watches and log streams pass
//     at once. A switched connection (101, for exec, attach and
//     port-forward) carries raw bytes both ways after the heads, and the
//     end of the request body is the client's half-close. A response cut
//     short resets the stream, so it never looks complete.
//
// The forwarding node may open step 1 with several nodes, staggered, and
// goes on with the first that is ready, cancelling the others ([Finder]).
//
// The package imports no Caddy package.
package nodetunnel
