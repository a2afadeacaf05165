package fakecluster_test

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/integration/fakecluster"
	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

const (
	// streamWait bounds waits for something a stream is expected to do soon.
	streamWait = time.Minute
	// v5Protocol is the remote command protocol kubectl speaks over WebSocket.
	v5Protocol = "v5.channel.k8s.io"
	// tunnelProtocol is the port-forward protocol kubectl tunnels over WebSocket.
	tunnelProtocol = "SPDY/3.1+portforward.k8s.io"
)

// fixture is a Cluster in front of the package's apiserver with one
// running pod in a namespace of its own, and an admin kubectl for it.
type fixture struct {
	api       *kubetest.Cluster
	cluster   *fakecluster.Cluster
	namespace string
	pod       string
	admin     kubectl
}

func newFixture(t *testing.T, opts fakecluster.Options) *fixture {
	t.Helper()
	api := requireAPIServer(t)
	opts.APIServerURL, opts.APIServerCAFile = api.URL, api.CAFile
	f := &fixture{
		api:       api,
		cluster:   fakecluster.Start(t, opts),
		namespace: uniqueName("fc"),
		pod:       "pod",
	}
	f.cluster.CreateRunningPod(t, api.Tokens[adminUser], f.namespace, f.pod)
	f.admin = newKubectl(t, f.cluster, api.Tokens[adminUser])
	return f
}

// requestsSince returns the subresource requests of kind after the first n
// requests of the Cluster.
func (f *fixture) requestsSince(n int, kind fakecluster.Subresource) []fakecluster.Request {
	var out []fakecluster.Request
	for _, r := range f.cluster.Requests()[n:] {
		if r.Subresource == kind {
			out = append(out, r)
		}
	}
	return out
}

// doneRequestsSince waits until the Cluster has answered every request of
// kind after the first n requests (an upgraded one is answered when its
// streams are over), and returns them.
func (f *fixture) doneRequestsSince(t *testing.T, n int, kind fakecluster.Subresource) []fakecluster.Request {
	t.Helper()
	requests, err := f.cluster.WaitRequests(within(t, streamWait), func(all []fakecluster.Request) bool {
		for _, r := range all[n:] {
			if r.Subresource == kind && !r.Done {
				return false
			}
		}
		return true
	})
	if err != nil {
		t.Fatalf("%s requests still being answered after %s: %+v", kind, streamWait, requests[n:])
	}
	return f.requestsSince(n, kind)
}

// checkRemoteCommandRequests checks that every exec or attach request after
// the first n went the way the mode says kubectl streams, and was upgraded.
func (f *fixture) checkRemoteCommandRequests(t *testing.T, m mode, n int, kind fakecluster.Subresource) {
	t.Helper()
	requests := f.doneRequestsSince(t, n, kind)
	if len(requests) == 0 {
		t.Errorf("the cluster saw no %s request", kind)
	}
	for _, r := range requests {
		var ok bool
		switch m.name {
		case "websocket":
			ok = r.Method == "GET" && r.IsWebSocket() && slices.Contains(r.Protocols, v5Protocol)
		case "spdy":
			ok = r.Method == "POST" && r.IsSPDY() && slices.Contains(r.Protocols, "v4.channel.k8s.io")
		}
		if !ok || !r.Upgraded {
			t.Errorf("in %s mode kubectl sent %s %s?%s with Upgrade %q and protocols %q, answered %d (upgraded: %v)",
				m.name, r.Method, r.Subresource, r.RawQuery, r.Upgrade, r.Protocols, r.Status, r.Upgraded)
		}
	}
}

