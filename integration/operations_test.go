package integration

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// TestCaddyIdleTimeoutsDoNotCutStreams runs with Caddy's body and write
// idle timeouts at one second (Caddy's defaults are one minute). Caddy
// re-arms them before every write, so a silent watch is safe anyway; what
// they cut is a write that stays blocked because the client stopped
// reading: "kubectl logs -f | less" paused, a laptop asleep. GitLab's KAS
// has no write timeout for that reason, and neither has k8s_proxy: here a
// client stops reading a 20 MiB list for three timeouts, over HTTP/1.1 and
// HTTP/2, and must still get all of it. The tunnel and a watch stay silent
// meanwhile and must survive too.
func TestCaddyIdleTimeoutsDoNotCutStreams(t *testing.T) {
	s := requireSuite(t)
	config := standardConfig()
	config.serverOptions = "timeouts {\n\t\t\tread_body_idle 1s\n\t\t\twrite_idle 1s\n\t\t}"
	kas := startCaddy(t, s, config)
	agent := kas.startAgentk(t, agentkOptions{agentID: 1})
	agent.waitReady(t)
	ops := kas.kubectl(t, "ops", 1)
	ns := uniqueName("kas-idle")
	ops.mustRun(t, "create", "namespace", ns)
	watch := ops.startWatch(t, kas.dir, ns, "before-silence")
	auth := "Bearer " + patToken(1, config.user(t, "ops").token)

	// 24 ConfigMaps of 900 KiB: a list far larger than the socket buffers
	// between Caddy and the client, so Caddy's writes block while the
	// client does not read.
	const configMaps, size = 24, 900 << 10
	h2 := kas.httpClient(t)
	value := strings.Repeat("x", size)
	for i := range configMaps {
		body := fmt.Sprintf(`{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"big-%d"},"data":{"v":%q}}`, i, value)
		req, _ := http.NewRequest(http.MethodPost, kas.proxyURL()+"api/v1/namespaces/"+ns+"/configmaps", strings.NewReader(body))
		req.Header.Set("Authorization", auth)
		req.Header.Set("Content-Type", "application/json")
		resp, err := h2.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusCreated {
			t.Fatalf("creating big-%d: %s", i, resp.Status)
		}
	}

	h1 := kas.httpClient(t)
	h1.Transport.(*http.Transport).ForceAttemptHTTP2 = false
	h1.Transport.(*http.Transport).TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	for _, tc := range []struct {
		name   string
		client *http.Client
		proto  int
	}{{"HTTP/1.1", h1, 1}, {"HTTP/2", h2, 2}} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(http.MethodGet, kas.proxyURL()+"api/v1/namespaces/"+ns+"/configmaps", nil)
			req.Header.Set("Authorization", auth)
			req.Header.Set("Accept", "application/json")
			// The apiserver gzips large lists, and these compress to
			// almost nothing; the test needs 21 MiB on the wire.
			req.Header.Set("Accept-Encoding", "identity")
			resp, err := tc.client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.ProtoMajor != tc.proto || resp.StatusCode != http.StatusOK {
				t.Fatalf("list: %s %s, want HTTP/%d 200", resp.Proto, resp.Status, tc.proto)
			}
			time.Sleep(3 * time.Second) // the client stops reading
			var list struct {
				Items []struct {
					Data map[string]string `json:"data"`
				} `json:"items"`
			}
			if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
				t.Fatalf("reading the list after a pause: %v", err)
			}
			big := 0
			for _, item := range list.Items {
				if len(item.Data["v"]) == size {
					big++
				}
			}
			if big != configMaps {
				t.Errorf("the list holds %d complete big ConfigMaps, want %d", big, configMaps)
			}
		})
	}

	ops.mustRun(t, "create", "configmap", "after-silence", "-n", ns)
	waitForLine(t, watch, "configmap/after-silence")
	if code, err := agent.readiness(); err != nil || code != http.StatusOK {
		t.Errorf("agentk readiness after the silence: %d, %v", code, err)
	}
}

