package grpctunnel_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentcfg"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentconfigurationrpc"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/reversetunnelrpc"
)

const agentToken = "gitlab-agent-token"

// env is a grpctunnel.Server with one connected fake agentk.
type env struct {
	srv   *grpctunnel.Server
	adm   *admission
	agent *fakeAgent
	t     tunnel.Tunnel // the admitted tunnel
	// agentMayFail is set by tests that cut the connection under the agent.
	agentMayFail bool
}

// newEnv connects a fake agentk with streams idle Connect streams serving
// h, and waits for its tunnel.
func newEnv(t *testing.T, h http.Handler, streams int) *env {
	t.Helper()
	srv := grpctunnel.NewServer()
	t.Cleanup(func() { srv.Close() })
	adm := newAdmission(agentToken, 5)
	a := &fakeAgent{t: t, conn: connect(t, srv, adm), token: agentToken, handler: h, echoUpgrades: true}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- a.serveTunnels(ctx, streams) }()
	e := &env{srv: srv, adm: adm, agent: a}
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil && !e.agentMayFail {
			t.Errorf("agent: %v", err)
		}
	})
	select {
	case e.t = <-adm.ready:
	case <-time.After(30 * time.Second):
		t.Fatal("no tunnel admitted")
	}
	return e
}

func get(t *testing.T, tun tunnel.Tunnel, path string, id *identity.Identity) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://agent"+path, nil)
	req.Header.Set("Accept", "application/json")
	resp, err := tun.RoundTrip(&tunnel.Request{HTTP: req, Identity: id})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(b)
}

func TestRequestReachesAgent(t *testing.T) {
	e := newEnv(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusTeapot)
		io.WriteString(w, r.Method+" "+r.URL.Path+"?"+r.URL.RawQuery+" accept="+r.Header.Get("Accept")+
			" user="+r.Header.Get("Impersonate-User")+" groups="+strings.Join(r.Header.Values("Impersonate-Group"), ",")+
			" extra="+r.Header.Get("Impersonate-Extra-agent.gitlab.com/id"))
	}), 2)

	if info := e.t.Agent(); info.ID != 5 || info.Credential != digest(agentToken) || info.RemoteAddr != "192.0.2.7:40000" {
		t.Errorf("agent info %+v", info)
	}
	resp, body := get(t, e.t, "/api/v1/pods?watch=1", nil)
	if resp.StatusCode != http.StatusTeapot || resp.Header.Get("Content-Type") != "text/plain" {
		t.Errorf("response %d %v", resp.StatusCode, resp.Header)
	}
	if want := "GET /api/v1/pods?watch=1 accept=application/json user= groups= extra="; body != want {
		t.Errorf("body %q, want %q", body, want)
	}

	id := &identity.Identity{Username: "gitlab:ci_job:42", Groups: []string{"gitlab:ci_job", "gitlab:project:7"},
		Extra: map[string][]string{"agent.gitlab.com/id": {"5"}}}
	_, body = get(t, e.t, "/api/v1/namespaces", id)
	if want := "GET /api/v1/namespaces? accept=application/json user=gitlab:ci_job:42 groups=gitlab:ci_job,gitlab:project:7 extra=5"; body != want {
		t.Errorf("with identity: body %q, want %q", body, want)
	}
	if n := e.t.Load(); n != 0 {
		t.Errorf("load %d after the requests ended", n)
	}
}

func TestRegisterFeedsTracker(t *testing.T) {
	e := newEnv(t, http.NotFoundHandler(), 1)
	if err := e.agent.register(context.Background(), 8817); err != nil {
		t.Fatal(err)
	}
	m := e.t.Agent().Meta
	if m.PodID != 8817 || m.Version != "v16.5.0" || m.PodName != "agentk-0" || m.KubernetesVersion != "v1.32.13" || m.KubernetesPlatform != "linux/amd64" || m.ConnectionID == 0 {
		t.Errorf("meta after Register: %+v", m)
	}
}

