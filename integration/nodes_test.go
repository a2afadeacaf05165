package integration

import (
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/agentadmin"
	"github.com/caddy-kas/caddy-kas/integration/fakecluster"
	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
	"github.com/caddy-kas/caddy-kas/internal/redistest"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/wsconn"
)

// Several Caddy nodes sharing their tunnels through a real Redis: each node
// is a Caddy of its own with the same agents and users, the redis block and
// a private API on loopback.

// redisSettings is how the nodes reach Redis: the body of the redis block.
type redisSettings string

func singleRedis(s *redistest.Server) redisSettings {
	return redisSettings("addresses " + s.Addr())
}

// startNodes starts n nodes of config sharing redis.
func startNodes(t *testing.T, s *suite, n int, config kasConfig, redis redisSettings) []*caddyServer {
	t.Helper()
	dir := testDir(t, s)
	secret := make([]byte, 32)
	for i := range secret {
		secret[i] = byte(i*7 + 3)
	}
	secretFile := writeSecretFile(t, dir, "private-api.secret", base64.StdEncoding.EncodeToString(secret))
	nodes := make([]*caddyServer, n)
	for i := range nodes {
		port := mustFreeLoopbackPorts(t, 1)[0]
		c := config
		c.kasExtra = fmt.Sprintf(`redis {
			%s
			tunnel_refresh 2s
			tunnel_ttl 5s
		}
		private_api {
			listen 127.0.0.1:%d
			secret_file %s
			own_url grpc://127.0.0.1:%d
		}`, redis, port, secretFile, port)
		nodes[i] = startCaddy(t, s, c)
	}
	return nodes
}

// startReplica starts an agentk of agent 1 connected to node, with pod name
// and the agent's cluster at kubeconfig.
func startReplica(t *testing.T, node *caddyServer, pod, kubeconfig string) *agentk {
	t.Helper()
	a := node.startAgentk(t, agentkOptions{agentID: 1, kubeconfig: kubeconfig, extraEnv: []string{"POD_NAME=" + pod}})
	a.waitReady(t)
	return a
}

