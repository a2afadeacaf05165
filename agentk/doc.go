// Package agentk is the agent of caddy-kas. It runs next to a Kubernetes
// cluster, dials out to the agent server (KAS) over WebSocket tunnels, and
// serves the requests KAS sends through them by forwarding them to the
// cluster's kube-apiserver with its own credential.
//
// The pieces are small and separately testable:
//
//   - [Cluster] is how agentk reaches the apiserver: from a kubeconfig
//     ([LoadKubeconfig]) or from the pod's service account ([InCluster]).
//     It needs no client-go.
//   - The request handler (proxy.go) is a reverse proxy that replaces the
//     caller's credential by agentk's and turns the identity KAS chose
//     (decoded by [h2tunnel.DecodeRequest]) into Kubernetes impersonation
//     headers.
//   - [Agent] keeps the tunnels open, reconnecting with [Backoff], and
//     serves liveness, readiness and Prometheus metrics.
package agentk
