package fakecluster_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/integration/fakecluster"
	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// kubectlTimeout bounds one kubectl command that is expected to end by itself.
const kubectlTimeout = 2 * time.Minute

// mode is one way kubectl streams: its default (WebSocket) or SPDY, chosen
// by kubectl's environment variables.
type mode struct {
	name string
	env  []string
}

var (
	remoteCommandModes = []mode{
		{name: "websocket"},
		{name: "spdy", env: []string{"KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false"}},
	}
	portForwardModes = []mode{
		{name: "websocket"},
		{name: "spdy", env: []string{"KUBECTL_PORT_FORWARD_WEBSOCKETS=false"}},
	}
)

// kubectl runs the real kubectl against one kubeconfig.
type kubectl struct {
	kubeconfig string
	home       string   // kubectl's HOME, for its discovery cache
	env        []string // added to the environment
}

// newKubectl writes a kubeconfig for c and the token into a directory of t.
func newKubectl(t *testing.T, c *fakecluster.Cluster, token string, env ...string) kubectl {
	t.Helper()
	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := c.WriteKubeconfig(kubeconfig, fakecluster.KubeconfigUser{Name: "user", Token: token}); err != nil {
		t.Fatal(err)
	}
	return kubectl{kubeconfig: kubeconfig, home: filepath.Join(dir, "home"), env: env}
}

func (k kubectl) with(env ...string) kubectl {
	k.env = append(append([]string(nil), k.env...), env...)
	return k
}

// command is kubectl with args; ctx kills it.
func (k kubectl) command(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "kubectl", append([]string{"--kubeconfig", k.kubeconfig}, args...)...)
	cmd.Env = append(kubetest.EnvironWithout("KUBECONFIG", "HOME", "KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "KUBECTL_PORT_FORWARD_WEBSOCKETS"),
		"HOME="+k.home)
	cmd.Env = append(cmd.Env, k.env...)
	cmd.WaitDelay = 5 * time.Second
	cmd.SysProcAttr = kubetest.ChildProcAttr()
	return cmd
}

// result is what one kubectl command did.
type result struct {
	args     []string
	stdout   string
	stderr   string
	exitCode int   // -1 when kubectl did not exit by itself
	err      error // nil when kubectl exited with status 0
}

// run runs kubectl with stdin (nil: none) and waits, kubectlTimeout at most.
func (k kubectl) run(stdin io.Reader, args ...string) result {
	ctx, cancel := context.WithTimeout(context.Background(), kubectlTimeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := k.command(ctx, args...)
	cmd.Stdin = stdin
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{args: args, stdout: stdout.String(), stderr: stderr.String(), exitCode: -1}
	var exitErr *exec.ExitError
	switch {
	case err == nil:
		r.exitCode = 0
	case ctx.Err() != nil:
		r.err = fmt.Errorf("kubectl %s did not end within %s; stderr:\n%s", strings.Join(args, " "), kubectlTimeout, r.stderr)
	case errors.As(err, &exitErr):
		r.exitCode = exitErr.ExitCode()
		r.err = fmt.Errorf("kubectl %s: exit status %d; stderr:\n%s", strings.Join(args, " "), r.exitCode, strings.TrimSpace(r.stderr))
	default:
		r.err = fmt.Errorf("kubectl %s: %w", strings.Join(args, " "), err)
	}
	return r
}

// mustRun runs kubectl, fails t unless it succeeds, and returns stdout.
func (k kubectl) mustRun(t *testing.T, stdin io.Reader, args ...string) string {
	t.Helper()
	r := k.run(stdin, args...)
	if r.err != nil {
		t.Fatal(r.err)
	}
	return r.stdout
}

// background is a kubectl that runs until it ends or is stopped.
type background struct {
	cmd    *exec.Cmd
	stdout *syncBuffer
	stderr *syncBuffer
	done   chan struct{}
	err    error // valid once done is closed
}

// start starts kubectl in the background; t stops it when it ends.
func (k kubectl) start(t *testing.T, args ...string) *background {
	t.Helper()
	return k.startWithStdin(t, nil, args...)
}

// startWithStdin is start with kubectl's stdin read from stdin (nil: none).
// Use an *os.File: os/exec waits in Wait for its copy of any other reader,
// which may never end.
func (k kubectl) startWithStdin(t *testing.T, stdin io.Reader, args ...string) *background {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	b := &background{cmd: k.command(ctx, args...), stdout: &syncBuffer{}, stderr: &syncBuffer{}, done: make(chan struct{})}
	b.cmd.Stdin = stdin
	b.cmd.Stdout, b.cmd.Stderr = b.stdout, b.stderr
	if err := b.cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	go func() {
		b.err = b.cmd.Wait()
		close(b.done)
	}()
	t.Cleanup(func() {
		cancel() // kills kubectl unless it ended already
		<-b.done
		if t.Failed() {
			t.Logf("kubectl %s\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), kubetest.LastLines(strings.TrimSpace(b.stdout.String()), 20), kubetest.LastLines(strings.TrimSpace(b.stderr.String()), 20))
		}
	})
	return b
}

// interrupt sends SIGINT, as Ctrl-C would, and waits for kubectl to exit.
func (b *background) interrupt(t *testing.T) {
	t.Helper()
	_ = b.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-b.done:
	case <-time.After(kubectlTimeout):
		t.Fatalf("kubectl did not exit within %s of SIGINT", kubectlTimeout)
	}
}

// waitStdout waits until stdout satisfies cond, and fails t if kubectl
// ends first or the wait exceeds timeout.
func (b *background) waitStdout(t *testing.T, timeout time.Duration, what string, cond func(string) bool) string {
	t.Helper()
	deadline := time.After(timeout)
	ticker := time.NewTicker(20 * time.Millisecond)
	defer ticker.Stop()
	for {
		out := b.stdout.String()
		if cond(out) {
			return out
		}
		select {
		case <-b.done:
			if out := b.stdout.String(); cond(out) {
				return out
			}
			t.Fatalf("kubectl ended (%v) before %s; stdout:\n%s\nstderr:\n%s", b.err, what, kubetest.LastLines(strings.TrimSpace(b.stdout.String()), 20), b.stderr.String())
		case <-deadline:
			t.Fatalf("no %s within %s; stdout:\n%s\nstderr:\n%s", what, timeout, kubetest.LastLines(strings.TrimSpace(b.stdout.String()), 20), b.stderr.String())
		case <-ticker.C:
		}
	}
}

// syncBuffer is a bytes.Buffer safe for one writer and concurrent readers.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}