func TestExec(t *testing.T) {
	f := newFixture(t, fakecluster.Options{})
	for _, m := range remoteCommandModes {
		t.Run(m.name, func(t *testing.T) {
			k := f.admin.with(m.env...)
			exec := []string{"exec", "-n", f.namespace, f.pod, "--"}
			before := len(f.cluster.Requests())

			if got := k.mustRun(t, nil, append(exec, "echo", "hello", "world")...); got != "hello world\n" {
				t.Errorf("echo printed %q", got)
			}

			input := "first line\nsecond line\n"
			if got := k.mustRun(t, strings.NewReader(input), "exec", "-i", "-n", f.namespace, f.pod, "--", "cat"); got != input {
				t.Errorf("cat printed %q, want %q", got, input)
			}

			r := k.run(nil, append(exec, "stderr", "to", "stderr")...)
			if r.err != nil || r.stdout != "" || !strings.Contains(r.stderr, "to stderr") {
				t.Errorf("stderr: err %v, stdout %q, stderr %q", r.err, r.stdout, r.stderr)
			}

			if env := k.mustRun(t, nil, append(exec, "env")...); !strings.Contains(env, "HOSTNAME="+f.pod+"\n") {
				t.Errorf("env printed no HOSTNAME=%s:\n%s", f.pod, env)
			}

			for _, tc := range []struct {
				command []string
				want    int
			}{
				{[]string{"sh", "-c", "exit 3"}, 3},
				{[]string{"exit", "42"}, 42},
				{[]string{"false"}, 1},
				{[]string{"no-such-command"}, 126},
			} {
				r := k.run(nil, append(exec, tc.command...)...)
				if r.exitCode != tc.want {
					t.Errorf("%q: kubectl exited with %d (%v), want %d", tc.command, r.exitCode, r.err, tc.want)
				}
			}

			// stdin, stdout and stderr together, and an exit code
			r = k.run(strings.NewReader("in\n"), "exec", "-i", "-n", f.namespace, f.pod, "--", "sh", "-c", "cat")
			if r.err != nil || r.stdout != "in\n" {
				t.Errorf("sh -c cat: err %v, stdout %q", r.err, r.stdout)
			}

			f.checkRemoteCommandRequests(t, m, before, fakecluster.Exec)
			counts, err := f.cluster.WaitStreams(within(t, streamWait), fakecluster.Exec, func(c fakecluster.StreamCounts) bool { return c.Active() == 0 })
			if err != nil {
				t.Errorf("exec sessions still running upstream: %+v", counts)
			}
		})
	}
}

// TestExecInterrupted interrupts a kubectl exec whose command runs until its
// stdin ends, and checks that the session ends upstream too.
func TestExecInterrupted(t *testing.T) {
	f := newFixture(t, fakecluster.Options{})
	for _, m := range remoteCommandModes {
		t.Run(m.name, func(t *testing.T) {
			before := f.cluster.Streams(fakecluster.Exec)
			// stdin stays open: only the interruption can end cat. An
			// *os.File, so that os/exec copies nothing and waits for no copy.
			stdin, stdinWriter, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				stdin.Close()
				stdinWriter.Close()
			})
			exec := f.admin.with(m.env...).startWithStdin(t, stdin, "exec", "-i", "-n", f.namespace, f.pod, "--", "cat")
			if _, err := io.WriteString(stdinWriter, "ping\n"); err != nil {
				t.Fatal(err)
			}
			exec.waitStdout(t, streamWait, "the echo of ping", func(s string) bool { return s == "ping\n" })
			if counts := f.cluster.Streams(fakecluster.Exec); counts.Active() != 1 {
				t.Errorf("exec sessions upstream while kubectl runs: %+v, want 1 active", counts)
			}
			exec.interrupt(t)
			counts, err := f.cluster.WaitStreams(within(t, streamWait), fakecluster.Exec, func(c fakecluster.StreamCounts) bool {
				return c.Ended > before.Ended && c.Active() == 0
			})
			if err != nil {
				t.Errorf("the upstream exec session did not end after kubectl was interrupted: %+v (before: %+v)", counts, before)
			}
		})
	}
}

