package agentk

import (
	"bufio"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/kubestatus"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel/h2tunneltest"
)

// recordingUpstream is an httptest "apiserver" that records the requests
// it gets.
type recordingUpstream struct {
	srv *httptest.Server

	mu   sync.Mutex // guards reqs
	reqs []*http.Request
}

func newRecordingUpstream(t *testing.T, h http.HandlerFunc) *recordingUpstream {
	u := &recordingUpstream{}
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		u.reqs = append(u.reqs, r.Clone(r.Context()))
		u.mu.Unlock()
		if h != nil {
			h(w, r)
			return
		}
		io.WriteString(w, "upstream ok")
	}))
	t.Cleanup(u.srv.Close)
	return u
}

func (u *recordingUpstream) requests() []*http.Request {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]*http.Request(nil), u.reqs...)
}

// newTestProxy serves a proxy to server (with base path) as agentk with
// token "agentk-token".
func newTestProxy(t *testing.T, server string) (*httptest.Server, *metrics, *observer.ObservedLogs) {
	u, err := parseServerURL(server)
	if err != nil {
		t.Fatal(err)
	}
	c := newCluster(clusterSpec{server: u, cred: staticToken("agentk-token")})
	t.Cleanup(c.CloseIdleConnections)
	core, logs := observer.New(zap.DebugLevel)
	m := newMetrics()
	srv := httptest.NewServer(newProxy(c, zap.New(core), m))
	t.Cleanup(srv.Close)
	return srv, m, logs
}

// encodedIdentity is an identity as KAS sends it through the tunnel.
func encodedIdentity(t *testing.T) string {
	return h2tunnel.EncodeIdentity(&identity.Identity{
		Username: "alice",
		Groups:   []string{"dev", "viewers"},
		Extra:    map[string][]string{"scopes": {"a", "b"}},
	})
}

