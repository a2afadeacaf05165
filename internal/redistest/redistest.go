// Package redistest starts real Redis servers for tests: a single server,
// a master with a replica watched by three sentinels, and a cluster of
// three masters. Each runs from Debian's redis-server and redis-sentinel
// on free loopback ports, keeps nothing but its temporary directory, and
// is stopped when the test ends.
//
// Without the binaries the test is skipped, or fails under CI=true, where
// every test must run.
package redistest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// StartTimeout bounds the wait for a server, a set of sentinels or a
// cluster to be ready; generous because tests share a small machine.
const StartTimeout = 30 * time.Second

// Binary returns the path of the named Redis program (redis-server,
// redis-sentinel or redis-cli), skipping t without it, or failing it
// under CI=true.
func Binary(t testing.TB, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		msg := fmt.Sprintf("%s is needed: %v (Debian's package %s)", name, err, debianPackage(name))
		if os.Getenv("CI") == "true" {
			t.Fatal(msg + "; CI=true requires every test to run")
		}
		t.Skip(msg)
	}
	return path
}

func debianPackage(name string) string {
	if name == "redis-sentinel" {
		return "redis-sentinel"
	}
	return "redis-server"
}

// Server is one redis-server (or redis-sentinel) process that a test can
// stop and start again on the same port.
type Server struct {
	t    testing.TB
	bin  string
	dir  string
	port int
	args []string

	mu   sync.Mutex // guards cmd and done
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// StartServer starts a redis-server on a free loopback port that keeps
// nothing on disk. extra are more command-line options.
func StartServer(t testing.TB, extra ...string) *Server {
	t.Helper()
	bin := Binary(t, "redis-server")
	port := FreePort(t)
	dir := t.TempDir()
	s := &Server{t: t, bin: bin, dir: dir, port: port}
	s.args = append([]string{
		"--bind", "127.0.0.1", "--port", strconv.Itoa(port), "--save", "", "--appendonly", "no",
		"--dir", dir, "--logfile", filepath.Join(dir, "redis.log"),
	}, extra...)
	s.Start()
	t.Cleanup(s.Stop)
	return s
}

// Addr is the server's host:port.
func (s *Server) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// Port is the server's port.
func (s *Server) Port() int { return s.port }

// Start starts the server if it is not running, and waits until it answers
// PING.
func (s *Server) Start() {
	s.t.Helper()
	s.mu.Lock()
	if s.cmd != nil {
		s.mu.Unlock()
		return
	}
	cmd := exec.Command(s.bin, s.args...)
	cmd.Dir = s.dir
	if err := cmd.Start(); err != nil {
		s.mu.Unlock()
		s.t.Fatalf("starting %s: %v", filepath.Base(s.bin), err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	s.cmd, s.done = cmd, done
	s.mu.Unlock()
	if err := waitPing(s.Addr(), done); err != nil {
		s.t.Fatalf("%s on %s did not start: %v (log in %s)", filepath.Base(s.bin), s.Addr(), err, s.dir)
	}
}

// Stop kills the server (SIGKILL, as a crash) and waits until it has
// exited; it does nothing if it is not running.
func (s *Server) Stop() {
	s.mu.Lock()
	cmd, done := s.cmd, s.done
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGKILL)
	<-done
}

// waitPing waits until addr answers PING, or the process ends (exited is
// closed), or StartTimeout passes.
func waitPing(addr string, exited <-chan struct{}) error {
	c := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1, DialTimeout: time.Second})
	defer c.Close()
	return eventually(exited, func(ctx context.Context) error { return c.Ping(ctx).Err() })
}

