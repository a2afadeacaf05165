package kubetest

import (
	"errors"
	"os"
	"strings"
	"testing"
)

// TestbinFromEnv decides, in TestMain after flag.Parse, whether the tests of
// a package that needs a real kube-apiserver can run. It returns the
// directory KUBE_TESTBIN names when they can; otherwise a reason to skip
// every test (when KUBE_TESTBIN is unset, or in -short mode, which
// shortReason explains), or an error when CI=true demands the tests run
// but KUBE_TESTBIN is unset.
func TestbinFromEnv(shortReason string) (testbin, skipReason string, err error) {
	testbin = os.Getenv("KUBE_TESTBIN")
	switch {
	case testbin == "" && os.Getenv("CI") == "true":
		return "", "", errors.New("KUBE_TESTBIN is not set, but CI=true requires these tests to run; " +
			"hack/test.sh builds kube-apiserver and etcd and sets it")
	case testbin == "":
		return "", "KUBE_TESTBIN is not set; hack/test.sh builds kube-apiserver and etcd and runs these tests", nil
	case testing.Short():
		return "", shortReason, nil
	}
	return testbin, "", nil
}

// ConsultEnv reads the environment variables TestbinFromEnv reads. go test
// caches a package's result keyed on the environment variables and files
// its tests consult, but only from inside tests, not from TestMain. Calling
// it from every test keeps a skipped run's cached result from standing in
// for a real run.
func ConsultEnv() {
	_, _ = os.Getenv("KUBE_TESTBIN"), os.Getenv("CI")
}

// EnvironWithout is this process's environment less the named variables,
// so that a developer's KUBECONFIG or AGENTK_TOKEN never reaches a child.
func EnvironWithout(names ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		drop := false
		for _, n := range names {
			drop = drop || name == n
		}
		if !drop {
			env = append(env, kv)
		}
	}
	return env
}
