package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestGitLabChartCommandLine runs our agentk with the arguments and the
// environment that GitLab's Helm chart gives its agentk
// (cmd/agentk/testdata/gitlab-chart/kascacert-v2.txt: token file, KAS
// address, KAS CA file, two --kas-header, an extra argument, POD_*,
// SERVICE_ACCOUNT_NAME and OCS_* variables), with the chart's file paths
// and KAS address pointing at this test's, and uses kubectl through it.
// Outside a pod agentk also gets the test cluster's kubeconfig and a free
// observability port, where in a pod it would use the service account and
// :8080.
func TestGitLabChartCommandLine(t *testing.T) {
	s := requireSuite(t)
	kas := startCaddy(t, s, standardConfig())
	args, env := readChartCommandLine(t, filepath.Join("..", "cmd", "agentk", "testdata", "gitlab-chart", "kascacert-v2.txt"))
	chartFiles := map[string]string{
		"/etc/agentk/secrets/token": writeSecretFile(t, kas.dir, "chart-agent.token", kas.config.agent(t, 1).token),
		"/etc/agentk/config/ca.crt": kas.rootCAFile(),
	}
	for i, arg := range args {
		name, value, ok := strings.Cut(arg, "=")
		switch {
		case !ok:
		case name == "--kas-address":
			args[i] = name + "=" + kas.agentURL()
		case chartFiles[value] != "":
			args[i] = name + "=" + chartFiles[value]
		}
	}
	agent := kas.startAgentk(t, agentkOptions{agentID: 1, extraArgs: args, extraEnv: env})
	agent.waitReady(t)
	ops := kas.kubectl(t, "ops", 1)
	if got := strings.TrimSpace(ops.mustRun(t, "get", "namespace", "default", "-o", "name")); got != "namespace/default" {
		t.Errorf("kubectl get namespace default through the chart-configured agentk printed %q", got)
	}
	// The chart's pod name reached agentk, and the variables it has no use
	// for were said to have no effect.
	log := agent.proc.Stderr()
	for _, want := range []string{`"pod_name":"gitlab-agent-v2-5c7b9d8f4-q8r2m"`, `"env":["SERVICE_ACCOUNT_NAME","OCS_ENABLED","OCS_SERVICE_ACCOUNT_NAME"]`} {
		if !strings.Contains(log, want) {
			t.Errorf("agentk's log does not show %s:\n%s", want, log)
		}
	}
}

// readChartCommandLine reads the [args] and [env] sections of a chart
// command line fixture (cmd/agentk/testdata/gitlab-chart/README.md).
func readChartCommandLine(t *testing.T, path string) (args, env []string) {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sections := map[string][]string{}
	section := ""
	for line := range strings.Lines(string(raw)) {
		line = strings.TrimRight(line, "\n")
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "["):
			section = line
		default:
			sections[section] = append(sections[section], line)
		}
	}
	if len(sections["[args]"]) == 0 || len(sections["[env]"]) == 0 {
		t.Fatalf("%s: no [args] or [env]", path)
	}
	return sections["[args]"], sections["[env]"]
}