// TestExecLargeStdin sends 50 MiB through cat and checks that the same
// bytes come back.
func TestExecLargeStdin(t *testing.T) {
	f := newFixture(t, fakecluster.Options{})
	dir := t.TempDir()
	input := filepath.Join(dir, "input")
	wantSum := writeRandomFile(t, input, 50<<20, 1)
	for _, m := range remoteCommandModes {
		t.Run(m.name, func(t *testing.T) {
			before := len(f.cluster.Requests())
			in, err := os.Open(input)
			if err != nil {
				t.Fatal(err)
			}
			defer in.Close()
			outPath := filepath.Join(dir, "output-"+m.name)
			out, err := os.Create(outPath)
			if err != nil {
				t.Fatal(err)
			}
			defer out.Close()
			var stderr bytes.Buffer
			ctx := within(t, 5*time.Minute)
			cmd := f.admin.with(m.env...).command(ctx, "exec", "-i", "-n", f.namespace, f.pod, "--", "cat")
			cmd.Stdin, cmd.Stdout, cmd.Stderr = in, out, &stderr
			if err := cmd.Run(); err != nil {
				t.Fatalf("kubectl exec -i cat: %v (context: %v); stderr:\n%s", err, ctx.Err(), stderr.String())
			}
			if got := fileSum(t, outPath); got != wantSum {
				info, _ := os.Stat(outPath)
				t.Fatalf("50 MiB through cat came back different: sha256 %s, want %s (%d bytes)", got, wantSum, info.Size())
			}
			f.checkRemoteCommandRequests(t, m, before, fakecluster.Exec)
		})
	}
}

func TestAttach(t *testing.T) {
	f := newFixture(t, fakecluster.Options{})
	for _, m := range remoteCommandModes {
		t.Run(m.name, func(t *testing.T) {
			before := len(f.cluster.Requests())
			got := f.admin.with(m.env...).mustRun(t, strings.NewReader("first\nsecond\n"),
				"attach", "-i", "-n", f.namespace, f.pod, "-c", fakecluster.DefaultContainer)
			want := fmt.Sprintf("attached to %s/%s/main\nmain: first\nmain: second\n", f.namespace, f.pod)
			if got != want {
				t.Errorf("kubectl attach printed %q, want %q", got, want)
			}
			f.checkRemoteCommandRequests(t, m, before, fakecluster.Attach)
		})
	}
}

