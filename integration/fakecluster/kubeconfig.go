package fakecluster

import "github.com/caddy-kas/caddy-kas/integration/internal/kubetest"

// KubeconfigUser is one user of a kubeconfig, with a context of the same
// name.
type KubeconfigUser = kubetest.KubeconfigUser

// WriteKubeconfig writes a kubeconfig for the Cluster (its URL and CAFile)
// with one context per user, named like the user; the first user's context
// is the current one.
func (c *Cluster) WriteKubeconfig(path string, users ...KubeconfigUser) error {
	return WriteKubeconfig(path, c.URL(), c.CAFile(), users...)
}

// WriteKubeconfig writes a kubeconfig for the server with the CA file, as
// Cluster.WriteKubeconfig does; it serves a server in front of a Cluster too.
func WriteKubeconfig(path, server, caFile string, users ...KubeconfigUser) error {
	return kubetest.WriteKubeconfig(path, server, caFile, users)
}
