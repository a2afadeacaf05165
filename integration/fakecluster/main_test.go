package fakecluster_test

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"testing"
	"time"

	"k8s.io/klog/v2"

	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// The tests start one etcd and one kube-apiserver for the package, from the
// directory KUBE_TESTBIN names, with the harness the integration tests in
// the parent directory use (integration/internal/kubetest), and point the
// real kubectl straight at a fakecluster.Cluster in front of it.

// The users the package's apiserver knows.
const (
	adminUser = "admin" // in group system:masters
	aliceUser = "alice" // in group dev, with no rights of her own
)

var (
	shared     *kubetest.Cluster
	skipReason string
)

// requireAPIServer returns the package's apiserver or skips t.
func requireAPIServer(t *testing.T) *kubetest.Cluster {
	t.Helper()
	kubetest.ConsultEnv()
	if skipReason != "" {
		t.Skip(skipReason)
	}
	return shared
}

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	flag.Parse()
	// The Kubernetes libraries log through klog to stderr, among others an
	// error each time a client closes a stream connection, as a real
	// apiserver does. FAKECLUSTER_KLOG=1 keeps those logs.
	if os.Getenv("FAKECLUSTER_KLOG") == "" {
		klog.LogToStderr(false)
		klog.SetOutput(io.Discard)
	}
	testbin, skip, err := kubetest.TestbinFromEnv("these tests start a real kube-apiserver; skipped in -short mode")
	if err != nil {
		fmt.Fprintf(os.Stderr, "fakecluster: %v\n", err)
		return 1
	}
	if skip != "" {
		skipReason = skip
		return m.Run()
	}
	if _, err := exec.LookPath("kubectl"); err != nil {
		fmt.Fprintf(os.Stderr, "fakecluster: these tests drive the real kubectl, and none is on PATH: %v\n", err)
		return 1
	}
	dir, err := os.MkdirTemp("", "fakecluster-test-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "fakecluster: %v\n", err)
		return 1
	}
	defer os.RemoveAll(dir)
	c, err := kubetest.StartCluster(dir, testbin, kubetest.Options{
		Users: []kubetest.User{
			{Name: adminUser, Group: "system:masters"},
			{Name: aliceUser, Group: "dev"},
		},
		LogPrefix: "fakecluster",
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "fakecluster: %v\n", err)
		return 1
	}
	defer c.Stop()
	shared = c
	return m.Run()
}

// uniqueName is prefix with a random suffix; namespaces never finish
// deleting without a controller-manager, so each test makes new ones.
func uniqueName(prefix string) string { return prefix + "-" + kubetest.RandomHex(4) }

// within is a context that ends after d or with t.
func within(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
