package tunnel

// Protocol upgrades (RFC 9110 §7.8: "Connection: Upgrade", then
// "101 Switching Protocols") cannot cross HTTP/2, which has neither the
// Upgrade header nor the 101 status (RFC 9113 §8.6). kubectl exec, attach,
// cp and port-forward need them (SPDY/3.1 and WebSocket), so the tunnel
// carries an upgrade as one full-duplex HTTP/2 stream:
//
//  1. KAS sends the client's request with the Upgrade header's value in
//     [UpgradeHeader] and a request body that stays open.
//  2. agentk makes the HTTP/1.1 upgrade request to the kube-apiserver. If
//     the apiserver switches protocols, agentk answers 200 with
//     [UpgradeStatusHeader] "101", the 101's headers, and the apiserver's
//     Upgrade value in [UpgradeHeader]; from then on the request body
//     carries the client's bytes and the response body the apiserver's. Any
//     other answer goes back unchanged (status, headers, body), so kubectl
//     sees a refused WebSocket upgrade exactly as from a real apiserver and
//     falls back to SPDY.
//  3. KAS answers the client "101 Switching Protocols" with those headers
//     and copies bytes both ways. The end of either direction (EOF) is
//     passed on as a half-close.
const (
	// UpgradeHeader carries the value of the Upgrade header: in a request
	// what the client asks for, in a switched response what the cluster
	// chose.
	UpgradeHeader = "Kas-Upgrade"
	// UpgradeStatusHeader is "101" in agentk's answer when the cluster
	// switched protocols.
	UpgradeStatusHeader = "Kas-Upgrade-Status"
)