func TestGetConfigurationStreamsEachNewCommit(t *testing.T) {
	e := newEnv(t, http.NotFoundHandler(), 1)
	cfg := func(commit string) *agentconfigurationrpc.ConfigurationResponse {
		return &agentconfigurationrpc.ConfigurationResponse{CommitId: commit, Configuration: &agentcfg.AgentConfiguration{AgentId: 5, ProjectPath: "group/agents"}}
	}
	e.adm.setConfig(cfg("c1"))
	client := agentconfigurationrpc.NewAgentConfigurationClient(e.agent.conn)

	// agentk that has c1 already is sent nothing until c2.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := client.GetConfiguration(e.agent.ctx(ctx), &agentconfigurationrpc.ConfigurationRequest{CommitId: "c1"})
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan *agentconfigurationrpc.ConfigurationResponse)
	go func() {
		defer close(got)
		for {
			resp, err := stream.Recv()
			if err != nil {
				return
			}
			got <- resp
		}
	}()
	e.adm.setConfig(cfg("c1")) // same commit again: nothing to send
	e.adm.setConfig(cfg("c2"))
	if resp := <-got; resp.GetCommitId() != "c2" || resp.GetConfiguration().GetProjectPath() != "group/agents" {
		t.Fatalf("got %v", resp)
	}

	// A new stream without a commit gets the current one at once.
	stream2, err := client.GetConfiguration(e.agent.ctx(ctx), &agentconfigurationrpc.ConfigurationRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if resp, err := stream2.Recv(); err != nil || resp.GetCommitId() != "c2" {
		t.Fatalf("got %v, %v", resp, err)
	}

	// The tunnel's end ends the streams.
	e.agentMayFail = true
	e.t.Close()
	if _, ok := <-got; ok {
		t.Fatal("a configuration after the tunnel closed")
	}
	if _, err := stream2.Recv(); status.Code(err) != codes.Unavailable {
		t.Fatalf("stream after close: %v", err)
	}
}

func TestStreamingBodiesBothWays(t *testing.T) {
	const size = 3 << 20
	e := newEnv(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, err := io.Copy(io.Discard, r.Body)
		if err != nil || n != size || r.ContentLength != -1 {
			t.Errorf("agent read %d bytes, %v; content length %d", n, err, r.ContentLength)
		}
		for i := range 3 {
			io.WriteString(w, strings.Repeat(string(rune('a'+i)), 1<<20))
			w.(http.Flusher).Flush()
		}
	}), 2)
	pr, pw := io.Pipe()
	go func() {
		chunk := bytes.Repeat([]byte("x"), 64<<10)
		for range size / len(chunk) {
			pw.Write(chunk)
		}
		pw.Close()
	}()
	req, _ := http.NewRequest(http.MethodPut, "http://agent/upload", pr)
	req.ContentLength = -1
	resp, err := e.t.RoundTrip(&tunnel.Request{HTTP: req})
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || len(b) != 3<<20 || b[0] != 'a' || b[len(b)-1] != 'c' {
		t.Errorf("response of %d bytes, %v", len(b), err)
	}
}

func TestFlushedChunksArriveAtOnce(t *testing.T) {
	release := make(chan struct{})
	e := newEnv(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "event 1\n")
		w.(http.Flusher).Flush()
		<-release
		io.WriteString(w, "event 2\n")
	}), 2)
	defer close(release)
	req, _ := http.NewRequest(http.MethodGet, "http://agent/watch", nil)
	resp, err := e.t.RoundTrip(&tunnel.Request{HTTP: req})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	buf := make([]byte, 64)
	n, err := resp.Body.Read(buf)
	if err != nil || string(buf[:n]) != "event 1\n" {
		t.Errorf("first read %q, %v; want the first event while the second is held back", buf[:n], err)
	}
}