func TestCopy(t *testing.T) {
	f := newFixture(t, fakecluster.Options{})
	for _, m := range remoteCommandModes {
		t.Run(m.name, func(t *testing.T) {
			k := f.admin.with(m.env...)
			dir := t.TempDir()
			src := filepath.Join(dir, "src")
			files := map[string]string{
				"a.txt":          "alpha\n",
				"sub/b.bin":      string(randomBytes(64<<10, 2)),
				"sub/deep/c.txt": "gamma\n",
			}
			for name, content := range files {
				path := filepath.Join(src, filepath.FromSlash(name))
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			remote := fmt.Sprintf("%s/%s:", f.namespace, f.pod)

			// a directory to a path that does not exist yet
			k.mustRun(t, nil, "cp", src, remote+"/tmp/copied-"+m.name)
			if got := k.mustRun(t, nil, "exec", "-n", f.namespace, f.pod, "--", "cat", "/tmp/copied-"+m.name+"/sub/deep/c.txt"); got != "gamma\n" {
				t.Errorf("the copied c.txt holds %q", got)
			}
			// and back
			back := filepath.Join(dir, "back")
			k.mustRun(t, nil, "cp", remote+"/tmp/copied-"+m.name, back)
			for name, content := range files {
				got, err := os.ReadFile(filepath.Join(back, filepath.FromSlash(name)))
				if err != nil {
					t.Errorf("copied back: %v", err)
				} else if string(got) != content {
					t.Errorf("copied back %s differs (%d bytes, want %d)", name, len(got), len(content))
				}
			}

			// a single file into an existing directory, and back to a file
			single := filepath.Join(dir, "single.txt")
			if err := os.WriteFile(single, []byte("single\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			k.mustRun(t, nil, "exec", "-n", f.namespace, f.pod, "--", "mkdir", "-p", "/data/"+m.name)
			k.mustRun(t, nil, "cp", single, remote+"/data/"+m.name)
			if got := k.mustRun(t, nil, "exec", "-n", f.namespace, f.pod, "--", "ls", "/data/"+m.name); got != "single.txt\n" {
				t.Errorf("after kubectl cp into /data/%s it holds %q", m.name, got)
			}
			singleBack := filepath.Join(dir, "single-back.txt")
			k.mustRun(t, nil, "cp", remote+"/data/"+m.name+"/single.txt", singleBack)
			if got, err := os.ReadFile(singleBack); err != nil || string(got) != "single\n" {
				t.Errorf("the file copied back holds %q (%v)", got, err)
			}
		})
	}
}

var forwardingLine = regexp.MustCompile(`Forwarding from 127\.0\.0\.1:(\d+) -> 8080`)

// TestPortForward runs 100 connections at once through kubectl
// port-forward to the echo server and checks every byte.
func TestPortForward(t *testing.T) {
	f := newFixture(t, fakecluster.Options{})
	for _, m := range portForwardModes {
		t.Run(m.name, func(t *testing.T) {
			before := len(f.cluster.Requests())
			startCounts := f.cluster.Streams(fakecluster.PortForward)
			local := startPortForward(t, f.admin.with(m.env...), f.namespace, f.pod)
			runEchoConnections(t, local, 100, 64<<10)

			requests := f.requestsSince(before, fakecluster.PortForward)
			if len(requests) != 1 {
				t.Errorf("kubectl port-forward sent %d requests, want 1", len(requests))
			}
			for _, r := range requests {
				var ok bool
				switch m.name {
				case "websocket":
					ok = r.Method == "GET" && r.IsWebSocket() && slices.Contains(r.Protocols, tunnelProtocol)
				case "spdy":
					ok = r.Method == "POST" && r.IsSPDY() && slices.Contains(r.Protocols, "portforward.k8s.io")
				}
				if !ok {
					t.Errorf("in %s mode kubectl port-forward sent %s with Upgrade %q and protocols %q", m.name, r.Method, r.Upgrade, r.Protocols)
				}
			}
			counts, err := f.cluster.WaitStreams(within(t, streamWait), fakecluster.PortForward, func(c fakecluster.StreamCounts) bool {
				return c.Started-startCounts.Started >= 100 && c.Active() == 0
			})
			if err != nil {
				t.Errorf("forwarded connections upstream: %+v (%+v before), want 100 more, all ended", counts, startCounts)
			}
		})
	}
}

// startPortForward starts kubectl port-forward to port 8080 of the pod and
// returns the local address it listens on.
func startPortForward(t *testing.T, k kubectl, namespace, pod string) string {
	t.Helper()
	pf := k.start(t, "port-forward", "--address", "127.0.0.1", "-n", namespace, "pod/"+pod, ":8080")
	out := pf.waitStdout(t, streamWait, "Forwarding line", forwardingLine.MatchString)
	return "127.0.0.1:" + forwardingLine.FindStringSubmatch(out)[1]
}

// runEchoConnections opens n connections to addr at once, sends size random
// bytes on each, half-closes and checks that the same bytes come back.
func runEchoConnections(t *testing.T, addr string, n, size int) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- echoOnce(addr, randomBytes(size, uint64(100+i)))
		}()
	}
	wg.Wait()
	close(errs)
	failed := 0
	for err := range errs {
		if err != nil {
			failed++
			if failed <= 5 {
				t.Error(err)
			}
		}
	}
	if failed > 0 {
		t.Errorf("%d of %d connections failed", failed, n)
	}
}

func echoOnce(addr string, data []byte) error {
	conn, err := net.DialTimeout("tcp", addr, 30*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(2 * time.Minute)); err != nil {
		return err
	}
	writeErr := make(chan error, 1)
	go func() {
		_, err := conn.Write(data)
		if err == nil {
			err = conn.(*net.TCPConn).CloseWrite()
		}
		writeErr <- err
	}()
	got, err := io.ReadAll(conn)
	if werr := <-writeErr; werr != nil {
		return fmt.Errorf("write: %w", werr)
	}
	if err != nil {
		return fmt.Errorf("read after %d bytes: %w", len(got), err)
	}
	if !bytes.Equal(got, data) {
		return fmt.Errorf("the echo differs: %d bytes back, %d sent", len(got), len(data))
	}
	return nil
}

var logLine = regexp.MustCompile(`^line (\d+) (\S+)$`)

