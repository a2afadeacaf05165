package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// kubectlTimeout bounds one kubectl command that is expected to end by itself.
const kubectlTimeout = 2 * time.Minute

// kubectl runs the real kubectl with one kubeconfig.
type kubectl struct {
	bin        string
	kubeconfig string
	context    string   // empty: the kubeconfig's current context
	home       string   // HOME of kubectl, so its discovery cache stays out of the developer's ~/.kube
	extraEnv   []string // more NAME=value for kubectl (KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false, say)
}

// kubectlResult is what one kubectl command did.
type kubectlResult struct {
	args     []string
	stdout   string
	stderr   string
	exitCode int   // -1 when kubectl did not exit by itself
	err      error // nil when kubectl exited with status 0
}

func (k kubectl) fullArgs(args []string) []string {
	full := []string{"--kubeconfig", k.kubeconfig}
	if k.context != "" {
		full = append(full, "--context", k.context)
	}
	return append(full, args...)
}

func (k kubectl) env() []string {
	return append(append(kubetest.EnvironWithout("KUBECONFIG", "HOME"), "HOME="+k.home), k.extraEnv...)
}

// run runs kubectl with args and waits for it, for kubectlTimeout at most.
func (k kubectl) run(args ...string) kubectlResult { return k.runInput(nil, args...) }

// runInput is run with stdin as kubectl's standard input.
func (k kubectl) runInput(stdin io.Reader, args ...string) kubectlResult {
	ctx, cancel := context.WithTimeout(context.Background(), kubectlTimeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, k.bin, k.fullArgs(args)...)
	cmd.Env = k.env()
	cmd.Stdin = stdin
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	cmd.WaitDelay = 5 * time.Second
	runErr := cmd.Run()

	r := kubectlResult{args: args, stdout: stdout.String(), stderr: stderr.String(), exitCode: -1}
	var exitErr *exec.ExitError
	switch {
	case runErr == nil:
		r.exitCode = 0
	case ctx.Err() != nil:
		r.err = fmt.Errorf("kubectl %s did not end within %s", strings.Join(args, " "), kubectlTimeout)
	case errors.As(runErr, &exitErr):
		r.exitCode = exitErr.ExitCode()
		r.err = fmt.Errorf("kubectl %s: exit status %d: %s", strings.Join(args, " "), r.exitCode, kubetest.Redact(strings.TrimSpace(r.stderr)))
	default:
		r.err = fmt.Errorf("kubectl %s: %w", strings.Join(args, " "), runErr)
	}
	return r
}

// mustRun runs kubectl and fails t unless it succeeds; it returns stdout.
func (k kubectl) mustRun(t testing.TB, args ...string) string {
	t.Helper()
	r := k.run(args...)
	if r.err != nil {
		t.Fatal(r.err)
	}
	return r.stdout
}

// mustRunStdin is mustRun with stdin as kubectl's standard input.
func (k kubectl) mustRunStdin(t testing.TB, stdin string, args ...string) string {
	t.Helper()
	r := k.runInput(strings.NewReader(stdin), args...)
	if r.err != nil {
		t.Fatal(r.err)
	}
	return r.stdout
}

// mustFail runs kubectl and fails t unless it exits with an error whose
// stderr contains wantInStderr (case-insensitive; empty matches any); it
// returns stderr.
func (k kubectl) mustFail(t testing.TB, wantInStderr string, args ...string) string {
	t.Helper()
	r := k.run(args...)
	switch {
	case r.exitCode == 0:
		t.Fatalf("kubectl %s succeeded, want an error mentioning %q; stdout:\n%s", strings.Join(args, " "), wantInStderr, kubetest.Redact(r.stdout))
	case r.exitCode < 0:
		t.Fatal(r.err)
	case !strings.Contains(strings.ToLower(r.stderr), strings.ToLower(wantInStderr)):
		t.Fatalf("kubectl %s failed as expected, but its stderr does not mention %q:\n%s", strings.Join(args, " "), wantInStderr, kubetest.Redact(r.stderr))
	}
	return r.stderr
}

// start starts a kubectl that runs until it ends by itself or t ends (a
// watch, say); its output goes to files in logDir.
func (k kubectl) start(t testing.TB, name, logDir string, args ...string) *kubetest.Process {
	t.Helper()
	return startOwnedProcess(t, kubetest.ProcessSpec{
		Name:   name,
		Binary: k.bin,
		Args:   k.fullArgs(args),
		Env:    k.env(),
		LogDir: logDir,
	})
}

// userInfo is the part of a SelfSubjectReview (kubectl auth whoami -o json)
// the tests look at.
type userInfo struct {
	Username string              `json:"username"`
	UID      string              `json:"uid"`
	Groups   []string            `json:"groups"`
	Extra    map[string][]string `json:"extra"`
}

// whoami runs `kubectl auth whoami -o json` with extra flags (such as --as)
// and returns who the apiserver saw.
func (k kubectl) whoami(t testing.TB, extraArgs ...string) userInfo {
	t.Helper()
	out := k.mustRun(t, append([]string{"auth", "whoami", "-o", "json"}, extraArgs...)...)
	var review struct {
		Kind   string `json:"kind"`
		Status struct {
			UserInfo userInfo `json:"userInfo"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(out), &review); err != nil {
		t.Fatalf("decode kubectl auth whoami output: %v\n%s", err, out)
	}
	if review.Kind != "SelfSubjectReview" {
		t.Fatalf("kubectl auth whoami printed kind %q, want SelfSubjectReview:\n%s", review.Kind, out)
	}
	return review.Status.UserInfo
}

// writeManifest writes a manifest for kubectl apply -f into dir.
func writeManifest(t testing.TB, dir, name, manifest string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(manifest), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// uniqueName returns prefix with a random suffix. Namespaces in particular
// need one: without a controller-manager their deletion never finishes.
func uniqueName(prefix string) string {
	return prefix + "-" + kubetest.RandomHex(4)
}

// watchEventTimeout bounds the wait for one line from a running kubectl watch.
const watchEventTimeout = time.Minute

// hasLine reports whether text has a line equal to want, spaces aside.
func hasLine(text, want string) bool {
	for line := range strings.Lines(text) {
		if strings.TrimSpace(line) == want {
			return true
		}
	}
	return false
}

// waitForLine waits until the stdout of p, a running kubectl, has the line
// want, and fails t if p ends first.
func waitForLine(t testing.TB, p *kubetest.Process, want string) {
	t.Helper()
	err := kubetest.Eventually(watchEventTimeout, func() error {
		if hasLine(p.Stdout(), want) {
			return nil
		}
		if !p.Running() {
			return kubetest.Permanent(fmt.Errorf("%w; stderr: %s", p.ExitError(), kubetest.Redact(strings.TrimSpace(p.Stderr()))))
		}
		return fmt.Errorf("no line %q yet", want)
	})
	if err != nil {
		t.Fatalf("%s did not print %q: %v\nits stdout:\n%s", p.Name, want, err, kubetest.Redact(p.Stdout()))
	}
}

// startWatch starts `kubectl get configmaps --watch` in namespace and waits
// until it printed the existing ConfigMap marker. From then on the list is
// done, and any later change arrives as a watch event.
func (k kubectl) startWatch(t testing.TB, logDir, namespace, marker string) *kubetest.Process {
	t.Helper()
	k.mustRun(t, "create", "configmap", marker, "-n", namespace)
	watch := k.start(t, "kubectl-watch", logDir, "get", "configmaps", "-n", namespace, "--watch", "-o", "name")
	waitForLine(t, watch, "configmap/"+marker)
	return watch
}