func TestProxyHeaders(t *testing.T) {
	tests := []struct {
		name     string
		header   http.Header
		wantCode int
		// wantUpstream checks the headers the apiserver got; nil means
		// the request must not reach it.
		wantUpstream func(t *testing.T, h http.Header)
		wantMessage  string
	}{
		{
			name: "caller credentials replaced by agentk's",
			header: http.Header{
				"Authorization": {"Bearer user-token"},
				"Cookie":        {"_gitlab_kas=secret"},
				"Accept":        {"application/json"},
			},
			wantCode: http.StatusOK,
			wantUpstream: func(t *testing.T, h http.Header) {
				if got := h.Values("Authorization"); len(got) != 1 || got[0] != "Bearer agentk-token" {
					t.Errorf("Authorization = %q, want agentk's token only", got)
				}
				if h.Get("Cookie") != "" {
					t.Errorf("Cookie reached the apiserver")
				}
				if h.Get("Accept") != "application/json" {
					t.Errorf("Accept = %q, want it passed through", h.Get("Accept"))
				}
				for k := range h {
					if strings.HasPrefix(k, "X-Forwarded-") || k == "Forwarded" {
						t.Errorf("%s header added", k)
					}
				}
			},
		},
		{
			name:     "identity becomes impersonation",
			header:   http.Header{h2tunnel.IdentityHeader: {encodedIdentity(t)}, "Authorization": {"Bearer user-token"}},
			wantCode: http.StatusOK,
			wantUpstream: func(t *testing.T, h http.Header) {
				if got := h.Get("Impersonate-User"); got != "alice" {
					t.Errorf("Impersonate-User = %q", got)
				}
				if got := h.Values("Impersonate-Group"); strings.Join(got, ",") != "dev,viewers" {
					t.Errorf("Impersonate-Group = %q", got)
				}
				if got := h.Values("Impersonate-Extra-Scopes"); strings.Join(got, ",") != "a,b" {
					t.Errorf("Impersonate-Extra-Scopes = %q", got)
				}
				if h.Get(h2tunnel.IdentityHeader) != "" {
					t.Errorf("%s reached the apiserver", h2tunnel.IdentityHeader)
				}
				if h.Get("Authorization") != "Bearer agentk-token" {
					t.Errorf("Authorization = %q", h.Get("Authorization"))
				}
			},
		},
		{
			name:        "identity with client impersonation is nested",
			header:      http.Header{h2tunnel.IdentityHeader: {encodedIdentity(t)}, "Impersonate-User": {"bob"}},
			wantCode:    http.StatusBadRequest,
			wantMessage: "nested impersonation is not supported",
		},
		{
			name:        "identity with client impersonation of a group only is nested",
			header:      http.Header{h2tunnel.IdentityHeader: {encodedIdentity(t)}, "Impersonate-Group": {"system:masters"}},
			wantCode:    http.StatusBadRequest,
			wantMessage: "nested impersonation is not supported",
		},
		{
			name:     "client impersonation without identity passes",
			header:   http.Header{"Impersonate-User": {"bob"}, "Impersonate-Group": {"ops"}},
			wantCode: http.StatusOK,
			wantUpstream: func(t *testing.T, h http.Header) {
				if h.Get("Impersonate-User") != "bob" || h.Get("Impersonate-Group") != "ops" {
					t.Errorf("client impersonation changed: %v", h)
				}
			},
		},
		{
			name:        "malformed identity",
			header:      http.Header{h2tunnel.IdentityHeader: {"!!not base64!!"}},
			wantCode:    http.StatusBadRequest,
			wantMessage: "malformed identity header",
		},
		{
			name:        "identity without username",
			header:      http.Header{h2tunnel.IdentityHeader: {h2tunnel.EncodeIdentity(&identity.Identity{Groups: []string{"g"}})}},
			wantCode:    http.StatusBadRequest,
			wantMessage: "malformed identity header",
		},
		{
			name:        "two identities",
			header:      http.Header{h2tunnel.IdentityHeader: {encodedIdentity(t), encodedIdentity(t)}},
			wantCode:    http.StatusBadRequest,
			wantMessage: "more than one",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			up := newRecordingUpstream(t, nil)
			p, m, _ := newTestProxy(t, up.srv.URL)
			req, _ := http.NewRequest(http.MethodGet, p.URL+"/api/v1/namespaces", nil)
			req.Header = tt.header
			resp, err := p.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.wantCode {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tt.wantCode, body)
			}
			reqs := up.requests()
			if tt.wantUpstream == nil {
				if len(reqs) != 0 {
					t.Errorf("the request reached the apiserver")
				}
				st := decodeStatus(t, resp.Header, body)
				if st.Code != tt.wantCode || st.Reason != "BadRequest" || !strings.Contains(st.Message, tt.wantMessage) {
					t.Errorf("status %+v, want code %d, reason BadRequest, message with %q", st, tt.wantCode, tt.wantMessage)
				}
			} else {
				if len(reqs) != 1 {
					t.Fatalf("apiserver got %d requests, want 1", len(reqs))
				}
				tt.wantUpstream(t, reqs[0].Header)
			}
			// The handler's bookkeeping ends just after the response.
			eventually(t, "request no longer in flight", func() bool { return m.inFlight.Load() == 0 })
			if got := m.requestCount(tt.wantCode); got != 1 {
				t.Errorf("requests counted with code %d: %d, want 1", tt.wantCode, got)
			}
		})
	}
}

func decodeStatus(t *testing.T, h http.Header, body []byte) kubestatus.Status {
	t.Helper()
	if ct := h.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	var st kubestatus.Status
	if err := json.Unmarshal(body, &st); err != nil {
		t.Fatalf("body is not a Status: %v: %s", err, body)
	}
	if st.Kind != "Status" || st.APIVersion != "v1" || st.Status != "Failure" {
		t.Errorf("not a failure Status: %s", body)
	}
	return st
}

