package kubeproxy

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
)

const blockedMsg = "Blocked Kubernetes API proxy response header"

// clusterAnswer is an agent that answers every request with status and
// header, as a cluster (or a hostile agent) might.
func clusterAnswer(status int, header http.Header) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		for k, vs := range header {
			w.Header()[k] = vs
		}
		w.WriteHeader(status)
		io.WriteString(w, `{"kind":"Status"}`)
	})
}

// blockedLines returns the blocked-header log lines as "name agent count".
func blockedLines(logs *observer.ObservedLogs) []string {
	var lines []string
	for _, e := range logs.FilterMessage(blockedMsg).All() {
		f := e.ContextMap()
		lines = append(lines, fmt.Sprintf("%v %v %v", f["header"], f["agent_id"], f["count"]))
	}
	slices.Sort(lines)
	return lines
}

func TestResponseHeaderAllowlist(t *testing.T) {
	apiserver := http.Header{
		"Content-Type":                      {"application/json"},
		"Audit-Id":                          {"6f1c0c8e-3b1e-4d4e-9d7e-2f3c1a0b9e8d"},
		"Cache-Control":                     {"no-cache, private"},
		"Warning":                           {`299 - "v1 ComponentStatus is deprecated"`, `299 - "another"`},
		"X-Kubernetes-Pf-Flowschema-Uid":    {"fs-uid"},
		"X-Kubernetes-Pf-Prioritylevel-Uid": {"pl-uid"},
		"X-Content-Type-Options":            {"nosniff"},
		"Etag":                              {`"abc"`},
		"Last-Modified":                     {"Mon, 02 Jan 2006 15:04:05 GMT"},
		"Expires":                           {"Mon, 02 Jan 2007 15:04:05 GMT"},
		"Vary":                              {"Accept"},
	}
	hostile := http.Header{
		"Set-Cookie":                {"_gitlab_session=attacker; Path=/; Domain=gitlab.example.com"},
		"Kas-Impersonate":           {"e30"},
		"Gitlab-Unauthorized":       {"true"},
		"Strict-Transport-Security": {"max-age=63072000; includeSubDomains"},
		"Alt-Svc":                   {`h3=":443"`},
		"X-Secret-Debug":            {"s3cr3t-value"},
	}
	merge := func(hs ...http.Header) http.Header {
		out := http.Header{}
		for _, h := range hs {
			for k, vs := range h {
				out[k] = append(out[k], vs...)
			}
		}
		return out
	}
	tests := []struct {
		name       string
		status     int
		header     http.Header
		extra      []string
		origin     string // AllowedOrigin; the request sends it as Origin
		wantPass   []string
		wantGone   []string
		wantLogged []string // "name agent count", sorted
	}{
		{
			name:     "what an apiserver sends passes",
			status:   http.StatusOK,
			header:   apiserver,
			wantPass: []string{"Content-Type", "Audit-Id", "Cache-Control", "Warning", "X-Kubernetes-Pf-Flowschema-Uid", "X-Kubernetes-Pf-Prioritylevel-Uid", "X-Content-Type-Options", "Etag", "Last-Modified", "Expires", "Vary"},
		},
		{
			name:     "created: Location",
			status:   http.StatusCreated,
			header:   http.Header{"Location": {"/api/v1/namespaces/x"}, "Content-Type": {"application/json"}},
			wantPass: []string{"Location", "Content-Type"},
		},
		{
			name:     "throttled: Retry-After",
			status:   http.StatusTooManyRequests,
			header:   http.Header{"Retry-After": {"1"}, "Content-Type": {"application/json"}},
			wantPass: []string{"Retry-After", "Content-Type"},
		},
		{
			name:       "hostile agent",
			status:     http.StatusOK,
			header:     merge(apiserver, hostile),
			wantPass:   []string{"Content-Type", "Audit-Id", "Warning"},
			wantGone:   []string{"Set-Cookie", "Kas-Impersonate", "Gitlab-Unauthorized", "Strict-Transport-Security", "Alt-Svc", "X-Secret-Debug"},
			wantLogged: []string{"Alt-Svc 1 1", "Gitlab-Unauthorized 1 1", "Kas-Impersonate 1 1", "Set-Cookie 1 1", "Strict-Transport-Security 1 1", "X-Secret-Debug 1 1"},
		},
		{
			name:       "a cluster's 401 does not look like a refusal of KAS",
			status:     http.StatusUnauthorized,
			header:     http.Header{"Content-Type": {"application/json"}, "Gitlab-Unauthorized": {"true"}, "Www-Authenticate": {`Basic realm="x"`}},
			wantPass:   []string{"Content-Type"},
			wantGone:   []string{"Gitlab-Unauthorized", "Www-Authenticate"},
			wantLogged: []string{"Gitlab-Unauthorized 1 1", "Www-Authenticate 1 1"},
		},
		{
			name:       "extra allowed, in any case",
			status:     http.StatusOK,
			header:     http.Header{"X-Secret-Debug": {"v"}, "X-Other": {"v"}},
			extra:      []string{"x-secret-DEBUG"},
			wantPass:   []string{"X-Secret-Debug"},
			wantGone:   []string{"X-Other"},
			wantLogged: []string{"X-Other 1 1"},
		},
		{
			name:       "extra names cannot let KAS's own through",
			status:     http.StatusUnauthorized,
			header:     http.Header{"Gitlab-Unauthorized": {"true"}, "Kas-Upgrade": {"x"}},
			extra:      []string{"Gitlab-Unauthorized", "Kas-Upgrade"},
			wantGone:   []string{"Gitlab-Unauthorized", "Kas-Upgrade"},
			wantLogged: []string{"Gitlab-Unauthorized 1 1", "Kas-Upgrade 1 1"},
		},
		{
			name:     "CORS on: the cluster's CORS headers are replaced silently",
			status:   http.StatusOK,
			header:   http.Header{"Access-Control-Allow-Origin": {"https://evil.example"}, "Access-Control-Expose-Headers": {"*"}},
			extra:    []string{"Access-Control-Allow-Origin"},
			origin:   "https://gitlab.example.com",
			wantGone: []string{"Access-Control-Expose-Headers"},
		},
		{
			name:       "CORS off: the cluster's CORS headers are blocked",
			status:     http.StatusOK,
			header:     http.Header{"Access-Control-Allow-Origin": {"https://evil.example"}},
			wantGone:   []string{"Access-Control-Allow-Origin"},
			wantLogged: []string{"Access-Control-Allow-Origin 1 1"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, clusterAnswer(tt.status, tt.header))
			core, logs := observer.New(zapcore.DebugLevel)
			p := e.proxy.Config.Handler.(*Proxy)
			p.Logger = zap.New(core)
			p.ExtraAllowedResponseHeaders = tt.extra
			p.AllowedOrigin = tt.origin
			var reqHeader http.Header
			if tt.origin != "" {
				reqHeader = http.Header{"Origin": {tt.origin}}
			}
			resp := e.do(t, http.MethodGet, prefix+"api/v1/namespaces", "Bearer pat:1:plain-token", reqHeader, nil)
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tt.status)
			}
			for _, k := range tt.wantPass {
				if got, want := resp.Header.Values(k), tt.header.Values(k); !slices.Equal(got, want) {
					t.Errorf("%s = %q, want %q", k, got, want)
				}
			}
			for _, k := range tt.wantGone {
				if got := resp.Header.Values(k); len(got) > 0 {
					t.Errorf("%s reached the client: %q", k, got)
				}
			}
			if tt.origin != "" && resp.Header.Get("Access-Control-Allow-Origin") != tt.origin {
				t.Errorf("Access-Control-Allow-Origin = %q, want KAS's %q", resp.Header.Get("Access-Control-Allow-Origin"), tt.origin)
			}
			if got := resp.Header.Values("Via"); !slices.Equal(got, []string{"1.1 caddy-kas/test"}) {
				t.Errorf("Via = %q", got)
			}
			if got := blockedLines(logs); !slices.Equal(got, tt.wantLogged) {
				t.Errorf("logged %q, want %q", got, tt.wantLogged)
			}
			for _, entry := range logs.All() {
				for _, v := range []string{"s3cr3t", "attacker", "max-age", "evil"} {
					if strings.Contains(fmt.Sprint(entry.ContextMap()), v) {
						t.Errorf("a header value reached the log: %v", entry.ContextMap())
					}
				}
			}
		})
	}
}