// TestSeveralNodes: three nodes, agent 1 with one replica on A and one on
// B, and the real kubectl through C, which holds no tunnel: get, apply,
// watch, logs -f, exec and port-forward across the hop.
func TestSeveralNodes(t *testing.T) {
	t.Parallel()
	s := requireSuite(t)
	redis := redistest.StartServer(t)
	config := standardConfig()
	config.waitForAgent = "20s"
	nodes := startNodes(t, s, 3, config, singleRedis(redis))
	a, b, c := nodes[0], nodes[1], nodes[2]

	fake := fakecluster.Start(t, fakecluster.Options{APIServerURL: s.cluster.URL, APIServerCAFile: s.cluster.CAFile})
	kubeconfig := filepath.Join(testDir(t, s), "fakecluster-kubeconfig")
	adminToken := s.cluster.Tokens[adminUser]
	if err := fake.WriteKubeconfig(kubeconfig, fakecluster.KubeconfigUser{Name: adminUser, Token: adminToken}); err != nil {
		t.Fatal(err)
	}
	startReplica(t, a, "agentk-on-a", kubeconfig)
	startReplica(t, b, "agentk-on-b", kubeconfig)

	k := c.kubectl(t, "ops", 1)
	ns := uniqueName("kas-nodes")
	k.mustRun(t, "create", "namespace", ns)
	k.mustRun(t, "create", "serviceaccount", "default", "-n", ns)
	fake.CreateRunningPod(t, adminToken, ns, "pod")

	t.Run("get and apply", func(t *testing.T) {
		if out := k.mustRun(t, "get", "namespaces", "-o", "name"); !strings.Contains(out, "namespace/"+ns) {
			t.Errorf("kubectl get namespaces through C: %s", out)
		}
		k.mustRunStdin(t, fmt.Sprintf("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: across\n  namespace: %s\ndata:\n  hop: one\n", ns), "apply", "-f", "-")
		if out := k.mustRun(t, "get", "configmap", "across", "-n", ns, "-o", "jsonpath={.data.hop}"); out != "one" {
			t.Errorf("applied ConfigMap reads %q", out)
		}
	})

	t.Run("dev is impersonated across the hop", func(t *testing.T) {
		if who := c.kubectl(t, "dev", 1).whoami(t); who.Username != aliceUser {
			t.Errorf("whoami through C as dev: %q, want %q", who.Username, aliceUser)
		}
	})

	t.Run("watch", func(t *testing.T) {
		w := k.start(t, "kubectl-watch", c.dir, "get", "configmaps", "-n", ns, "--watch", "-o", "name")
		k.mustRun(t, "create", "configmap", "watched", "-n", ns)
		err := kubetest.Eventually(streamWait, func() error {
			if !strings.Contains(w.Stdout(), "configmap/watched") {
				return fmt.Errorf("the watch through C has not shown the new ConfigMap: %q", w.Stdout())
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})

	t.Run("logs -f", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), streamWait)
		defer cancel()
		cmd := exec.CommandContext(ctx, k.bin, k.fullArgs([]string{"logs", "-f", "-n", ns, "pod"})...)
		cmd.Env = k.env()
		var out syncBuffer
		cmd.Stdout = &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { cmd.Process.Kill(); cmd.Wait() }()
		err := kubetest.Eventually(streamWait, func() error {
			if strings.Count(out.String(), "\n") < 20 {
				return fmt.Errorf("%d lines so far", strings.Count(out.String(), "\n"))
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		cmd.Process.Signal(syscall.SIGINT)
	})

	t.Run("exec", func(t *testing.T) {
		for _, m := range remoteCommandModes {
			out := k.withEnv(m.env...).mustRunStdin(t, "across the hop\n", "exec", "-i", "-n", ns, "pod", "--", "cat")
			if out != "across the hop\n" {
				t.Errorf("%s: exec cat through C: %q", m.name, out)
			}
		}
	})

	t.Run("port-forward", func(t *testing.T) {
		local := k.portForward(t, "kubectl-port-forward", c.dir, ns)
		for range 10 {
			if err := echoThrough(local, 256<<10); err != nil {
				t.Fatal(err)
			}
		}
	})

	t.Run("every node's agents through any node's admin API", func(t *testing.T) {
		resp, body := c.adminRequest(t, http.MethodGet, "/kas/agents?scope=all", nil)
		requireAdminStatus(t, resp, body, http.StatusOK)
		var l agentadmin.Listing
		mustUnmarshal(t, body, &l)
		if len(l.Agents) != 1 || l.Agents[0].ID != 1 || len(l.Agents[0].Connections) != 2 {
			t.Fatalf("listing through C: %s", body)
		}
		pods := map[string]string{}
		for _, conn := range l.Agents[0].Connections {
			pods[conn.Pod.Name] = conn.Node
		}
		if pods["agentk-on-a"] == "" || pods["agentk-on-b"] == "" || pods["agentk-on-a"] == pods["agentk-on-b"] {
			t.Errorf("the replicas and their nodes: %v", pods)
		}
		// C's own listing has none: it holds no tunnel.
		resp, body = c.adminRequest(t, http.MethodGet, "/kas/agents", nil)
		requireAdminStatus(t, resp, body, http.StatusOK)
		mustUnmarshal(t, body, &l)
		if len(l.Agents) != 0 {
			t.Errorf("C's own listing: %s", body)
		}
	})
}

// TestSeveralNodesNodeDies: a node killed under a stream of requests
// through another: requests go on through the node that holds the other
// replica; only requests in flight on the dead node fail.
func TestSeveralNodesNodeDies(t *testing.T) {
	t.Parallel()
	s := requireSuite(t)
	redis := redistest.StartServer(t)
	config := standardConfig()
	config.waitForAgent = "20s"
	nodes := startNodes(t, s, 3, config, singleRedis(redis))
	a, b, c := nodes[0], nodes[1], nodes[2]
	startReplica(t, a, "agentk-on-a", "")
	startReplica(t, b, "agentk-on-b", "")

	client := c.httpClient(t)
	token := patToken(1, config.user(t, "ops").token)
	var ok, failed atomic.Int64
	var killedAt atomic.Int64 // unix nanos
	var mu sync.Mutex         // guards failures
	var failures []string
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				started := time.Now()
				req, _ := http.NewRequest(http.MethodGet, c.proxyURL()+"api/v1/namespaces/default", nil)
				req.Header.Set("Authorization", "Bearer "+token)
				resp, err := client.Do(req)
				if err == nil {
					resp.Body.Close()
					if resp.StatusCode == http.StatusOK {
						ok.Add(1)
						continue
					}
					err = fmt.Errorf("%s", resp.Status)
				}
				failed.Add(1)
				mu.Lock()
				failures = append(failures, fmt.Sprintf("started %v after the kill: %v", started.Sub(time.Unix(0, killedAt.Load())).Round(time.Millisecond), err))
				mu.Unlock()
			}
		})
	}
	time.Sleep(2 * time.Second) // requests flow through both A and B
	before := ok.Load()
	killedAt.Store(time.Now().UnixNano())
	a.proc.Kill()
	time.Sleep(3 * time.Second)
	close(stop)
	wg.Wait()
	t.Logf("%d requests before the kill, %d in all, %d failed: %v", before, ok.Load(), failed.Load(), failures)
	if ok.Load() <= before {
		t.Error("no request succeeded after node A was killed")
	}
	// Four clients: at most the four requests in flight when A died fail.
	if n := failed.Load(); n > 4 {
		t.Errorf("%d requests failed, more than the %d that can have been in flight on the dead node", n, 4)
	}
	for _, f := range failures {
		if !strings.HasPrefix(f, "started -") {
			t.Errorf("a request that started after the kill failed: %s", f)
		}
	}
}