func TestLogs(t *testing.T) {
	f := newFixture(t, fakecluster.Options{})

	t.Run("without follow", func(t *testing.T) {
		out := f.admin.mustRun(t, nil, "logs", "-n", f.namespace, f.pod)
		lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
		if len(lines) != 5 {
			t.Fatalf("kubectl logs printed %d lines, want 5:\n%s", len(lines), out)
		}
		checkLogLines(t, lines)
	})

	t.Run("follow, interrupted", func(t *testing.T) {
		before := f.cluster.Streams(fakecluster.Log)
		logs := f.admin.start(t, "logs", "-f", "-n", f.namespace, f.pod)
		out := logs.waitStdout(t, streamWait, "20 log lines", func(s string) bool { return strings.Count(s, "\n") >= 20 })
		checkLogLines(t, strings.Split(strings.TrimSuffix(out, "\n"), "\n")[:20])
		if counts := f.cluster.Streams(fakecluster.Log); counts.Active() != 1 {
			t.Errorf("log streams upstream while kubectl follows: %+v, want 1 active", counts)
		}
		logs.interrupt(t)
		counts, err := f.cluster.WaitStreams(within(t, streamWait), fakecluster.Log, func(c fakecluster.StreamCounts) bool {
			return c.Ended > before.Ended && c.Active() == 0
		})
		if err != nil {
			t.Errorf("the upstream log stream did not end after kubectl was interrupted: %+v (before: %+v)", counts, before)
		}
		if f.cluster.LogStreamsEnded() <= before.Ended {
			t.Errorf("LogStreamsEnded is %d, want more than %d", f.cluster.LogStreamsEnded(), before.Ended)
		}
	})
}

func checkLogLines(t *testing.T, lines []string) {
	t.Helper()
	for i, line := range lines {
		m := logLine.FindStringSubmatch(line)
		if m == nil {
			t.Errorf("log line %q is not `line N TIMESTAMP`", line)
			continue
		}
		if n, _ := strconv.Atoi(m[1]); n != i+1 {
			t.Errorf("log line %d is numbered %d", i+1, n)
		}
		if _, err := time.Parse(time.RFC3339Nano, m[2]); err != nil {
			t.Errorf("log line %q: %v", line, err)
		}
	}
}

// TestRefusedWebSocket checks that kubectl falls back to SPDY when the
// upstream answers a WebSocket upgrade with 400, and still works.
func TestRefusedWebSocket(t *testing.T) {
	f := newFixture(t, fakecluster.Options{RefuseWebSocketExec: true, RefuseWebSocketPortForward: true})

	t.Run("exec", func(t *testing.T) {
		before := len(f.cluster.Requests())
		r := f.admin.run(strings.NewReader("through SPDY\n"), "exec", "-i", "-n", f.namespace, f.pod, "--", "sh", "-c", "cat")
		if r.err != nil || r.stdout != "through SPDY\n" {
			t.Fatalf("kubectl exec: %v, stdout %q", r.err, r.stdout)
		}
		if r := f.admin.run(nil, "exec", "-n", f.namespace, f.pod, "--", "exit", "7"); r.exitCode != 7 {
			t.Errorf("kubectl exec exit 7 exited with %d (%v)", r.exitCode, r.err)
		}
		checkFallback(t, f, before, fakecluster.Exec, 2)
	})

	t.Run("attach", func(t *testing.T) {
		before := len(f.cluster.Requests())
		got := f.admin.mustRun(t, strings.NewReader("x\n"), "attach", "-i", "-n", f.namespace, f.pod)
		if !strings.HasSuffix(got, "main: x\n") {
			t.Errorf("kubectl attach printed %q", got)
		}
		checkFallback(t, f, before, fakecluster.Attach, 1)
	})

	t.Run("port-forward", func(t *testing.T) {
		before := len(f.cluster.Requests())
		local := startPortForward(t, f.admin, f.namespace, f.pod)
		runEchoConnections(t, local, 10, 16<<10)
		checkFallback(t, f, before, fakecluster.PortForward, 1)
	})
}