// TestResponseHeaderAllowlistSwitched: the 101 of exec, attach and
// port-forward keeps the headers of the stream protocol's handshake and
// loses the rest.
func TestResponseHeaderAllowlistSwitched(t *testing.T) {
	for _, tt := range []struct {
		upgrade string
		header  http.Header
	}{
		{"SPDY/3.1", http.Header{"X-Stream-Protocol-Version": {"v4.channel.k8s.io"}}},
		{"websocket", http.Header{"Sec-Websocket-Accept": {"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="}, "Sec-Websocket-Protocol": {"v5.channel.k8s.io"}}},
	} {
		t.Run(tt.upgrade, func(t *testing.T) {
			e := newEnv(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				req, err := h2tunnel.DecodeRequest(r)
				if err != nil || req.Upgrade == "" {
					http.Error(w, fmt.Sprintf("not an upgrade: %v", err), http.StatusBadRequest)
					return
				}
				h := w.Header()
				for k, vs := range tt.header {
					h[k] = vs
				}
				h.Set("Set-Cookie", "a=b")
				h.Set("Gitlab-Unauthorized", "true")
				h.Set("Audit-Id", "audit")
				h2tunnel.SetSwitched(h, tt.upgrade)
				w.WriteHeader(http.StatusOK)
				http.NewResponseController(w).Flush()
				rc := http.NewResponseController(w)
				buf := make([]byte, 512)
				for { // echo until the client closes
					n, err := r.Body.Read(buf)
					if n > 0 {
						w.Write(buf[:n])
						rc.Flush()
					}
					if err != nil {
						return
					}
				}
			}))
			core, logs := observer.New(zapcore.DebugLevel)
			e.proxy.Config.Handler.(*Proxy).Logger = zap.New(core)

			conn, err := net.Dial("tcp", strings.TrimPrefix(e.proxy.URL, "http://"))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(30 * time.Second))
			fmt.Fprintf(conn, "GET %sapi/v1/namespaces/ns/pods/p/exec?command=sh HTTP/1.1\r\nHost: kas\r\n"+
				"Authorization: Bearer pat:1:plain-token\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n", prefix, tt.upgrade)
			br := bufio.NewReader(conn)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != tt.upgrade {
				t.Fatalf("got %s, Upgrade %q", resp.Status, resp.Header.Get("Upgrade"))
			}
			for k, vs := range tt.header {
				if got := resp.Header.Values(k); !slices.Equal(got, vs) {
					t.Errorf("%s = %q, want %q", k, got, vs)
				}
			}
			if resp.Header.Get("Audit-Id") != "audit" {
				t.Errorf("Audit-Id lost: %v", resp.Header)
			}
			for _, k := range []string{"Set-Cookie", "Gitlab-Unauthorized", "Kas-Upgrade", "Kas-Upgrade-Status"} {
				if v := resp.Header.Get(k); v != "" {
					t.Errorf("%s reached the client: %q", k, v)
				}
			}
			// The switched stream still works.
			io.WriteString(conn, "ping")
			buf := make([]byte, 4)
			if _, err := io.ReadFull(br, buf); err != nil || string(buf) != "ping" {
				t.Errorf("echo: %q, %v", buf, err)
			}
			if got := blockedLines(logs); !slices.Equal(got, []string{"Gitlab-Unauthorized 1 1", "Set-Cookie 1 1"}) {
				t.Errorf("logged %q", got)
			}
		})
	}
}