func TestStalledReaderDoesNotBlockOthers(t *testing.T) {
	e := newEnv(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/endless" {
			chunk := bytes.Repeat([]byte("z"), 32<<10)
			for r.Context().Err() == nil {
				if _, err := w.Write(chunk); err != nil {
					return
				}
			}
			return
		}
		io.WriteString(w, "ok")
	}), 3)
	req, _ := http.NewRequest(http.MethodGet, "http://agent/endless", nil)
	stalled, err := e.t.RoundTrip(&tunnel.Request{HTTP: req})
	if err != nil {
		t.Fatal(err)
	}
	defer stalled.Body.Close()
	io.ReadFull(stalled.Body, make([]byte, 64<<10)) // then stop reading
	for range 20 {
		if _, body := get(t, e.t, "/ok", nil); body != "ok" {
			t.Fatalf("a request next to a stalled stream got %q", body)
		}
	}
}

func TestUpgrade(t *testing.T) {
	e := newEnv(t, http.NotFoundHandler(), 2)
	clientBytes, toAgent := io.Pipe()
	req, _ := http.NewRequest(http.MethodPost, "http://agent/api/v1/namespaces/ns/pods/p/exec", clientBytes)
	resp, err := e.t.RoundTrip(&tunnel.Request{HTTP: req, Upgrade: "v4.channel.k8s.io"})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "echo" ||
		resp.Header.Get("X-Stream-Protocol-Version") != "v4.channel.k8s.io" || resp.Header.Get("Connection") != "" {
		t.Fatalf("switched answer %d %v", resp.StatusCode, resp.Header)
	}
	go func() {
		io.WriteString(toAgent, "hello")
		toAgent.Close() // half-close: the echo ends
	}()
	b, err := io.ReadAll(resp.Body)
	if err != nil || string(b) != "echo: hello" {
		t.Errorf("switched stream %q, %v", b, err)
	}
}

func TestClosingBodyCancelsAgentRequest(t *testing.T) {
	canceled := make(chan struct{})
	e := newEnv(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.(http.Flusher).Flush()
		<-r.Context().Done()
		close(canceled)
	}), 2)
	req, _ := http.NewRequest(http.MethodGet, "http://agent/hold", nil)
	resp, err := e.t.RoundTrip(&tunnel.Request{HTTP: req})
	if err != nil {
		t.Fatal(err)
	}
	if n := e.t.Load(); n != 1 {
		t.Errorf("load %d with a response open, want 1", n)
	}
	resp.Body.Close()
	select {
	case <-canceled:
	case <-time.After(30 * time.Second):
		t.Fatal("the agent's request was not cancelled")
	}
	if n := e.t.Load(); n != 0 {
		t.Errorf("load %d after the body was closed", n)
	}
}

func TestCancelledRequestEndsWait(t *testing.T) {
	// One tunnel stream, held by a request that does not end: agentk's
	// pool is used up, and it opens no more here.
	hold := make(chan struct{})
	defer close(hold)
	e := newEnv(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.(http.Flusher).Flush()
		<-hold
	}), 1)
	held, _ := http.NewRequest(http.MethodGet, "http://agent/hold", nil)
	resp, err := e.t.RoundTrip(&tunnel.Request{HTTP: held})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent/", nil)
	if _, err := e.t.RoundTrip(&tunnel.Request{HTTP: req}); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("RoundTrip = %v, want DeadlineExceeded", err)
	}
	if n := e.t.Load(); n != 1 {
		t.Errorf("load %d after a failed request next to a held one, want 1", n)
	}
}