// eventually calls try until it succeeds, exited is closed, or
// StartTimeout passes.
func eventually(exited <-chan struct{}, try func(context.Context) error) error {
	deadline := time.Now().Add(StartTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := try(ctx)
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("the process exited: %w", err)
		default:
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// FreePort returns a loopback TCP port that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Sentinel is a master with one replica, watched by three sentinels that
// agree (quorum two) on a failover within a few seconds of the master's
// death.
type Sentinel struct {
	// MasterName is the name the sentinels know the master by.
	MasterName string
	// Master and Replica are the two servers; after a failover the
	// replica is the master.
	Master, Replica *Server
	// SentinelAddrs are the sentinels' host:port.
	SentinelAddrs []string
}

// StartSentinel starts a master, a replica of it and three sentinels, and
// waits until the sentinels know the replica, so that a failover can
// happen.
func StartSentinel(t testing.TB) *Sentinel {
	t.Helper()
	sentinelBin := Binary(t, "redis-sentinel")
	master := StartServer(t)
	replica := StartServer(t, "--replicaof", "127.0.0.1", strconv.Itoa(master.Port()))
	s := &Sentinel{MasterName: "caddy-kas-test", Master: master, Replica: replica}
	for i := range 3 {
		port := FreePort(t)
		dir := t.TempDir()
		conf := filepath.Join(dir, "sentinel.conf")
		text := fmt.Sprintf(`bind 127.0.0.1
port %d
dir %s
logfile %s
sentinel monitor %s 127.0.0.1 %d 2
sentinel down-after-milliseconds %[4]s 1000
sentinel failover-timeout %[4]s 10000
sentinel parallel-syncs %[4]s 1
`, port, dir, filepath.Join(dir, "sentinel.log"), s.MasterName, master.Port())
		if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
			t.Fatalf("writing sentinel %d's configuration: %v", i, err)
		}
		// A sentinel is run, answers PING and is stopped as a server is.
		sentinel := &Server{t: t, bin: sentinelBin, dir: dir, port: port, args: []string{conf}}
		sentinel.Start()
		t.Cleanup(sentinel.Stop)
		addr := sentinel.Addr()
		s.SentinelAddrs = append(s.SentinelAddrs, addr)
		sc := redis.NewSentinelClient(&redis.Options{Addr: addr, MaxRetries: -1, DialTimeout: time.Second})
		err := eventually(sentinel.done, func(ctx context.Context) error {
			replicas, err := sc.Replicas(ctx, s.MasterName).Result()
			if err != nil {
				return err
			}
			for _, r := range replicas {
				if r["port"] == strconv.Itoa(replica.Port()) && r["master-link-status"] == "ok" && !strings.Contains(r["flags"], "down") {
					return nil
				}
			}
			return errors.New("the sentinel does not know the replica yet")
		})
		_ = sc.Close()
		if err != nil {
			t.Fatalf("sentinel %s: %v (log in %s)", addr, err, dir)
		}
	}
	return s
}

// WaitFailover waits until the sentinels name the replica as the master,
// after the master was stopped.
func (s *Sentinel) WaitFailover(t testing.TB) {
	t.Helper()
	want := strconv.Itoa(s.Replica.Port())
	for _, addr := range s.SentinelAddrs {
		sc := redis.NewSentinelClient(&redis.Options{Addr: addr, MaxRetries: -1, DialTimeout: time.Second})
		err := eventually(nil, func(ctx context.Context) error {
			got, err := sc.GetMasterAddrByName(ctx, s.MasterName).Result()
			if err != nil {
				return err
			}
			if len(got) != 2 || got[1] != want {
				return fmt.Errorf("the master is still %v", got)
			}
			return nil
		})
		_ = sc.Close()
		if err != nil {
			t.Fatalf("no failover seen by sentinel %s: %v", addr, err)
		}
	}
}

// Cluster is a Redis Cluster of three masters without replicas.
type Cluster struct {
	Servers []*Server
}

// Addrs are the masters' host:port.
func (c *Cluster) Addrs() []string {
	var addrs []string
	for _, s := range c.Servers {
		addrs = append(addrs, s.Addr())
	}
	return addrs
}

// StartCluster starts three redis-server in cluster mode, joins them
// with redis-cli --cluster create, and waits until every node reports the
// cluster ok.
func StartCluster(t testing.TB) *Cluster {
	t.Helper()
	cli := Binary(t, "redis-cli")
	c := &Cluster{}
	for range 3 {
		// The cluster bus port is given explicitly: the default, port +
		// 10000, may not be free.
		busPort := FreePort(t)
		c.Servers = append(c.Servers, StartServer(t, "--cluster-enabled", "yes",
			"--cluster-config-file", "nodes.conf", "--cluster-port", strconv.Itoa(busPort),
			"--cluster-node-timeout", "2000"))
	}
	args := append([]string{"--cluster", "create"}, c.Addrs()...)
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	if out, err := exec.Command(cli, args...).CombinedOutput(); err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	for _, s := range c.Servers {
		rc := redis.NewClient(&redis.Options{Addr: s.Addr(), MaxRetries: -1, DialTimeout: time.Second})
		err := eventually(nil, func(ctx context.Context) error {
			info, err := rc.ClusterInfo(ctx).Result()
			if err != nil {
				return err
			}
			if !strings.Contains(info, "cluster_state:ok") {
				return errors.New("cluster_state is not ok yet")
			}
			return nil
		})
		_ = rc.Close()
		if err != nil {
			t.Fatalf("cluster node %s: %v", s.Addr(), err)
		}
	}
	return c
}