// fakeClock drives a blockedHeaderLog: now is set by the test, and the
// flushes it schedules run when the test says.
type fakeClock struct {
	now     time.Time
	pending []func()
	delays  []time.Duration
}

func (c *fakeClock) runPending() {
	fs := c.pending
	c.pending, c.delays = nil, nil
	for _, f := range fs {
		f()
	}
}

func newTestBlockedLog() (*blockedHeaderLog, *fakeClock, *[]string) {
	clock := &fakeClock{now: time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)}
	var lines []string
	b := newBlockedHeaderLog(func(name string, agentID int64, count int) {
		lines = append(lines, fmt.Sprintf("%s %d %d", name, agentID, count))
	})
	b.now = func() time.Time { return clock.now }
	b.after = func(d time.Duration, f func()) {
		clock.delays = append(clock.delays, d)
		clock.pending = append(clock.pending, f)
	}
	return b, clock, &lines
}

func TestBlockedHeaderLog(t *testing.T) {
	b, clock, lines := newTestBlockedLog()
	expect := func(want ...string) {
		t.Helper()
		if !slices.Equal(*lines, want) {
			t.Fatalf("lines %q, want %q", *lines, want)
		}
	}

	b.add("Set-Cookie", 1)
	expect("Set-Cookie 1 1") // the first at once
	for i := range 99 {
		clock.now = clock.now.Add(100 * time.Millisecond)
		b.add("Set-Cookie", int64(2+i%2))
	}
	b.add("Server", 4) // another name: its own line at once
	expect("Set-Cookie 1 1", "Server 4 1")
	if len(clock.pending) != 1 || clock.delays[0] != time.Minute-100*time.Millisecond {
		t.Fatalf("scheduled %v, want one flush a minute after the first line", clock.delays)
	}
	clock.now = time.Date(2025, 1, 1, 0, 1, 0, 0, time.UTC)
	clock.runPending()
	expect("Set-Cookie 1 1", "Server 4 1", "Set-Cookie 2 99") // the count, with the latest agent

	// Within a minute of that line: counted, logged a minute after it.
	clock.now = clock.now.Add(time.Second)
	b.add("Set-Cookie", 5)
	expect("Set-Cookie 1 1", "Server 4 1", "Set-Cookie 2 99")
	if len(clock.pending) != 1 || clock.delays[0] != time.Minute-time.Second {
		t.Fatalf("scheduled %v", clock.delays)
	}
	clock.now = clock.now.Add(time.Minute)
	clock.runPending()
	expect("Set-Cookie 1 1", "Server 4 1", "Set-Cookie 2 99", "Set-Cookie 5 1")

	// Quiet for a minute: the next one is logged at once again.
	clock.now = clock.now.Add(time.Minute)
	b.add("Set-Cookie", 6)
	expect("Set-Cookie 1 1", "Server 4 1", "Set-Cookie 2 99", "Set-Cookie 5 1", "Set-Cookie 6 1")
	if len(clock.pending) != 0 {
		t.Errorf("scheduled %v after a line written at once", clock.delays)
	}
}

