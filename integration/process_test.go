package integration

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// stopGrace is how long a process may take to exit after SIGTERM before it
// gets SIGKILL.
const stopGrace = 10 * time.Second

// process is one child process. Its stdout and stderr go straight to files
// (the child writes them itself, so no copying goroutine is needed), which
// tests read to look for log lines and print on failure.
type process struct {
	name       string
	cmd        *exec.Cmd
	stdoutPath string
	stderrPath string
	exited     chan struct{} // closed once the child has been reaped
	waitErr    error         // the result of cmd.Wait, valid once exited is closed
}

type processSpec struct {
	name   string   // names the log files and the process in messages
	binary string   // path of the executable
	args   []string // arguments after the executable
	env    []string // the complete environment of the child
	logDir string   // where <name>.stdout and <name>.stderr are created
}

// startProcess starts spec and a goroutine that reaps it; the caller owns the
// returned process and must stop it.
func startProcess(spec processSpec) (*process, error) {
	stdout, stdoutPath, err := createLogFile(spec.logDir, spec.name, "stdout")
	if err != nil {
		return nil, err
	}
	defer stdout.Close() // the child keeps its own copy of the descriptor
	stderr, stderrPath, err := createLogFile(spec.logDir, spec.name, "stderr")
	if err != nil {
		return nil, err
	}
	defer stderr.Close()

	cmd := exec.Command(spec.binary, spec.args...)
	cmd.Env = spec.env
	cmd.Stdout = stdout
	cmd.Stderr = stderr
	cmd.SysProcAttr = childProcAttr()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.name, err)
	}
	p := &process{
		name:       spec.name,
		cmd:        cmd,
		stdoutPath: stdoutPath,
		stderrPath: stderrPath,
		exited:     make(chan struct{}),
	}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// createLogFile creates <dir>/<name>.<stream>, adding a counter to the name
// when a process of the same name ran before (a restarted agentk, say), so
// earlier logs stay readable.
func createLogFile(dir, name, stream string) (*os.File, string, error) {
	for i := 1; ; i++ {
		base := name
		if i > 1 {
			base = fmt.Sprintf("%s.%d", name, i)
		}
		path := filepath.Join(dir, base+"."+stream)
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if errors.Is(err, os.ErrExist) {
			continue
		}
		if err != nil {
			return nil, "", fmt.Errorf("create log file: %w", err)
		}
		return f, path, nil
	}
}

func (p *process) pid() int { return p.cmd.Process.Pid }

func (p *process) running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// exitError describes how the process ended; call it only after it exited.
func (p *process) exitError() error {
	if p.waitErr == nil {
		return fmt.Errorf("%s exited with status 0", p.name)
	}
	return fmt.Errorf("%s exited: %w", p.name, p.waitErr)
}

// stop sends SIGTERM and waits; after grace it sends SIGKILL. It reports
// whether the process needed SIGKILL.
func (p *process) stop(grace time.Duration) (killed bool) {
	if !p.running() {
		return false
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	timer := time.NewTimer(grace)
	defer timer.Stop()
	select {
	case <-p.exited:
		return false
	case <-timer.C:
		p.kill()
		return true
	}
}

// kill sends SIGKILL and waits until the process has been reaped.
func (p *process) kill() {
	_ = p.cmd.Process.Kill()
	<-p.exited
}

func (p *process) stdout() string { return readLog(p.stdoutPath) }
func (p *process) stderr() string { return readLog(p.stderrPath) }

func readLog(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("<cannot read %s: %v>", filepath.Base(path), err)
	}
	return string(b)
}

// startOwnedProcess starts spec for the test t and makes t its owner: at the
// end of the test the process is stopped, its output is checked for data race
// reports and leaked tokens, and on failure the tail of its output is logged.
func startOwnedProcess(t testing.TB, spec processSpec) *process {
	t.Helper()
	p, err := startProcess(spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if p.stop(stopGrace) {
			t.Logf("%s did not exit within %s of SIGTERM and was killed", p.name, stopGrace)
		}
		checkProcessOutput(t, p)
		if t.Failed() {
			logTail(t, p)
		}
	})
	return p
}

// checkProcessOutput fails t when the process printed a data race report
// (the product binaries are built with -race when the tests are) or one of
// the tokens the tests made.
func checkProcessOutput(t testing.TB, p *process) {
	t.Helper()
	output := p.stdout() + p.stderr()
	if strings.Contains(output, "WARNING: DATA RACE") {
		t.Errorf("%s reported a data race (see its stderr below)", p.name)
	}
	if label, found := leakedSecret(output); found {
		t.Errorf("the output of %s contains %s", p.name, label)
	}
}

const tailLineCount = 60

// noisyLoggers are Caddy loggers whose debug lines (certificate handling,
// TLS handshakes, events) would crowd everything else out of a log tail.
var noisyLoggers = []string{"events", "tls", "pki", "http.auto_https"}

func logTail(t testing.TB, p *process) {
	t.Helper()
	for _, stream := range []struct{ name, text string }{{"stdout", p.stdout()}, {"stderr", p.stderr()}} {
		text := strings.TrimSpace(withoutNoisyLines(stream.text))
		if text == "" {
			continue
		}
		t.Logf("--- last %d lines of %s %s (without TLS and event lines) ---\n%s",
			tailLineCount, p.name, stream.name, redact(lastLines(text, tailLineCount)))
	}
}

// withoutNoisyLines drops the JSON log lines of noisyLoggers from log.
func withoutNoisyLines(log string) string {
	var b strings.Builder
	for line := range strings.Lines(log) {
		var entry struct {
			Logger string `json:"logger"`
		}
		if json.Unmarshal([]byte(line), &entry) == nil && isNoisyLogger(entry.Logger) {
			continue
		}
		b.WriteString(line)
	}
	return b.String()
}

func isNoisyLogger(name string) bool {
	for _, noisy := range noisyLoggers {
		if name == noisy || strings.HasPrefix(name, noisy+".") {
			return true
		}
	}
	return false
}

func lastLines(text string, n int) string {
	lines := strings.Split(text, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// freeLoopbackPorts returns n distinct TCP ports that were free on 127.0.0.1 a
// moment ago. All listeners are held until every port is picked, so the ports
// differ from each other.
func freeLoopbackPorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("pick a free port: %w", err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func mustFreeLoopbackPorts(t testing.TB, n int) []int {
	t.Helper()
	ports, err := freeLoopbackPorts(n)
	if err != nil {
		t.Fatal(err)
	}
	return ports
}

// errPermanent marks an error that ends eventually's polling at once.
type errPermanent struct{ err error }

func (e errPermanent) Error() string { return e.err.Error() }
func (e errPermanent) Unwrap() error { return e.err }

func permanent(err error) error { return errPermanent{err} }

const pollInterval = 100 * time.Millisecond

// eventually calls condition until it returns nil, returns an error wrapped by
// permanent, or timeout has passed. The timeout is a generous upper bound for
// waiting, never an assertion about speed.
func eventually(timeout time.Duration, condition func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := condition()
		if err == nil {
			return nil
		}
		var stop errPermanent
		if errors.As(err, &stop) {
			return stop.err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("still not done after %s: %w", timeout, err)
		}
		time.Sleep(pollInterval)
	}
}
