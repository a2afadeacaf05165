package integration

import (
	"fmt"
	"path/filepath"

	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// Identities the apiserver knows from its token file.
const (
	// adminUser is in system:masters; agent 1's agentk talks to the cluster
	// as this user, so it may impersonate.
	adminUser = "admin"
	// aliceUser is in group dev and has no rights of her own.
	aliceUser = "alice"
	// agentTwoUser is in system:masters too; agent 2's agentk uses it, so
	// `auth whoami` tells which agent a request went through.
	agentTwoUser = "agent-two"
)

// viewersGroup may read ConfigMaps and Namespaces through readerRole, so
// that a request impersonated as alice in groups dev and viewers may read but
// not write.
const (
	viewersGroup = "viewers"
	readerRole   = "kas-it-reader"
)

// startKubeCluster starts etcd and kube-apiserver from testbin with their
// state in dir, knowing adminUser, aliceUser and agentTwoUser, and grants
// viewersGroup read access. The kubeconfig has a context for each user.
func startKubeCluster(dir, testbin, kubectlBin string) (*kubetest.Cluster, error) {
	return kubetest.StartCluster(dir, testbin, kubetest.Options{
		Users: []kubetest.User{
			{Name: adminUser, Group: "system:masters"},
			{Name: aliceUser, Group: "dev"},
			{Name: agentTwoUser, Group: "system:masters"},
		},
		LogPrefix: "integration",
		Setup: func(c *kubetest.Cluster) error {
			// The built-in clusterrole view is empty here: its rules are
			// aggregated by the controller-manager, which does not run. So
			// bring a reader role.
			admin := kubectl{bin: kubectlBin, kubeconfig: c.Kubeconfig, context: adminUser, home: filepath.Join(dir, "kubectl-home")}
			for _, args := range [][]string{
				{"create", "clusterrole", readerRole, "--verb", "get,list,watch", "--resource", "configmaps,namespaces"},
				{"create", "clusterrolebinding", readerRole, "--clusterrole", readerRole, "--group", viewersGroup},
			} {
				if r := admin.run(args...); r.err != nil {
					return fmt.Errorf("grant group %s read access: %w", viewersGroup, r.err)
				}
			}
			return nil
		},
	})
}
