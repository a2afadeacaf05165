package gitlab

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

const testUserAgent = "gitlab-kas/v0.0.0-test/0000000"

// fakeGitLab is a GitLab that checks every request the way Rails does and
// fails the test on any deviation. Answers come from the handlers set per
// path.
type fakeGitLab struct {
	t      *testing.T
	secret []byte
	prefix string // relative URL root the client must use
	srv    *httptest.Server

	mu       sync.Mutex // guards handlers and calls
	handlers map[string]http.HandlerFunc
	calls    map[string]int
}

func newFakeGitLab(t *testing.T, prefix string) *fakeGitLab {
	t.Helper()
	secret := make([]byte, SecretLength)
	rand.Read(secret)
	f := &fakeGitLab{t: t, secret: secret, prefix: prefix, handlers: map[string]http.HandlerFunc{}, calls: map[string]int{}}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

// client returns a client of f.
func (f *fakeGitLab) client() *Client {
	u, err := url.Parse(f.srv.URL + f.prefix)
	if err != nil {
		f.t.Fatal(err)
	}
	return &Client{BaseURL: u, HTTPClient: f.srv.Client(), Secret: f.secret, UserAgent: testUserAgent}
}

func (f *fakeGitLab) handle(path string, h http.HandlerFunc) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.handlers[path] = h
}

func (f *fakeGitLab) callCount(path string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[path]
}

func (f *fakeGitLab) serve(w http.ResponseWriter, r *http.Request) {
	t := f.t
	path, ok := strings.CutPrefix(r.URL.Path, f.prefix)
	if !ok {
		t.Errorf("request to %s: not under the relative URL root %q", r.URL.Path, f.prefix)
		http.NotFound(w, r)
		return
	}
	if got := r.Header.Get("User-Agent"); got != testUserAgent {
		t.Errorf("%s: User-Agent %q, want %q", path, got, testUserAgent)
	}
	if r.URL.RawQuery != "" {
		t.Errorf("%s: unexpected query %q", path, r.URL.RawQuery)
	}
	switch path {
	case PathAgentInfo:
		f.checkMethod(r, path, http.MethodGet)
		f.checkJWT(r, path)
		if vs := r.Header.Values("Authorization"); len(vs) != 1 || !strings.HasPrefix(vs[0], "Bearer ") || len(vs[0]) == len("Bearer ") {
			t.Errorf("%s: Authorization %q, want one Bearer token", path, vs)
		}
		if len(r.Header.Values("Job-Token")) != 0 {
			t.Errorf("%s: unexpected Job-Token", path)
		}
	case PathAllowedAgents:
		f.checkMethod(r, path, http.MethodGet)
		if vs := r.Header.Values("Job-Token"); len(vs) != 1 || vs[0] == "" {
			t.Errorf("%s: Job-Token %q, want exactly one", path, vs)
		}
		if len(r.Header.Values(JWTRequestHeader)) != 0 {
			t.Errorf("%s: carries %s; GitLab's agent server sends none here", path, JWTRequestHeader)
		}
		if len(r.Header.Values("Authorization")) != 0 {
			t.Errorf("%s: unexpected Authorization", path)
		}
	case PathAuthorizeProxyUser:
		f.checkMethod(r, path, http.MethodPost)
		f.checkJWT(r, path)
		f.checkNoCredentialHeaders(r, path)
		f.checkAuthorizeBody(r, path)
	case PathUsageMetrics:
		f.checkMethod(r, path, http.MethodPost)
		f.checkJWT(r, path)
		f.checkNoCredentialHeaders(r, path)
		f.checkUsageBody(r, path)
	case PathAgentConfiguration:
		f.checkMethod(r, path, http.MethodPost)
		f.checkJWT(r, path)
		f.checkNoCredentialHeaders(r, path)
	default:
		t.Errorf("request to unexpected path %s", path)
		http.NotFound(w, r)
		return
	}
	f.mu.Lock()
	f.calls[path]++
	h := f.handlers[path]
	f.mu.Unlock()
	if h == nil {
		t.Errorf("%s: no handler set", path)
		http.NotFound(w, r)
		return
	}
	h(w, r)
}

func (f *fakeGitLab) checkMethod(r *http.Request, path, want string) {
	if r.Method != want {
		f.t.Errorf("%s: method %s, want %s", path, r.Method, want)
	}
}

func (f *fakeGitLab) checkNoCredentialHeaders(r *http.Request, path string) {
	for _, h := range []string{"Authorization", "Job-Token"} {
		if len(r.Header.Values(h)) != 0 {
			f.t.Errorf("%s: unexpected %s header", path, h)
		}
	}
}