func TestProxyBasePathAndQuery(t *testing.T) {
	up := newRecordingUpstream(t, nil)
	p, _, _ := newTestProxy(t, up.srv.URL+"/k8s/clusters/c-1/")
	resp, err := p.Client().Get(p.URL + "/api/v1/namespaces/default/pods?watch=1&labelSelector=" + url.QueryEscape("app in (a,b)"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	reqs := up.requests()
	if len(reqs) != 1 {
		t.Fatalf("apiserver got %d requests", len(reqs))
	}
	if got := reqs[0].URL.Path; got != "/k8s/clusters/c-1/api/v1/namespaces/default/pods" {
		t.Errorf("path = %q", got)
	}
	if got := reqs[0].URL.Query().Get("labelSelector"); got != "app in (a,b)" {
		t.Errorf("labelSelector = %q", got)
	}
	if got := reqs[0].URL.Query().Get("watch"); got != "1" {
		t.Errorf("watch = %q", got)
	}
	if host := reqs[0].Host; host != strings.TrimPrefix(up.srv.URL, "http://") {
		t.Errorf("Host = %q, want the apiserver's", host)
	}
}

func TestProxyUpstreamDown(t *testing.T) {
	down := httptest.NewServer(http.NotFoundHandler())
	downURL := down.URL
	down.Close() // nothing listens there any more
	p, m, logs := newTestProxy(t, downURL)

	req, _ := http.NewRequest(http.MethodGet, p.URL+"/api", nil)
	req.Header.Set("Authorization", "Bearer user-token")
	resp, err := p.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("status %d, want 502", resp.StatusCode)
	}
	st := decodeStatus(t, resp.Header, body)
	if st.Code != http.StatusBadGateway || !strings.Contains(st.Message, downURL) {
		t.Errorf("Status %+v should be a 502 naming %s", st, downURL)
	}
	for _, secret := range []string{"agentk-token", "user-token"} {
		if strings.Contains(string(body), secret) {
			t.Errorf("502 body contains %q", secret)
		}
	}
	entries := logs.FilterMessage("cannot reach the Kubernetes API server").All()
	if len(entries) != 1 {
		t.Fatalf("logged %d errors about the apiserver, want 1", len(entries))
	}
	if got := entries[0].ContextMap()["apiserver"]; got != downURL {
		t.Errorf("log field apiserver = %v", got)
	}
	eventually(t, "request no longer in flight", func() bool { return m.inFlight.Load() == 0 })
	if got := m.requestCount(http.StatusBadGateway); got != 1 {
		t.Errorf("502 counted %d times, want 1", got)
	}
}

func TestProxyStreamsFlushed(t *testing.T) {
	// The apiserver sends one event, then waits until the client has
	// received it before it sends the next: without a flush after every
	// write the test would hang (and fail after the bound).
	next := make(chan struct{})
	up := newRecordingUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		rc := http.NewResponseController(w)
		for i := range 3 {
			io.WriteString(w, `{"type":"ADDED","n":`+string(rune('0'+i))+"}\n")
			if err := rc.Flush(); err != nil {
				t.Errorf("flush: %v", err)
				return
			}
			select {
			case <-next:
			case <-r.Context().Done():
				return
			}
		}
	})
	p, _, _ := newTestProxy(t, up.srv.URL)
	resp, err := p.Client().Get(p.URL + "/api/v1/pods?watch=1")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	for i := range 3 {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		if want := `{"type":"ADDED","n":` + string(rune('0'+i)) + "}\n"; line != want {
			t.Fatalf("event %d = %q, want %q", i, line, want)
		}
		next <- struct{}{}
	}
}

// TestEarlyRefusalDoesNotDeadlock: the apiserver (HTTP/2, as a real one)
// refuses a write before reading its body, and the body's sender (KAS's
// HTTP/2 client, which stops sending on a status above 299) never finishes
// it. The response must still end.
func TestEarlyRefusalDoesNotDeadlock(t *testing.T) {
	c := http2Cluster(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusForbidden)
		io.WriteString(w, `{"kind":"Status","code":403}`)
	}))
	agent := h2tunneltest.NewPair(t, newProxy(c, zap.NewNop(), newMetrics()), h2tunneltest.Options{})

	body, bodyWriter := io.Pipe()
	defer bodyWriter.Close()
	go io.WriteString(bodyWriter, `{"apiVersion":"v1","kind":"ConfigMap",`) // and never the rest
	done := make(chan error, 1)
	var status int
	go func() {
		req, _ := http.NewRequest(http.MethodPost, "http://agent/api/v1/namespaces/ns/configmaps", body)
		resp, err := agent.RoundTrip(req)
		if err != nil {
			done <- err
			return
		}
		status = resp.StatusCode
		_, err = io.ReadAll(resp.Body)
		resp.Body.Close()
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil || status != http.StatusForbidden {
			t.Errorf("response %d, %v; want the 403 in full", status, err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the refused request's response never ended: deadlock")
	}
}

// http2Cluster starts h as an HTTPS apiserver speaking HTTP/2, as a real one
// does, and returns agentk's cluster for it, with a static token.
func http2Cluster(tb testing.TB, h http.Handler) *Cluster {
	tb.Helper()
	upstream := httptest.NewUnstartedServer(h)
	upstream.EnableHTTP2 = true
	upstream.StartTLS()
	tb.Cleanup(upstream.Close)
	server, err := parseServerURL(upstream.URL)
	if err != nil {
		tb.Fatal(err)
	}
	tlsConfig := upstream.Client().Transport.(*http.Transport).TLSClientConfig.Clone()
	c := newCluster(clusterSpec{server: server, tls: tlsConfig, cred: staticToken("agentk-token")})
	tb.Cleanup(c.CloseIdleConnections)
	return c
}
