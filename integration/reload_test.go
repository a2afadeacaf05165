package integration

import (
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// TestReloadKeepsTunnelsAndStreams reloads Caddy with a changed config while
// a kubectl watch and 100 more watches run through the tunnel, under a loop
// of requests: the new config must take effect, and neither the tunnel nor
// a watch nor a request may notice.
func TestReloadKeepsTunnelsAndStreams(t *testing.T) {
	s := requireSuite(t)
	config := standardConfig()
	kas := startCaddy(t, s, config)
	agent := kas.startAgentk(t, agentkOptions{agentID: 1})
	agent.waitReady(t)
	ops := kas.kubectl(t, "ops", 1)
	ns := uniqueName("kas-it")
	ops.mustRun(t, "create", "namespace", ns)
	watch := ops.startWatch(t, kas.dir, ns, "watch-marker")

	tunnelsBefore, err := agent.tunnelConnections()
	switch {
	case errors.Is(err, errors.ErrUnsupported):
		t.Log("cannot list agentk's connections on this system; relying on its readiness only")
	case err != nil:
		t.Fatal(err)
	case len(tunnelsBefore) == 0:
		t.Fatal("agentk reports ready but holds no connection to caddy's HTTPS port")
	default:
		t.Logf("agentk's connections to caddy before the reload: %v", tunnelsBefore)
	}
	readiness := monitorReadiness(t, agent)
	auth := "Bearer " + patToken(1, config.user(t, "ops").token)
	client := kas.streamingClient(t)
	watches := openWatches(t, client, kas.proxyURL(), auth, ns, "watch-marker", 100)
	load := startProxyLoad(t, client, kas.proxyURL(), auth, 4, "api/v1/namespaces/"+ns+"/configmaps", isConfigMapList)
	time.Sleep(time.Second)

	// the reload removes user plain and adds user newcomer
	reloaded := config
	reloaded.users = slices.DeleteFunc(slices.Clone(config.users), func(u kasUser) bool { return u.name == "plain" })
	reloaded.users = append(reloaded.users, kasUser{name: "newcomer", token: kubetest.NewToken("the token of user newcomer"), agents: []int{1}})
	kas.reload(t, reloaded)

	kas.kubectl(t, "newcomer", 1).mustRun(t, "get", "namespaces")
	removed := http.Header{"Authorization": {"Bearer " + patToken(1, config.user(t, "plain").token)}}
	resp, body := kas.proxyGet(t, "api/v1", removed)
	requireStatus(t, resp, body, http.StatusUnauthorized)

	time.Sleep(time.Second)
	reportLoad(t, "requests during the reload", load.finish(), time.Time{})
	ops.mustRun(t, "create", "configmap", "after-reload", "-n", ns)
	waitForLine(t, watch, "configmap/after-reload")
	dropped := 0
	for i, w := range watches {
		if err := w.waitSeen("after-reload", time.Minute); err != nil {
			dropped++
			t.Errorf("watch %d of %d: %v", i, len(watches), err)
		}
	}
	t.Logf("%d of %d watches delivered the ConfigMap made after the reload", len(watches)-dropped, len(watches))

	if samples, failures := readiness.finish(); len(failures) > 0 {
		t.Errorf("agentk's /readiness was not 200 in %d of %d samples during the reload, first: %s", len(failures), samples, failures[0])
	}
	if tunnelsBefore != nil {
		tunnelsAfter, err := agent.tunnelConnections()
		if err != nil {
			t.Fatal(err)
		}
		for _, conn := range tunnelsBefore {
			if !slices.Contains(tunnelsAfter, conn) {
				t.Errorf("agentk's connection from %s to caddy is gone after the reload: agentk reconnected (before: %v, after: %v)",
					conn, tunnelsBefore, tunnelsAfter)
			}
		}
	}
}

// readinessMonitor polls agentk's /readiness in the background and records
// every answer that is not 200.
type readinessMonitor struct {
	stop     chan struct{}
	done     chan struct{}
	once     sync.Once
	samples  int      // written by the polling goroutine, read after done
	failures []string // likewise
}

const readinessMonitorInterval = 50 * time.Millisecond

// monitorReadiness starts polling a's readiness until finish is called or t
// ends.
func monitorReadiness(t testing.TB, a *agentk) *readinessMonitor {
	m := &readinessMonitor{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(m.done)
		ticker := time.NewTicker(readinessMonitorInterval)
		defer ticker.Stop()
		for {
			code, err := a.readiness()
			m.samples++
			switch {
			case err != nil:
				m.failures = append(m.failures, err.Error())
			case code != http.StatusOK:
				m.failures = append(m.failures, fmt.Sprintf("HTTP %d", code))
			}
			select {
			case <-m.stop:
				return
			case <-ticker.C:
			}
		}
	}()
	t.Cleanup(func() { m.finish() })
	return m
}

// finish stops the polling and returns how many samples were taken and what
// went wrong in them.
func (m *readinessMonitor) finish() (samples int, failures []string) {
	m.once.Do(func() { close(m.stop) })
	<-m.done
	return m.samples, m.failures
}