// TestBlockedHeaderLogBounded: a cluster that sends a new header name with
// every answer neither grows the log's memory nor its lines without end.
func TestBlockedHeaderLogBounded(t *testing.T) {
	b, clock, lines := newTestBlockedLog()
	for i := range 3 * maxBlockedNames {
		b.add(fmt.Sprintf("X-Name-%d", i), 1)
	}
	if len(b.names) > maxBlockedNames+1 {
		t.Errorf("%d names remembered", len(b.names))
	}
	if n := len(*lines); n != maxBlockedNames+1 {
		t.Errorf("%d lines, want one per remembered name and one for the others", n)
	}
	clock.now = clock.now.Add(time.Minute)
	clock.runPending()
	if last := (*lines)[len(*lines)-1]; last != fmt.Sprintf("%s 1 %d", otherBlockedNames, 2*maxBlockedNames-1) {
		t.Errorf("last line %q", last)
	}
	// A minute on, the old names age out and new ones are remembered.
	clock.now = clock.now.Add(time.Minute)
	b.add("X-Fresh", 1)
	if last := (*lines)[len(*lines)-1]; last != "X-Fresh 1 1" {
		t.Errorf("last line %q", last)
	}

	long := strings.Repeat("X", 10*maxBlockedNameLen)
	b.add(long, 1)
	if last := (*lines)[len(*lines)-1]; last != long[:maxBlockedNameLen]+" 1 1" {
		t.Errorf("a long name is logged as %d bytes", len(last))
	}
}

// TestResponseHeadersFilter: hop-by-hop headers, and those Connection
// names, are the connection's and neither pass nor count as blocked.
func TestResponseHeadersFilter(t *testing.T) {
	var logged []string
	r := newResponseHeaders([]string{"x-extra"}, func(name string, agentID int64, count int) {
		logged = append(logged, name)
	})
	in := http.Header{
		"Connection":        {"X-Hop, keep-alive"},
		"X-Hop":             {"per-connection"},
		"Keep-Alive":        {"timeout=5"},
		"Transfer-Encoding": {"chunked"},
		"Trailer":           {"X-Checksum"},
		"Upgrade":           {"h2c"},
		"content-type":      {"application/json"}, // not canonical: a map built by hand
		"X-Extra":           {"1"},
		"X-Blocked":         {"2"},
	}
	before := in.Clone()
	got := http.Header{}
	r.copyAllowed(got, in, 7, false)
	want := http.Header{"Content-Type": {"application/json"}, "X-Extra": {"1"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	if !slices.Equal(logged, []string{"X-Blocked"}) {
		t.Errorf("logged %q", logged)
	}
	if !reflect.DeepEqual(in, before) {
		t.Error("the cluster's header map was modified")
	}
}

func TestCheckExtraAllowedResponseHeaders(t *testing.T) {
	if err := CheckExtraAllowedResponseHeaders([]string{"X-Custom", "set-cookie", "Strict-Transport-Security"}); err != nil {
		t.Errorf("refused valid names: %v", err)
	}
	for _, name := range []string{"", "X Custom", "X-Custom:", "Gitlab-Unauthorized", "gitlab-unauthorized", "Kas-Impersonate", "kas-upgrade", "Connection", "Transfer-Encoding", "Upgrade"} {
		if err := CheckExtraAllowedResponseHeaders([]string{"X-Fine", name}); err == nil {
			t.Errorf("%q allowed", name)
		}
	}
	for _, name := range DefaultAllowedResponseHeaders() {
		if err := CheckExtraAllowedResponseHeaders([]string{name}); err != nil {
			t.Errorf("default %q: %v", name, err)
		}
	}
}
