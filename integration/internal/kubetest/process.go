package kubetest

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// StopGrace is how long a process may take to exit after SIGTERM before it
// gets SIGKILL.
const StopGrace = 10 * time.Second

// Process is one child process. Its stdout and stderr go straight to files
// (the child writes them itself, so no copying goroutine is needed), which
// tests read to look for log lines and print on failure.
type Process struct {
	Name       string // names the process in messages
	cmd        *exec.Cmd
	stdoutPath string
	stderrPath string
	exited     chan struct{} // closed once the child has been reaped
	waitErr    error         // the result of cmd.Wait, valid once exited is closed
}

// ProcessSpec is what StartProcess starts.
type ProcessSpec struct {
	Name   string   // names the log files and the process in messages
	Binary string   // path of the executable
	Args   []string // arguments after the executable
	Env    []string // the complete environment of the child
	LogDir string   // where <Name>.stdout and <Name>.stderr are created
}

// StartProcess starts spec and a goroutine that reaps it; the caller owns the
// returned process and must stop it.
func StartProcess(spec ProcessSpec) (*Process, error) {
	stdout, stdoutPath, err := createLogFile(spec.LogDir, spec.Name, "stdout")
	if err != nil {
		return nil, err
	}
	defer stdout.Close() // the child keeps its own copy of the descriptor
	stderr, stderrPath, err := createLogFile(spec.LogDir, spec.Name, "stderr")
	if err != nil {
		return nil, err
	}
	defer stderr.Close()

	cmd := exec.Command(spec.Binary, spec.Args...)
	cmd.Env = spec.Env
	cmd.Stdout = stdout
	cmd.Stderr = stderr
	cmd.SysProcAttr = ChildProcAttr()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.Name, err)
	}
	p := &Process{
		Name:       spec.Name,
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

// Pid is the process ID of the child.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Running reports whether the child has not been reaped yet.
func (p *Process) Running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// Exited is closed once the child has been reaped.
func (p *Process) Exited() <-chan struct{} { return p.exited }

// WaitErr is the result of waiting for the child; call it only after it
// exited.
func (p *Process) WaitErr() error { return p.waitErr }

// ExitError describes how the process ended; call it only after it exited.
func (p *Process) ExitError() error {
	if p.waitErr == nil {
		return fmt.Errorf("%s exited with status 0", p.Name)
	}
	return fmt.Errorf("%s exited: %w", p.Name, p.waitErr)
}

// Stop sends SIGTERM and waits; after grace it sends SIGKILL. It reports
// whether the process needed SIGKILL.
func (p *Process) Stop(grace time.Duration) (killed bool) {
	if !p.Running() {
		return false
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	timer := time.NewTimer(grace)
	defer timer.Stop()
	select {
	case <-p.exited:
		return false
	case <-timer.C:
		p.Kill()
		return true
	}
}

// Kill sends SIGKILL and waits until the process has been reaped.
func (p *Process) Kill() {
	_ = p.cmd.Process.Kill()
	<-p.exited
}

// Stdout is what the process wrote to its stdout so far.
func (p *Process) Stdout() string { return readLog(p.stdoutPath) }

// Stderr is what the process wrote to its stderr so far.
func (p *Process) Stderr() string { return readLog(p.stderrPath) }

func readLog(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("<cannot read %s: %v>", filepath.Base(path), err)
	}
	return string(b)
}

// LastLines is the last n lines of text.
func LastLines(text string, n int) string {
	lines := strings.Split(text, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// FreeLoopbackPorts returns n TCP ports that were free on 127.0.0.1 a
// moment ago and that it has not returned before in this process. They are
// taken below the kernel's ephemeral range (ip_local_port_range): a port
// from the range, free when picked, can be handed to any connection's local
// end or any listener on port 0 before the test's process binds it, which
// made a Caddy fail to start with "address already in use" now and then
// while other tests ran.
func FreeLoopbackPorts(n int) ([]int, error) {
	low, high := 10000, ephemeralLow()-1
	portsMu.Lock()
	defer portsMu.Unlock()
	ports := make([]int, 0, n)
	for attempts := 0; len(ports) < n; attempts++ {
		if attempts == 10*(high-low) {
			return nil, fmt.Errorf("pick a free port: none free in %d-%d", low, high)
		}
		p := low + rand.IntN(high-low+1)
		if portsGiven[p] {
			continue
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue // in use
		}
		l.Close()
		portsGiven[p] = true
		ports = append(ports, p)
	}
	return ports, nil
}

// portsMu guards portsGiven, the ports FreeLoopbackPorts returned.
var (
	portsMu    sync.Mutex
	portsGiven = map[int]bool{}
)

// ephemeralLow is the first port of the kernel's ephemeral range, 32768
// if it cannot be read.
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 32768
	}
	low, err := strconv.Atoi(f[0])
	if err != nil || low <= 11000 {
		return 32768
	}
	return low
}

// errPermanent marks an error that ends Eventually's polling at once.
type errPermanent struct{ err error }

func (e errPermanent) Error() string { return e.err.Error() }
func (e errPermanent) Unwrap() error { return e.err }

// Permanent marks err as one that ends Eventually's polling at once.
func Permanent(err error) error { return errPermanent{err} }

// PollInterval is how often Eventually calls its condition.
const PollInterval = 100 * time.Millisecond

// Eventually calls condition until it returns nil, returns an error wrapped
// by Permanent, or timeout has passed. The timeout is a generous upper bound
// for waiting, never an assertion about speed.
func Eventually(timeout time.Duration, condition func() error) error {
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
		time.Sleep(PollInterval)
	}
}