// TestAdmittedWithFirstStream: a connection that only registers is no
// tunnel yet; its first idle stream admits it, with the metadata Register
// gave.
func TestAdmittedWithFirstStream(t *testing.T) {
	srv := grpctunnel.NewServer()
	defer srv.Close()
	adm := newAdmission(agentToken, 5)
	a := &fakeAgent{t: t, conn: connect(t, srv, adm), token: agentToken, handler: http.NotFoundHandler()}
	if err := a.register(context.Background(), 31); err != nil {
		t.Fatal(err)
	}
	select {
	case tun := <-adm.ready:
		t.Fatalf("admitted %v before any tunnel stream", tun)
	default:
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go a.serveTunnels(ctx, 1)
	tun := <-adm.ready
	if m := tun.Agent().Meta; m.PodID != 31 || m.PodName != "agentk-0" {
		t.Errorf("admitted with meta %+v, want Register's", m)
	}
}

func TestWrongTokenRefused(t *testing.T) {
	srv := grpctunnel.NewServer()
	defer srv.Close()
	adm := newAdmission(agentToken, 5)
	a := &fakeAgent{t: t, conn: connect(t, srv, adm), token: "wrong"}
	err := a.register(context.Background(), 1)
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("Register with a wrong token = %v, want Unauthenticated", err)
	}
	a.token = agentToken
	if err := a.register(context.Background(), 1); err != nil {
		t.Errorf("Register with the right token: %v", err)
	}
	if err := a.register(context.Background(), 1); err != nil {
		t.Fatal(err)
	}
	if n := adm.numChecks(); n != 2 {
		t.Errorf("%d token checks, want 2: a connection's known token is not checked again per call", n)
	}
}

// TestCallsCounted: every call of an authenticated agent is counted
// before it is served, and one the admission refuses is not served.
func TestCallsCounted(t *testing.T) {
	srv := grpctunnel.NewServer()
	defer srv.Close()
	adm := newAdmission(agentToken, 5)
	adm.callLimit = 2
	a := &fakeAgent{t: t, conn: connect(t, srv, adm), token: "wrong"}
	if err := a.register(context.Background(), 1); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("Register with a wrong token = %v, want Unauthenticated", err)
	}
	a.token = agentToken
	for i := range 2 {
		if err := a.register(context.Background(), 1); err != nil {
			t.Fatalf("call %d within the limit: %v", i+1, err)
		}
	}
	if err := a.register(context.Background(), 1); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("call over the limit = %v, want the admission's ResourceExhausted", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := reversetunnelrpc.NewReverseTunnelClient(a.conn).Connect(a.ctx(ctx))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("tunnel stream over the limit = %v, want ResourceExhausted", err)
	}
	select {
	case tun := <-adm.ready:
		t.Errorf("admitted %v with a stream over the limit", tun)
	default:
	}
	adm.mu.Lock()
	defer adm.mu.Unlock()
	if adm.calls != 2 {
		t.Errorf("%d calls counted, want 2: a refused token is not counted", adm.calls)
	}
}

func TestCloseEndsTunnel(t *testing.T) {
	e := newEnv(t, http.NotFoundHandler(), 2)
	done := make(chan struct{})
	e.t.AfterDone(func() { close(done) })
	e.agentMayFail = true
	e.t.Close()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("AfterDone callback did not run")
	}
	if e.t.Err() == nil {
		t.Error("Err is nil after Close")
	}
	req, _ := http.NewRequest(http.MethodGet, "http://agent/", nil)
	if _, err := e.t.RoundTrip(&tunnel.Request{HTTP: req}); err == nil {
		t.Error("RoundTrip on a closed tunnel succeeded")
	}
}