// TestReloadRevokingAgentTokenDisconnectsIt: rotating an agent's token and
// reloading cuts the tunnel that used the old token at once, and the agent
// cannot come back with it. The token file keeps its path, so the adapted
// config is the same JSON and only "caddy reload --force" applies it (a
// plain reload answers "config is unchanged"), as the README says.
func TestReloadRevokingAgentTokenDisconnectsIt(t *testing.T) {
	s := requireSuite(t)
	config := standardConfig()
	kas := startCaddy(t, s, config)
	agent := kas.startAgentk(t, agentkOptions{agentID: 1})
	agent.waitReady(t)
	plain := kas.kubectl(t, "plain", 1)
	plain.mustRun(t, "get", "namespaces")

	rotated := config
	rotated.agents = append([]kasAgent(nil), config.agents...)
	rotated.agents[0].token = kubetest.NewToken("the rotated token of agent 1")
	kas.reload(t, rotated, "--force")

	closing := map[string]string{"msg": "closing tunnel: its agent token is no longer configured"}
	err := kubetest.Eventually(agentLossTimeout, func() error {
		if n := countLogEntries(kas.proc.Stderr(), closing); n == 0 {
			return fmt.Errorf("caddy logged no %v", closing)
		}
		if code, err := agent.readiness(); err == nil && code == http.StatusOK {
			return fmt.Errorf("agentk with the revoked token still reports ready")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// agentk keeps retrying with the old token and keeps being refused.
	refusal := map[string]string{"msg": "agent refused", "reason": "unknown agent token"}
	if err := kubetest.Eventually(agentRefusalTimeout, func() error {
		if countLogEntries(kas.proc.Stderr(), refusal) == 0 {
			return fmt.Errorf("caddy logged no %v", refusal)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	resp, body := kas.proxyGet(t, "api/v1", http.Header{"Authorization": {"Bearer " + patToken(1, config.user(t, "plain").token)}})
	requireStatus(t, resp, body, http.StatusBadGateway)
}

// TestKasDev runs the README's first command, "caddy kas-dev", and follows
// what it prints: agentk with the generated token and Caddy's internal CA,
// then kubectl with the generated kubeconfig.
func TestKasDev(t *testing.T) {
	s := requireSuite(t)
	dir := testDir(t, s)
	state := filepath.Join(dir, "state")
	dataHome := filepath.Join(dir, "data")
	port := mustFreeLoopbackPorts(t, 1)[0]
	env := append(kubetest.EnvironWithout("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME"),
		"HOME="+filepath.Join(dir, "home"), "XDG_DATA_HOME="+dataHome, "XDG_CONFIG_HOME="+filepath.Join(dir, "config"))
	dev := startOwnedProcess(t, kubetest.ProcessSpec{
		Name:   "caddy-kas-dev",
		Binary: s.caddyBin,
		Args:   []string{"kas-dev", "--listen", fmt.Sprintf("localhost:%d", port), "--state", state},
		Env:    env,
		LogDir: dir,
	})
	kubeconfig := filepath.Join(state, "kubeconfig")
	if err := kubetest.Eventually(caddyStartTimeout, func() error {
		if !dev.Running() {
			return kubetest.Permanent(fmt.Errorf("kas-dev exited: %w", dev.ExitError()))
		}
		if !strings.Contains(dev.Stdout(), "caddy-kas is running") {
			return fmt.Errorf("kas-dev has not printed its instructions yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"--token-file " + filepath.Join(state, "agent.token"), "kubectl --kubeconfig " + kubeconfig} {
		if !strings.Contains(dev.Stdout(), want) {
			t.Errorf("kas-dev's instructions lack %q:\n%s", want, dev.Stdout())
		}
	}
	checkKasDevListens(t, dev.Pid(), port)

	// A second kas-dev on the same port refuses to start: Caddy's
	// SO_REUSEPORT would otherwise let it take a share of the connections.
	second := exec.Command(s.caddyBin, "kas-dev", "--listen", fmt.Sprintf("localhost:%d", port), "--state", filepath.Join(dir, "state2"))
	second.Env = env
	out, err := second.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "is another kas-dev or server running there?") {
		t.Errorf("a second kas-dev on port %d: %v; output:\n%s", port, err, out)
	}
	rootCA := filepath.Join(dataHome, "caddy", "pki", "authorities", "local", "root.crt")
	observability := fmt.Sprintf("127.0.0.1:%d", mustFreeLoopbackPorts(t, 1)[0])
	agent := &agentk{
		proc: startOwnedProcess(t, kubetest.ProcessSpec{
			Name:   "agentk-kas-dev",
			Binary: s.agentkBin,
			Args: []string{
				"--kas-address", fmt.Sprintf("wss://localhost:%d/-/kubernetes-agent/", port),
				"--token-file", filepath.Join(state, "agent.token"),
				"--kas-ca-cert-file", rootCA,
				"--kubeconfig", s.cluster.Kubeconfig, "--context", adminUser,
				"--observability-listen-address", observability,
			},
			Env:    append(kubetest.EnvironWithout("KUBECONFIG", "AGENTK_TOKEN"), "POD_NAMESPACE=kas-it", "POD_NAME=agentk-kas-dev"),
			LogDir: dir,
		}),
		observabilityURL: "http://" + observability,
	}
	agent.waitReady(t)
	k := kubectl{bin: s.kubectlBin, kubeconfig: kubeconfig, home: filepath.Join(dir, "home")}
	if out := k.mustRun(t, "get", "namespaces", "-o", "name"); !strings.Contains(out, "namespace/default") {
		t.Errorf("kubectl get namespaces through kas-dev: %q", out)
	}
	// The generated kubeconfig trusts Caddy's internal CA, nothing else.
	pem, err := os.ReadFile(rootCA)
	if err != nil {
		t.Fatal(err)
	}
	if !x509.NewCertPool().AppendCertsFromPEM(pem) {
		t.Errorf("%s holds no certificate", rootCA)
	}
}

// checkKasDevListens checks that kas-dev (process pid) listens on loopback
// only, with TCP only (HTTP/3 would add UDP), on port.
func checkKasDevListens(t *testing.T, pid, port int) {
	t.Helper()
	socks, err := listeningSockets(pid)
	if errors.Is(err, errors.ErrUnsupported) {
		t.Logf("not checking kas-dev's sockets: %v", err)
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	portHex := fmt.Sprintf(":%04X", port)
	loopback := map[string]bool{
		"tcp 0100007F" + portHex:                          true, // 127.0.0.1
		"tcp6 00000000000000000000000001000000" + portHex: true, // ::1
	}
	if len(socks) == 0 {
		t.Error("kas-dev listens nowhere")
	}
	for _, sock := range socks {
		if !loopback[sock] {
			t.Errorf("kas-dev listens on %s (/proc/net form), want loopback TCP port %d only; all: %v", sock, port, socks)
		}
	}
}

// TestMetricsOnCaddyAdmin: the agent server's metrics appear on Caddy's
// admin /metrics next to Caddy's own.
func TestMetricsOnCaddyAdmin(t *testing.T) {
	s := requireSuite(t)
	config := standardConfig()
	kas := startCaddy(t, s, config)
	kas.startAgentk(t, agentkOptions{agentID: 1}).waitReady(t)
	resp, body := kas.proxyGet(t, "api/v1", http.Header{"Authorization": {"Bearer " + patToken(1, kubetest.NewToken("an unknown user token"))}})
	requireStatus(t, resp, body, http.StatusUnauthorized)
	kas.kubectl(t, "plain", 1).mustRun(t, "get", "namespaces")

	metricsResp, err := http.Get(fmt.Sprintf("http://localhost:%d/metrics", kas.adminPort))
	if err != nil {
		t.Fatal(err)
	}
	defer metricsResp.Body.Close()
	text, _ := io.ReadAll(metricsResp.Body)
	for _, want := range []string{
		"caddy_kas_agent_tunnels 1",
		"caddy_kas_agent_connects_total 1",
		`caddy_kas_k8s_proxy_refusals_total{code="401"} 1`,
		`caddy_kas_k8s_proxy_routing_duration_seconds_count{result="found"}`,
	} {
		if !strings.Contains(string(text), want) {
			t.Errorf("admin /metrics lacks %q", want)
		}
	}
}

// TestRefusedUpgradeReachesKubectl: an upgrade the cluster refuses comes
// back unchanged. The real apiserver refuses exec into a pod that no node
// runs; kubectl must show the apiserver's own message through the agent
// server, in its default WebSocket mode (where it may first fall back to
// SPDY) and with SPDY only.
func TestRefusedUpgradeReachesKubectl(t *testing.T) {
	s := requireSuite(t)
	config := standardConfig()
	kas := startCaddy(t, s, config)
	kas.startAgentk(t, agentkOptions{agentID: 1}).waitReady(t)
	ops := kas.kubectl(t, "ops", 1)
	ns := uniqueName("kas-exec")
	ops.mustRun(t, "create", "namespace", ns)
	ops.mustRun(t, "create", "serviceaccount", "default", "-n", ns)
	ops.mustRun(t, "run", "nowhere", "-n", ns, "--image=busybox", "--restart=Never")

	for _, mode := range []struct {
		name string
		env  []string
	}{
		{"websocket", nil},
		{"spdy", []string{"KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false"}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			k := ops
			k.extraEnv = mode.env
			k.mustFail(t, "does not have a host assigned", "exec", "nowhere", "-n", ns, "--", "true")
		})
	}
}

// TestConnectionCloseDoesNotRetireTunnel: requests from HTTP/1.1 clients
// that send "Connection: close" must not make the agent's shared tunnel
// close (which would force agentk to reconnect, and stall every request of
// the agent meanwhile).
func TestConnectionCloseDoesNotRetireTunnel(t *testing.T) {
	s := requireSuite(t)
	config := standardConfig()
	kas := startCaddy(t, s, config)
	agent := kas.startAgentk(t, agentkOptions{agentID: 1})
	agent.waitReady(t)
	before, err := agent.tunnelConnections()
	if errors.Is(err, errors.ErrUnsupported) {
		t.Skip("cannot list agentk's connections on this system")
	}
	if err != nil || len(before) == 0 {
		t.Fatalf("agentk's connections to caddy: %v, %v", before, err)
	}
	// HTTP/1.1: over HTTP/2 Go's client never sends the header.
	h1 := kas.httpClient(t)
	h1.Transport.(*http.Transport).ForceAttemptHTTP2 = false
	h1.Transport.(*http.Transport).TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	for range 3 {
		req, _ := http.NewRequest(http.MethodGet, kas.proxyURL()+"api", nil)
		req.Header.Set("Authorization", "Bearer "+patToken(1, config.user(t, "plain").token))
		req.Close = true // sends "Connection: close"
		resp, err := h1.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.ProtoMajor != 1 || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET api with Connection: close: %s %s", resp.Proto, resp.Status)
		}
	}
	kas.kubectl(t, "plain", 1).mustRun(t, "get", "namespaces")
	after, err := agent.tunnelConnections()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(before, after) {
		t.Errorf("agentk reconnected: connections before %v, after %v", before, after)
	}
}

// TestConfigErrorsPointIntoCaddyfile: mistakes in the agents and users of a
// Caddyfile fail the configuration when Caddy loads it, with the place in
// the Caddyfile, instead of at request time (a user naming an agent that
// does not exist used to fail after waiting 20 s for it).
func TestConfigErrorsPointIntoCaddyfile(t *testing.T) {
	s := requireSuite(t)
	tests := []struct {
		name string
		// change makes the standard configuration wrong; it may remove
		// files once the Caddyfile is written (after).
		change    func(*kasConfig)
		after     func(t *testing.T, c *caddyServer)
		command   string // validate or run
		wantError string // %s is where user plain is declared
	}{
		{
			name:      "user names an undeclared agent",
			change:    func(config *kasConfig) { config.users[2].agents = []int{1, 3} },
			command:   "run",
			wantError: `k8s_proxy user "plain", at %s, names agent 3, which no kubernetes_agent declares`,
		},
		{
			name: "token file missing",
			after: func(t *testing.T, c *caddyServer) {
				if err := os.Remove(filepath.Join(c.dir, "plain.token")); err != nil {
					t.Fatal(err)
				}
			},
			command:   "validate",
			wantError: `user "plain": reading token file: open %s: no such file or directory, at %s`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			config := standardConfig()
			if tt.change != nil {
				tt.change(&config)
			}
			ports := mustFreeLoopbackPorts(t, 3)
			c := &caddyServer{suite: s, dir: testDir(t, s), adminPort: ports[0], httpPort: ports[1], httpsPort: ports[2], config: config}
			caddyfile := c.writeCaddyfile(t, config)
			if tt.after != nil {
				tt.after(t, c)
			}
			text, err := os.ReadFile(caddyfile)
			if err != nil {
				t.Fatal(err)
			}
			line := slices.IndexFunc(strings.Split(string(text), "\n"), func(l string) bool { return strings.TrimSpace(l) == "user plain {" }) + 1
			where := fmt.Sprintf("%s:%d", caddyfile, line)
			want := fmt.Sprintf(tt.wantError, where)
			if strings.Count(tt.wantError, "%s") == 2 {
				want = fmt.Sprintf(tt.wantError, filepath.Join(c.dir, "plain.token"), where)
			}

			ctx, cancel := context.WithTimeout(t.Context(), caddyStartTimeout)
			defer cancel()
			home := filepath.Join(c.dir, "home")
			cmd := exec.CommandContext(ctx, s.caddyBin, tt.command, "--config", caddyfile, "--adapter", "caddyfile")
			cmd.Env = append(kubetest.EnvironWithout("HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME"),
				"HOME="+home, "XDG_CONFIG_HOME="+filepath.Join(home, "config"), "XDG_DATA_HOME="+filepath.Join(home, "data"),
				config.agent(t, 2).tokenEnv+"="+config.agent(t, 2).token)
			out, err := cmd.CombinedOutput()
			if ctx.Err() != nil {
				t.Fatalf("caddy %s still runs after %s; output:\n%s", tt.command, caddyStartTimeout, out)
			}
			said := slices.ContainsFunc(jsonLogLines(string(out)), func(entry map[string]any) bool {
				msg, _ := entry["msg"].(string)
				return entry["level"] == "error" && strings.Contains(msg, want)
			})
			if err == nil || !said {
				t.Errorf("caddy %s: %v, want a failure saying\n%s\noutput:\n%s", tt.command, err, want, out)
			}
		})
	}
}