// checkFallback checks that the requests of kind after the first before
// are sessions pairs: a WebSocket upgrade answered with 400, then a SPDY
// upgrade that was served.
func checkFallback(t *testing.T, f *fixture, before int, kind fakecluster.Subresource, sessions int) {
	t.Helper()
	requests, err := f.cluster.WaitRequests(within(t, streamWait), func(all []fakecluster.Request) bool {
		for _, r := range all[before:] {
			if r.Subresource == kind && !r.Done && !r.IsSPDY() {
				return false
			}
		}
		return true
	})
	if err != nil {
		t.Fatalf("requests still being answered: %+v", requests[before:])
	}
	got := f.requestsSince(before, kind)
	if len(got) != 2*sessions {
		t.Fatalf("%d %s requests, want %d (a refused WebSocket and a SPDY one each): %+v", len(got), kind, 2*sessions, got)
	}
	for i := 0; i < len(got); i += 2 {
		ws, spdy := got[i], got[i+1]
		if !ws.IsWebSocket() || ws.Status != 400 || ws.Upgraded {
			t.Errorf("request %d: %s Upgrade %q answered %d (upgraded %v), want a WebSocket upgrade refused with 400", i, ws.Method, ws.Upgrade, ws.Status, ws.Upgraded)
		}
		if !spdy.IsSPDY() || spdy.Method != "POST" {
			t.Errorf("request %d: %s Upgrade %q, want the SPDY fallback", i+1, spdy.Method, spdy.Upgrade)
		}
	}
}

// TestAuthorization checks that the Cluster asks the apiserver whether the
// client may exec, as the apiserver would.
func TestAuthorization(t *testing.T) {
	f := newFixture(t, fakecluster.Options{})
	// alice may read the pod (so kubectl gets as far as exec), nothing more
	f.admin.mustRun(t, nil, "create", "role", "pod-reader", "-n", f.namespace, "--verb", "get,list", "--resource", "pods")
	f.admin.mustRun(t, nil, "create", "rolebinding", "alice-reads", "-n", f.namespace, "--role", "pod-reader", "--user", "alice")
	alice := newKubectl(t, f.cluster, f.api.Tokens[aliceUser])
	for _, m := range remoteCommandModes {
		t.Run(m.name, func(t *testing.T) {
			r := alice.with(m.env...).run(nil, "exec", "-n", f.namespace, f.pod, "--", "echo", "no")
			if r.exitCode <= 0 || !strings.Contains(r.stderr, `User "alice" cannot create resource "pods/exec"`) {
				t.Errorf("alice's exec: exit %d, stdout %q, stderr %q; want forbidden", r.exitCode, r.stdout, r.stderr)
			}
		})
	}
	// impersonation reaches the check too: admin acting as alice
	r := f.admin.run(nil, "exec", "--as", "alice", "-n", f.namespace, f.pod, "--", "echo", "no")
	if r.exitCode <= 0 || !strings.Contains(r.stderr, `User "alice" cannot`) {
		t.Errorf("exec as alice: exit %d, stderr %q; want forbidden", r.exitCode, r.stderr)
	}
	if got := f.admin.mustRun(t, nil, "exec", "-n", f.namespace, f.pod, "--", "echo", "yes"); got != "yes\n" {
		t.Errorf("admin's exec printed %q", got)
	}
}

// writeRandomFile writes size pseudo-random bytes to path and returns their
// sha256.
func writeRandomFile(t *testing.T, path string, size int, seed uint64) string {
	t.Helper()
	file, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	hash := sha256.New()
	w := bufio.NewWriter(io.MultiWriter(file, hash))
	rng := rand.NewChaCha8([32]byte{byte(seed)})
	if _, err := io.CopyN(w, rng, int64(size)); err != nil {
		t.Fatal(err)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(hash.Sum(nil))
}

func fileSum(t *testing.T, path string) string {
	t.Helper()
	file, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	hash := sha256.New()
	if _, err := io.Copy(hash, file); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(hash.Sum(nil))
}

func randomBytes(size int, seed uint64) []byte {
	b := make([]byte, size)
	var key [32]byte
	for i := range 8 {
		key[i] = byte(seed >> (8 * i))
	}
	_, _ = rand.NewChaCha8(key).Read(b)
	return b
}
