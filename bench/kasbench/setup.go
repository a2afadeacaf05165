package kasbench

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/caddy-kas/caddy-kas/internal/testca"
)

// binaries are the programs under test, built like a release.
type binaries struct {
	caddy, agentk, agentsim string
}

// build compiles cmd/caddy, cmd/agentk and the agent simulator into dir.
// Release builds are stripped and use -trimpath; the smoke test skips both
// so that it shares the build cache with go vet and go build.
// The simulator is left out when withSim is false (a baseline tree may
// not have it).
func build(ctx context.Context, root, dir string, release, withSim bool, log io.Writer) (binaries, error) {
	args := []string{"build", "-o", dir + string(filepath.Separator)}
	if release {
		args = append(args, "-trimpath", "-ldflags=-s -w")
	}
	args = append(args, "./cmd/caddy", "./cmd/agentk")
	if withSim {
		args = append(args, "./bench/cmd/agentsim")
	}
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Run(); err != nil {
		return binaries{}, fmt.Errorf("go %s: %w", strings.Join(args, " "), err)
	}
	return binaries{
		caddy:    filepath.Join(dir, "caddy"),
		agentk:   filepath.Join(dir, "agentk"),
		agentsim: filepath.Join(dir, "agentsim"),
	}, nil
}

// pki is a throwaway CA and one server certificate for 127.0.0.1 and
// localhost, used by Caddy and the upstream alike.
type pki struct {
	caFile, certFile, keyFile string
	pool                      *x509.CertPool
	cert                      tls.Certificate
}

func newPKI(dir string) (*pki, error) {
	ca, err := testca.New("kasbench throwaway CA")
	if err != nil {
		return nil, err
	}
	p := &pki{
		caFile:   filepath.Join(dir, "ca.pem"),
		certFile: filepath.Join(dir, "server.pem"),
		keyFile:  filepath.Join(dir, "server-key.pem"),
		pool:     ca.Pool,
		cert:     ca.Server,
	}
	for path, data := range map[string][]byte{p.caFile: ca.CAPEM, p.certFile: ca.CertPEM, p.keyFile: ca.KeyPEM} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return nil, fmt.Errorf("writing %s: %w", filepath.Base(path), err)
		}
	}
	return p, nil
}