// TestOverSiteHTTP2: the same calls made on the site's own HTTP/2
// connection (grpcs://) make one tunnel per agent connection, which ends
// once the agent's calls are gone.
func TestOverSiteHTTP2(t *testing.T) {
	defer grpctunnel.SetH2ConnLinger(50 * time.Millisecond)()
	srv := grpctunnel.NewServer()
	defer srv.Close()
	adm := newAdmission(agentToken, 5)
	a := &fakeAgent{t: t, conn: connectHTTP2(t, srv, adm), token: agentToken,
		handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "over h2: "+r.URL.Path) })}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- a.serveTunnels(ctx, 2) }()
	tun := <-adm.ready
	if err := a.register(context.Background(), 77); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if _, body := get(t, tun, "/api", nil); body != "over h2: /api" {
			t.Fatalf("body %q", body)
		}
	}
	if tun.Agent().Meta.PodID != 77 {
		t.Errorf("Register went to another tunnel: meta %+v", tun.Agent().Meta)
	}
	select {
	case again := <-adm.ready:
		t.Fatalf("calls of one connection made a second tunnel %p next to %p", again, tun)
	default:
	}

	cancel() // the agent's calls end
	if err := <-served; err != nil {
		t.Errorf("agent: %v", err)
	}
	select {
	case <-tun.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("the tunnel outlived its agent's calls")
	}
}

// TestDrain stops the server gracefully with a request in flight: one that
// ends within the grace period completes, one that outlives it fails with
// an error its reader sees, never a clean end.
func TestDrain(t *testing.T) {
	for _, tc := range []struct {
		name       string
		grace      time.Duration
		finishes   bool // whether the agent answers the request within the grace
		wantBodyOK bool
	}{
		{"the request ends within the grace", time.Minute, true, true},
		{"the request outlives the grace", 200 * time.Millisecond, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			release := make(chan struct{})
			defer close(release)
			e := newEnv(t, firstThenLast(release), 2)
			e.agentMayFail = true // its calls fail once the server is gone
			resp := startFirstThenLast(t, e.t)
			defer resp.Body.Close()
			drained := make(chan struct{})
			go func() {
				defer close(drained)
				e.srv.Drain(tc.grace)
			}()
			if tc.finishes {
				release <- struct{}{}
			}
			rest, err := io.ReadAll(resp.Body)
			if ok := err == nil && string(rest) == "last"; ok != tc.wantBodyOK {
				t.Errorf("rest of the body %q, %v; want complete: %v", rest, err, tc.wantBodyOK)
			}
			select {
			case <-drained:
			case <-time.After(30 * time.Second):
				t.Fatal("Drain did not return")
			}
		})
	}
}

// firstThenLast answers "first " at once and "last" once release lets it:
// a response in flight for as long as a test wants.
func firstThenLast(release <-chan struct{}) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first ")
		w.(http.Flusher).Flush()
		<-release
		io.WriteString(w, "last")
	})
}

// startFirstThenLast sends a request to a firstThenLast agent through tun
// and returns the response once its first part has arrived.
func startFirstThenLast(t *testing.T, tun tunnel.Tunnel) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, "http://agent/watch", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := tun.RoundTrip(&tunnel.Request{HTTP: req})
	if err != nil {
		t.Fatal(err)
	}
	first := make([]byte, len("first "))
	if _, err := io.ReadFull(resp.Body, first); err != nil {
		resp.Body.Close()
		t.Fatal(err)
	}
	return resp
}

// TestDrainLeavesSiteHTTP2Calls: a request in flight on a tunnel of calls
// on the site's own HTTP/2 connection (grpcs://) goes on through Drain,
// which does not wait for it; Caddy's own HTTP/2 shutdown and the store's
// drain take care of that connection.
func TestDrainLeavesSiteHTTP2Calls(t *testing.T) {
	srv := grpctunnel.NewServer()
	defer srv.Close()
	adm := newAdmission(agentToken, 5)
	release := make(chan struct{})
	a := &fakeAgent{t: t, conn: connectHTTP2(t, srv, adm), token: agentToken,
		handler: firstThenLast(release)}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go a.serveTunnels(ctx, 2) // its calls end with the server, as they may
	resp := startFirstThenLast(t, <-adm.ready)
	defer resp.Body.Close()
	srv.Drain(time.Minute) // returns: no WebSocket connection has a call
	close(release)
	if rest, err := io.ReadAll(resp.Body); err != nil || string(rest) != "last" {
		t.Errorf("the request in flight during Drain ended with %q, %v", rest, err)
	}
}
