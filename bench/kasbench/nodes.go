package kasbench

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// crossNodeName labels the rows of client → node A → node B → agentk.
const crossNodeName = "cross-node"

// crossNode is two Caddy nodes sharing their tunnels through one Redis,
// with agentk connected to node B only, and clients that send to node A:
// every request is forwarded from A to B over the private API.
type crossNode struct {
	redis  *process
	a, b   *caddyServer
	agent  *agentkProcess
	h1, h2 target
}

func (n *crossNode) stop() {
	closeClients(n.h1, n.h2)
	if n.agent != nil {
		n.agent.proc.stop()
	}
	for _, c := range []*caddyServer{n.a, n.b} {
		if c != nil {
			c.proc.stop()
		}
	}
	if n.redis != nil {
		n.redis.stop()
	}
}

// route is the cross-node row for proto: the CPU of both nodes and of
// agentk counts.
func (n *crossNode) route(proto string) route {
	t := n.h1
	if proto == "h2" {
		t = n.h2
	}
	return route{caddy: n.a, holder: n.b, agent: n.agent, t: t, profileSuffix: "-" + crossNodeName}
}

// findRedis returns the path of redis-server and its version, or "" and
// why the cross-node rows are left out. Its absence never fails a run.
func findRedis(ctx context.Context, cfg Config) (bin, version, note string) {
	if cfg.Skip["nodes"] {
		return "", "", "rows left out (-skip nodes)"
	}
	return lookRedis(ctx)
}

// lookRedis returns the path of redis-server on PATH and its version, or ""
// and why the rows that need it are left out.
func lookRedis(ctx context.Context) (bin, version, note string) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return "", "", "rows left out: no redis-server on PATH (Debian's package redis-server)"
	}
	vctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(vctx, bin, "--version").Output()
	if err != nil {
		return "", "", fmt.Sprintf("rows left out: redis-server --version failed: %v", err)
	}
	// "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=..."
	version = strings.TrimSpace(string(out))
	for _, f := range strings.Fields(version) {
		if v, ok := strings.CutPrefix(f, "v="); ok {
			version = v
		}
	}
	return bin, version, ""
}

// startCrossNode starts redis-server (redisBin), node B with agentk
// connected to it, and node A, and waits until a request sent to node A
// reaches the upstream through node B.
func startCrossNode(ctx context.Context, cfg Config, bins binaries, redisBin string, p *pki, up *upstream, dir string) (_ *crossNode, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating %s: %w", dir, err)
	}
	n := &crossNode{}
	defer func() {
		if err != nil {
			n.stop()
		}
	}()
	ports, err := freePorts(3)
	if err != nil {
		return nil, err
	}
	var redisAddr string
	if n.redis, redisAddr, err = startRedis(ctx, redisBin, dir, ports[0]); err != nil {
		return nil, err
	}

	// One private API secret, shared by every node.
	secretFile := filepath.Join(dir, "private-api.secret")
	if err := writePrivateAPISecret(secretFile); err != nil {
		return nil, err
	}
	// Every node accepts the same agent and user tokens.
	agentToken, userToken := randomToken(), randomToken()
	settings := func(port int) *nodeSettings {
		return &nodeSettings{RedisAddr: redisAddr, SecretFile: secretFile, PrivatePort: port,
			agentToken: agentToken, userToken: userToken}
	}
	if n.b, err = startCaddy(ctx, bins.caddy, filepath.Join(dir, "node-b"), p, 0, false, cfg.CaddyEnv, settings(ports[1])); err != nil {
		return nil, fmt.Errorf("node B: %w", err)
	}
	kubeconfig, err := writeKubeconfig(dir, p, up)
	if err != nil {
		return nil, err
	}
	if n.agent, err = startAgentk(ctx, bins.agentk, filepath.Join(dir, "node-b"), p, n.b, kubeconfig, cfg.AgentkEnv); err != nil {
		return nil, fmt.Errorf("agentk on node B: %w", err)
	}
	if n.a, err = startCaddy(ctx, bins.caddy, filepath.Join(dir, "node-a"), p, 0, false, cfg.CaddyEnv, settings(ports[2])); err != nil {
		return nil, fmt.Errorf("node A: %w", err)
	}
	auth := "Bearer pat:1:" + n.a.userTok
	n.h1 = target{name: crossNodeName, proto: "h1", client: newClient(p.pool, false), base: n.a.proxyURL, auth: auth}
	n.h2 = target{name: crossNodeName, proto: "h2", client: newClient(p.pool, true), base: n.a.proxyURL, auth: auth}
	// The path works before anything is measured. Node A learns of the
	// agent from Redis, which may take a moment after the tunnel is up.
	for _, t := range []target{n.h1, n.h2} {
		err := eventually(ctx, time.Minute, func() error {
			rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			return t.do(rctx, nil, http.MethodGet, "/1k", nil)
		})
		if err != nil {
			return nil, fmt.Errorf("first request through node A to node B (%s): %w", t.proto, err)
		}
	}
	return n, nil
}

// writePrivateAPISecret writes a new secret for GitLab's private API (the
// API between KAS nodes) to path: base64 of exactly 32 bytes.
func writePrivateAPISecret(path string) error {
	secret := make([]byte, 32)
	rand.Read(secret)
	if err := os.WriteFile(path, []byte(base64.StdEncoding.EncodeToString(secret)+"\n"), 0o600); err != nil {
		return fmt.Errorf("writing the private API secret: %w", err)
	}
	return nil
}

// startRedis starts redis-server (bin) on 127.0.0.1:port, keeping nothing
// on disk, with its log in dir, and waits until it answers PING. It returns
// the process and its address; on failure, the process is stopped.
func startRedis(ctx context.Context, bin, dir string, port int) (*process, string, error) {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	proc, err := startProcess("redis-server", bin, dir, []string{
		"--bind", "127.0.0.1", "--port", strconv.Itoa(port), "--save", "", "--appendonly", "no", "--dir", dir,
	}, os.Environ())
	if err != nil {
		return nil, "", err
	}
	if err := eventually(ctx, time.Minute, func() error { return pingRedis(addr, proc) }); err != nil {
		proc.stop()
		return nil, "", fmt.Errorf("redis-server did not start: %w (see redis-server.log)", err)
	}
	return proc, addr, nil
}

// pingRedis sends one PING in Redis's protocol and expects PONG.
func pingRedis(addr string, proc *process) error {
	if !proc.running() {
		return fmt.Errorf("redis-server exited: %v", proc.err)
	}
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := conn.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(line) != "+PONG" {
		return fmt.Errorf("redis-server answered PING with %q", strings.TrimSpace(line))
	}
	return nil
}