// randomToken returns a fresh random secret.
func randomToken() string {
	b := make([]byte, 24)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// freePorts returns n loopback TCP ports that were free a moment ago.
func freePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("finding a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// process is one child process the harness started and owns.
type process struct {
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited
	err  error         // exit status, set before done is closed
}

// startProcess starts bin with args; its output goes to <dir>/<name>.log.
func startProcess(name, bin, dir string, args, env []string) (*process, error) {
	logFile, err := os.Create(filepath.Join(dir, name+".log"))
	if err != nil {
		return nil, fmt.Errorf("creating the log of %s: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, done: make(chan struct{})}
	go func() { // owned by p: ends when the process exits, which stop forces
		p.err = cmd.Wait()
		logFile.Close()
		close(p.done)
	}()
	return p, nil
}

func (p *process) pid() int { return p.cmd.Process.Pid }

func (p *process) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// stop asks the process to end (SIGTERM), then kills it after a grace
// period, and waits for it.
func (p *process) stop() {
	if !p.running() {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// cpuTime is the user+system CPU time the process has used so far.
func cpuTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("reading cpu time: %w", err)
	}
	// Fields after the command name, which is in parentheses and may
	// contain spaces: state is field 3, utime 14, stime 15.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("malformed /proc stat")
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, errors.New("malformed /proc stat")
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("parsing /proc stat: %w", err)
	}
	// USER_HZ is 100 on every Linux architecture Go supports.
	return time.Duration(utime+stime) * 10 * time.Millisecond, nil
}

// memory is what /proc/<pid>/status says about a process's memory.
type memory struct {
	rss, peak int64 // VmRSS and VmHWM, bytes
	threads   int
}

func readMemory(pid int) (memory, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return memory{}, fmt.Errorf("reading memory: %w", err)
	}
	defer f.Close()
	var m memory
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fs := strings.Fields(v)
		if len(fs) == 0 {
			continue
		}
		n, _ := strconv.ParseInt(fs[0], 10, 64)
		switch k {
		case "VmRSS":
			m.rss = n << 10
		case "VmHWM":
			m.peak = n << 10
		case "Threads":
			m.threads = int(n)
		}
	}
	return m, sc.Err()
}

// goStats are the Go runtime's own numbers, from a Prometheus endpoint.
type goStats struct {
	heapInuse  float64 // go_memstats_heap_inuse_bytes
	goroutines float64 // go_goroutines
}

// readGoStats reads go_memstats from a Prometheus text endpoint. If gcURL is
// set, it is fetched first: Caddy's admin API collects garbage before it
// answers /debug/pprof/heap?gc=1, which makes heap numbers comparable.
func readGoStats(client *http.Client, metricsURL, gcURL string) (goStats, error) {
	if gcURL != "" {
		resp, err := client.Get(gcURL)
		if err != nil {
			return goStats{}, fmt.Errorf("collecting garbage: %w", err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	resp, err := client.Get(metricsURL)
	if err != nil {
		return goStats{}, fmt.Errorf("reading metrics: %w", err)
	}
	defer resp.Body.Close()
	var s goStats
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err != nil {
			continue
		}
		switch name {
		case "go_memstats_heap_inuse_bytes":
			s.heapInuse = v
		case "go_goroutines":
			s.goroutines = v
		}
	}
	return s, sc.Err()
}

// eventually calls f until it succeeds or timeout passes.
func eventually(ctx context.Context, timeout time.Duration, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// raiseFileLimit lifts the soft limit on open files to the hard limit and
// returns it; children inherit it.
func raiseFileLimit() (uint64, error) {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return 0, fmt.Errorf("reading the open files limit: %w", err)
	}
	l.Cur = l.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return 0, fmt.Errorf("raising the open files limit: %w", err)
	}
	return l.Max, nil
}

// procCounters are the work counters of a process that Linux keeps: its CPU
// time, the read- and write-type system calls it made (/proc/<pid>/io: on
// sockets these are the reads and writes of every connection, one TLS
// record or more each), and the times its threads were switched off a core
// (voluntarily: waiting for a goroutine of another thread, the network or a
// timer; or pre-empted).
type procCounters struct {
	cpu             time.Duration
	reads, writes   int64
	contextSwitches int64
}

func (a procCounters) sub(b procCounters) procCounters {
	return procCounters{cpu: a.cpu - b.cpu, reads: a.reads - b.reads, writes: a.writes - b.writes,
		contextSwitches: a.contextSwitches - b.contextSwitches}
}

func (a procCounters) add(b procCounters) procCounters {
	return procCounters{cpu: a.cpu + b.cpu, reads: a.reads + b.reads, writes: a.writes + b.writes,
		contextSwitches: a.contextSwitches + b.contextSwitches}
}

// readCounters reads the counters of process pid. A counter that cannot be
// read stays zero: CPU time is what every table needs, the others only
// the budget table.
func readCounters(pid int) procCounters {
	var c procCounters
	c.cpu, _ = cpuTime(pid)
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid)); err == nil {
		c.reads = procField(string(b), "syscr:")
		c.writes = procField(string(b), "syscw:")
	}
	// Context switches are counted per thread; Go's threads live as long
	// as the process, so the sum over the live ones is the process's.
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, t.Name()))
		if err != nil {
			continue
		}
		c.contextSwitches += procField(string(b), "voluntary_ctxt_switches:") + procField(string(b), "nonvoluntary_ctxt_switches:")
	}
	return c
}

// procField is the number after name at the start of a line of a /proc
// file, 0 if there is none.
func procField(s, name string) int64 {
	for line := range strings.Lines(s) {
		if rest, ok := strings.CutPrefix(line, name); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(rest), 10, 64)
			return n
		}
	}
	return 0
}