// checkJWT verifies the KAS JWT as Rails' Gitlab::Kas.verify_api_request
// does (kas-spec §2.2), and more strictly: the exact validity window.
func (f *fakeGitLab) checkJWT(r *http.Request, path string) {
	t := f.t
	vs := r.Header.Values(JWTRequestHeader)
	if len(vs) != 1 {
		t.Errorf("%s: %d %s headers, want 1", path, len(vs), JWTRequestHeader)
		return
	}
	if err := verifyKASJWT(vs[0], f.secret, time.Now()); err != "" {
		t.Errorf("%s: %s", path, err)
	}
}

// verifyKASJWT returns what is wrong with token, or "".
func verifyKASJWT(token string, secret []byte, now time.Time) string {
	claims := jwt.MapClaims{}
	parsed, err := jwt.ParseWithClaims(token, claims, func(*jwt.Token) (any, error) { return secret, nil },
		jwt.WithValidMethods([]string{"HS256"}), jwt.WithIssuer("gitlab-kas"), jwt.WithAudience("gitlab"),
		jwt.WithExpirationRequired(), jwt.WithIssuedAt(), jwt.WithTimeFunc(func() time.Time { return now }))
	if err != nil {
		return "JWT rejected: " + err.Error()
	}
	if parsed.Header["alg"] != "HS256" {
		return "JWT alg is not HS256"
	}
	num := func(name string) int64 {
		v, ok := claims[name].(float64)
		if !ok {
			return -1
		}
		return int64(v)
	}
	iat, nbf, exp := num("iat"), num("nbf"), num("exp")
	if iat < 0 || nbf < 0 || exp < 0 {
		return "JWT lacks iat, nbf or exp"
	}
	if exp-iat != 30 || iat-nbf != 5 {
		return "JWT window wrong: want nbf=iat-5s, exp=iat+30s"
	}
	if d := now.Unix() - iat; d < -1 || d > 60 {
		return "JWT iat is not now"
	}
	for k := range claims {
		if !slices.Contains([]string{"iss", "aud", "iat", "nbf", "exp"}, k) {
			return "JWT has unexpected claim " + k
		}
	}
	return ""
}

// checkAuthorizeBody checks the JSON body of authorize_proxy_user against
// the shape Rails declares (kas-spec §2.6).
func (f *fakeGitLab) checkAuthorizeBody(r *http.Request, path string) {
	t := f.t
	if ct := r.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s: Content-Type %q", path, ct)
	}
	body := readBody(t, r)
	var fields map[string]any
	if err := json.Unmarshal(body, &fields); err != nil {
		t.Errorf("%s: body is not a JSON object: %v", path, err)
		return
	}
	if _, ok := fields["agent_id"].(float64); !ok {
		t.Errorf("%s: agent_id missing or not a number: %s", path, body)
	}
	if s, _ := fields["access_key"].(string); s == "" {
		t.Errorf("%s: access_key missing: %s", path, body)
	}
	want := []string{"access_key", "access_type", "agent_id"}
	switch fields["access_type"] {
	case "session_cookie":
		want = append(want, "csrf_token")
		if s, _ := fields["csrf_token"].(string); s == "" {
			t.Errorf("%s: session_cookie without csrf_token: %s", path, body)
		}
	case "personal_access_token":
	default:
		t.Errorf("%s: access_type %v is neither session_cookie nor personal_access_token", path, fields["access_type"])
	}
	var got []string
	for k := range fields {
		got = append(got, k)
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("%s: body keys %v, want %v", path, got, want)
	}
}

func (f *fakeGitLab) checkUsageBody(r *http.Request, path string) {
	t := f.t
	if ct := r.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s: Content-Type %q", path, ct)
	}
	body := readBody(t, r)
	dec := json.NewDecoder(strings.NewReader(string(body)))
	dec.DisallowUnknownFields()
	var m UsageMetrics
	if err := dec.Decode(&m); err != nil {
		t.Errorf("%s: body %s: %v", path, body, err)
	}
}

// readBody reads r's body and puts it back for the handler.
func readBody(t *testing.T, r *http.Request) []byte {
	b, err := io.ReadAll(r.Body)
	if err != nil {
		t.Errorf("reading body: %v", err)
	}
	r.Body.Close()
	r.Body = io.NopCloser(bytes.NewReader(b))
	return b
}

// jsonAnswer returns a handler answering status with body.
func jsonAnswer(status int, body string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		w.Write([]byte(body))
	}
}
