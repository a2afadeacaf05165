package integration

import (
	"fmt"
	"slices"
	"strings"
	"testing"
)

// TestKubectlThroughAgent drives the real kubectl through Caddy and agentk
// to the real kube-apiserver.
func TestKubectlThroughAgent(t *testing.T) {
	s := requireSuite(t)
	kas := startCaddy(t, s, standardConfig())
	kas.startAgentk(t, agentkOptions{agentID: 1}).waitReady(t)
	ops := kas.kubectl(t, "ops", 1)

	namespaces := ops.mustRun(t, "get", "namespaces", "-o", "name")
	for _, want := range []string{"namespace/default", "namespace/kube-system"} {
		if !hasLine(namespaces, want) {
			t.Errorf("kubectl get namespaces does not list %s:\n%s", want, namespaces)
		}
	}
	ns := uniqueName("kas-it")
	ops.mustRun(t, "create", "namespace", ns)
	if got := strings.TrimSpace(ops.mustRun(t, "get", "namespace", ns, "-o", "name")); got != "namespace/"+ns {
		t.Fatalf("kubectl get namespace %s printed %q", ns, got)
	}

	t.Run("server-side apply detects conflicts", func(t *testing.T) {
		manifest := func(value string) string {
			return fmt.Sprintf("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  namespace: %s\ndata:\n  key: %q\n", ns, value)
		}
		first := writeManifest(t, kas.dir, "applied-first.yaml", manifest("first"))
		second := writeManifest(t, kas.dir, "applied-second.yaml", manifest("second"))

		ops.mustRun(t, "apply", "--server-side", "--field-manager", "first-manager", "-f", first)
		ops.mustFail(t, "conflict", "apply", "--server-side", "--field-manager", "second-manager", "-f", second)
		ops.mustRun(t, "apply", "--server-side", "--field-manager", "second-manager", "--force-conflicts", "-f", second)
		if got := ops.mustRun(t, "get", "configmap", "applied", "-n", ns, "-o", "jsonpath={.data.key}"); got != "second" {
			t.Errorf("after the forced apply the ConfigMap holds %q, want %q", got, "second")
		}
	})

	t.Run("watch receives a new ConfigMap", func(t *testing.T) {
		watch := ops.startWatch(t, kas.dir, ns, "watch-marker")
		ops.mustRun(t, "create", "configmap", "watched", "-n", ns)
		waitForLine(t, watch, "configmap/watched")
	})

	t.Run("delete", func(t *testing.T) {
		ops.mustRun(t, "create", "configmap", "doomed", "-n", ns)
		ops.mustRun(t, "delete", "configmap", "doomed", "-n", ns)
		ops.mustFail(t, "NotFound", "get", "configmap", "doomed", "-n", ns)
	})

	t.Run("user with impersonate acts as the configured identity", func(t *testing.T) {
		dev := kas.kubectl(t, "dev", 1)
		who := dev.whoami(t)
		if who.Username != aliceUser || !slices.Contains(who.Groups, "dev") || !slices.Contains(who.Groups, viewersGroup) {
			t.Errorf("user dev reached the apiserver as %q in groups %v, want %q in groups containing dev and %s",
				who.Username, who.Groups, aliceUser, viewersGroup)
		}
		// the apiserver enforces the impersonated identity: group viewers
		// may read, nobody granted alice the right to write
		dev.mustRun(t, "get", "configmaps", "-n", ns)
		dev.mustFail(t, "forbidden", "create", "configmap", "by-dev", "-n", ns)
	})

	t.Run("user without impersonate acts as the agent", func(t *testing.T) {
		if who := ops.whoami(t); who.Username != adminUser {
			t.Errorf("user ops reached the apiserver as %q, want the agent's own identity %q", who.Username, adminUser)
		}
	})

	t.Run("the token's agent id chooses the agent", func(t *testing.T) {
		// agent 2's agentk talks to the cluster as another user, so that
		// whoami shows which agent carried a request; its token comes from
		// the environment on both sides
		kas.startAgentk(t, agentkOptions{agentID: 2, tokenViaEnv: true, kubeContext: agentTwoUser}).waitReady(t)
		if who := kas.kubectl(t, "ops", 2).whoami(t); who.Username != agentTwoUser {
			t.Errorf("a request for agent 2 reached the apiserver as %q, want %q", who.Username, agentTwoUser)
		}
		if who := ops.whoami(t); who.Username != adminUser {
			t.Errorf("a request for agent 1 reached the apiserver as %q, want %q", who.Username, adminUser)
		}
	})
}