// TestSeveralNodesRedisDown: with Redis stopped, a node goes on serving its
// own agents; forwarding to another node works again once Redis is back.
func TestSeveralNodesRedisDown(t *testing.T) {
	t.Parallel()
	s := requireSuite(t)
	redis := redistest.StartServer(t)
	config := standardConfig()
	config.waitForAgent = "5s"
	nodes := startNodes(t, s, 2, config, singleRedis(redis))
	a, c := nodes[0], nodes[1]
	startReplica(t, a, "agentk-on-a", "")
	token := patToken(1, config.user(t, "ops").token)
	get := func(n *caddyServer) int {
		resp, _ := n.proxyGet(t, "api/v1/namespaces/default", http.Header{"Authorization": {"Bearer " + token}})
		return resp.StatusCode
	}
	if code := get(c); code != http.StatusOK {
		t.Fatalf("through C before the outage: %d", code)
	}
	redis.Stop()
	for range 5 {
		if code := get(a); code != http.StatusOK {
			t.Errorf("through A, which holds the tunnel, with Redis down: %d", code)
		}
	}
	time.Sleep(2 * time.Second)
	redis.Start()
	start := time.Now()
	err := kubetest.Eventually(time.Minute, func() error {
		if code := get(c); code != http.StatusOK {
			return fmt.Errorf("through C: %d", code)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("forwarding worked again %v after Redis came back", time.Since(start).Round(100*time.Millisecond))
}

// TestSeveralNodesSentinelAndCluster: forwarding through a Redis Sentinel
// set across a failover, and through a Redis Cluster.
func TestSeveralNodesSentinelAndCluster(t *testing.T) {
	t.Parallel()
	s := requireSuite(t)
	config := standardConfig()
	config.waitForAgent = "20s"
	token := patToken(1, config.user(t, "ops").token)
	through := func(t *testing.T, n *caddyServer) {
		t.Helper()
		err := kubetest.Eventually(time.Minute, func() error {
			resp, body := n.proxyGet(t, "api/v1/namespaces/default", http.Header{"Authorization": {"Bearer " + token}})
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("%s %s", resp.Status, body)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}

	t.Run("sentinel", func(t *testing.T) {
		sentinel := redistest.StartSentinel(t)
		settings := redisSettings(fmt.Sprintf("addresses %s\n\t\t\tmaster_name %s", strings.Join(sentinel.SentinelAddrs, " "), sentinel.MasterName))
		nodes := startNodes(t, s, 2, config, settings)
		startReplica(t, nodes[0], "agentk-on-a", "")
		through(t, nodes[1])
		sentinel.Master.Stop()
		sentinel.WaitFailover(t)
		through(t, nodes[1])
		// A new replica after the failover is found as well.
		startReplica(t, nodes[0], "agentk-after-failover", "")
		through(t, nodes[1])
	})

	t.Run("cluster", func(t *testing.T) {
		cluster := redistest.StartCluster(t)
		settings := redisSettings("addresses " + strings.Join(cluster.Addrs(), " "))
		nodes := startNodes(t, s, 2, config, settings)
		startReplica(t, nodes[0], "agentk-on-a", "")
		through(t, nodes[1])
	})
}

// syncBuffer is a bytes buffer safe for a writer and a reader.
type syncBuffer struct {
	mu sync.Mutex // guards b
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestSeveralNodesShareTheConnectionLimit: connections_per_token_per_minute
// holds for an agent token across the nodes, which count in Redis
// together: an agent cannot get round it by being balanced over nodes.
func TestSeveralNodesShareTheConnectionLimit(t *testing.T) {
	t.Parallel()
	s := requireSuite(t)
	redis := redistest.StartServer(t)
	config := standardConfig()
	config.connectionsPerToken = 3
	nodes := startNodes(t, s, 2, config, singleRedis(redis))
	a, b := nodes[0], nodes[1]
	token := config.agent(t, 1).token

	// The count is per minute of the clock: start early in one, so that
	// all handshakes below fall into it.
	if left := time.Minute - time.Duration(time.Now().Second())*time.Second; left < 20*time.Second {
		time.Sleep(left + time.Second)
	}
	handshake := func(n *caddyServer, i int) (status int) {
		t.Helper()
		h := make(http.Header)
		h.Set("Authorization", "Bearer "+token)
		h2tunnel.SetMetaHeaders(h, tunnel.AgentMeta{Version: "test", PodNamespace: "test", PodName: fmt.Sprintf("pod-%d", i), PodID: int64(i), ConnectionID: int64(i)})
		ctx, cancel := context.WithTimeout(context.Background(), httpTimeout)
		defer cancel()
		nc, resp, err := wsconn.Dial(ctx, n.agentURL(), wsconn.DialOptions{HTTPClient: n.httpClient(t), Header: h, Subprotocol: h2tunnel.Subprotocol})
		if err == nil {
			nc.Close()
			return http.StatusSwitchingProtocols
		}
		if resp == nil {
			t.Fatalf("handshake %d with %s: %v", i, n.agentURL(), err)
		}
		if resp.StatusCode == http.StatusTooManyRequests && resp.Header.Get("Retry-After") == "" {
			t.Errorf("handshake %d: 429 without Retry-After", i)
		}
		return resp.StatusCode
	}
	for i, step := range []struct {
		node *caddyServer
		want int
	}{
		{a, http.StatusSwitchingProtocols},
		{b, http.StatusSwitchingProtocols},
		{a, http.StatusSwitchingProtocols},
		{b, http.StatusTooManyRequests}, // the fourth of the minute, though B has seen only one
		{a, http.StatusTooManyRequests},
	} {
		if got := handshake(step.node, i); got != step.want {
			t.Errorf("handshake %d: %d, want %d", i, got, step.want)
		}
	}
}
