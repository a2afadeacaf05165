package fakecluster

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	utilexec "k8s.io/utils/exec"
)

// These tests need no apiserver: they check the fake runtime's commands on
// their own. The end-to-end tests with kubectl are in fakecluster_test.go.

func TestPodSubresource(t *testing.T) {
	for _, tc := range []struct {
		path         string
		ns, pod, sub string
		ok           bool
	}{
		{"/api/v1/namespaces/ns/pods/p/exec", "ns", "p", "exec", true},
		{"/api/v1/namespaces/ns/pods/p/attach", "ns", "p", "attach", true},
		{"/api/v1/namespaces/ns/pods/p/portforward", "ns", "p", "portforward", true},
		{"/api/v1/namespaces/ns/pods/p/log", "ns", "p", "log", true},
		{"/api/v1/namespaces/ns/pods/p/status", "", "", "", false},
		{"/api/v1/namespaces/ns/pods/p", "", "", "", false},
		{"/api/v1/namespaces/ns/services/p/exec", "", "", "", false},
		{"/apis/apps/v1/namespaces/ns/pods/p/exec", "", "", "", false},
		{"/api/v1/namespaces//pods/p/exec", "", "", "", false},
	} {
		ns, pod, sub, ok := podSubresource(tc.path)
		if ns != tc.ns || pod != tc.pod || string(sub) != tc.sub || ok != tc.ok {
			t.Errorf("podSubresource(%q) = %q, %q, %q, %v", tc.path, ns, pod, sub, ok)
		}
	}
}

// runCommand runs args in a container with fs and returns stdout, stderr
// and the exit code (-1 for an error that is no exit code).
func runCommand(t *testing.T, fs *memFS, stdin string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errOut bytes.Buffer
	p := &process{
		ctx:       context.Background(),
		namespace: "ns",
		pod:       "pod",
		container: "main",
		fs:        fs,
		args:      args,
		stdout:    &out,
		stderr:    &errOut,
		tasks:     &group{},
	}
	if stdin != "" {
		p.stdin = strings.NewReader(stdin)
	}
	r := &fakeRuntime{tasks: p.tasks, stats: newStats()}
	err := r.run(p)
	var exitErr utilexec.ExitError
	switch {
	case err == nil:
		code = 0
	case errors.As(err, &exitErr):
		code = exitErr.ExitStatus()
	default:
		t.Logf("%q: %v", args, err)
		code = -1
	}
	return out.String(), errOut.String(), code
}

func TestCommands(t *testing.T) {
	fs := newMemFS()
	for _, tc := range []struct {
		args      []string
		stdin     string
		stdout    string
		stderrHas string
		code      int
	}{
		{args: []string{"echo", "a", "b"}, stdout: "a b\n"},
		{args: []string{"cat"}, stdin: "piped", stdout: "piped"},
		{args: []string{"stderr", "oops"}, stderrHas: "oops"},
		{args: []string{"exit", "5"}, code: 5},
		{args: []string{"sh", "-c", "exit 9"}, code: 9},
		{args: []string{"sh", "-c", "echo via sh"}, stdout: "via sh\n"},
		{args: []string{"sh", "-c", "echo a | cat"}, stderrHas: "simple commands", code: 2},
		{args: []string{"test", "-d", "/tmp"}},
		{args: []string{"test", "-d", "/nope"}, code: 1},
		{args: []string{"mkdir", "/a/b"}, stderrHas: "No such file", code: 1},
		{args: []string{"mkdir", "-p", "/a/b"}},
		{args: []string{"ls", "/a"}, stdout: "b\n"},
		{args: []string{"nope"}, stderrHas: "executable file not found", code: 126},
		{args: []string{"tty-size"}, stderrHas: "not a terminal", code: 1},
	} {
		stdout, stderr, code := runCommand(t, fs, tc.stdin, tc.args...)
		if stdout != tc.stdout || !strings.Contains(stderr, tc.stderrHas) || code != tc.code {
			t.Errorf("%q: stdout %q, stderr %q, exit %d; want stdout %q, stderr with %q, exit %d",
				tc.args, stdout, stderr, code, tc.stdout, tc.stderrHas, tc.code)
		}
	}
}

// TestTar runs the tar commands kubectl cp runs, in both directions.
func TestTar(t *testing.T) {
	src := newMemFS()
	for path, content := range map[string]string{"/tmp/dir/a.txt": "alpha", "/tmp/dir/sub/b.txt": "beta"} {
		if err := src.writeFile(path, []byte(content), 0o644, true); err != nil {
			t.Fatal(err)
		}
	}
	if err := src.mkdirAll("/tmp/dir/empty", 0o755); err != nil {
		t.Fatal(err)
	}

	archive, stderr, code := runCommand(t, src, "", "tar", "cf", "-", "/tmp/dir")
	if code != 0 || !strings.Contains(stderr, "Removing leading") {
		t.Fatalf("tar cf: exit %d, stderr %q", code, stderr)
	}

	dst := newMemFS()
	if err := dst.mkdirAll("/restore", 0o755); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"tar", "-xmf", "-", "-C", "/restore"},
		{"tar", "--no-same-permissions", "--no-same-owner", "-xmf", "-", "-C", "/restore"},
		{"tar", "xf", "-", "-C", "/restore"},
	} {
		if _, stderr, code := runCommand(t, dst, archive, args...); code != 0 {
			t.Fatalf("%q: exit %d, stderr %q", args, code, stderr)
		}
		for path, want := range map[string]string{"/restore/tmp/dir/a.txt": "alpha", "/restore/tmp/dir/sub/b.txt": "beta"} {
			if got, err := dst.readFile(path); err != nil || string(got) != want {
				t.Errorf("%q: %s holds %q (%v), want %q", args, path, got, err, want)
			}
		}
		if !dst.isDir("/restore/tmp/dir/empty") {
			t.Errorf("%q: the empty directory is missing", args)
		}
	}

	if _, stderr, code := runCommand(t, dst, archive, "tar", "-xmf", "-", "-C", "/missing"); code != 2 || !strings.Contains(stderr, "Cannot open") {
		t.Errorf("extracting into a missing directory: exit %d, stderr %q", code, stderr)
	}
	if _, stderr, code := runCommand(t, src, "", "tar", "cf", "-", "/nope"); code != 2 || !strings.Contains(stderr, "Cannot stat") {
		t.Errorf("archiving a missing path: exit %d, stderr %q", code, stderr)
	}
}
