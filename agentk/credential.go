package agentk

import (
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"
)

// tokenRefreshInterval is how often a token file is re-read. Projected
// service account tokens rotate hourly and are replaced well before they
// expire; client-go re-reads them at most once a minute
// (k8s.io/client-go/transport cachingTokenSource), and so does agentk.
const tokenRefreshInterval = time.Minute

// credential authenticates agentk's requests to the kube-apiserver.
type credential interface {
	// authorization returns the value of the Authorization header, or ""
	// for none (client certificates authenticate in TLS).
	authorization() (string, error)
	// refused tells the credential the apiserver answered 401 to a
	// request that carried it, so it should refresh if it can.
	refused()
}

// noCredential sends no Authorization header: a client certificate or an
// anonymous user.
type noCredential struct{}

func (noCredential) authorization() (string, error) { return "", nil }
func (noCredential) refused()                       {}

// staticToken is a bearer token given inline in a kubeconfig.
type staticToken string

func (t staticToken) authorization() (string, error) { return "Bearer " + string(t), nil }
func (staticToken) refused()                         {}

// String keeps the token out of logs and error messages.
func (staticToken) String() string { return "[redacted token]" }

// basicAuth is a kubeconfig user's username and password (RFC 7617).
type basicAuth struct{ username, password string }

func (b basicAuth) authorization() (string, error) {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(b.username+":"+b.password)), nil
}
func (basicAuth) refused() {}

// String keeps the password out of logs and error messages.
func (b basicAuth) String() string { return "basic auth for " + b.username }

// errEmptyToken is wrapped when a token file holds only whitespace.
var errEmptyToken = errors.New("token file is empty")

// readTokenFile returns the token in path with surrounding whitespace
// (a trailing newline, typically) removed.
func readTokenFile(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("reading token file: %w", err)
	}
	t := strings.TrimSpace(string(b))
	if t == "" {
		return "", fmt.Errorf("%w: %s", errEmptyToken, path)
	}
	return t, nil
}

// fileToken is a bearer token read from a file that may be rotated (a
// projected service account token, a kubeconfig tokenFile). The token is
// re-read at most once per interval, and at once after the apiserver
// refused it.
type fileToken struct {
	path     string
	interval time.Duration
	now      func() time.Time

	mu     sync.Mutex // guards token, readAt and stale
	token  string     // last token read successfully
	readAt time.Time  // when token was read
	stale  bool       // the apiserver refused token: re-read before next use
}

// newFileToken reads path once, so that a missing or empty file is an error
// at start rather than on the first request.
func newFileToken(path string, interval time.Duration, now func() time.Time) (*fileToken, error) {
	if now == nil {
		now = time.Now
	}
	if interval <= 0 {
		interval = tokenRefreshInterval
	}
	f := &fileToken{path: path, interval: interval, now: now}
	if _, err := f.get(); err != nil {
		return nil, err
	}
	return f, nil
}

// get returns the current token, re-reading the file when it is due.
func (f *fileToken) get() (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := f.now()
	if f.token != "" && !f.stale && now.Sub(f.readAt) < f.interval {
		return f.token, nil
	}
	t, err := readTokenFile(f.path)
	if err != nil {
		if f.token != "" {
			// Keep using the last good token, as client-go does: the
			// file may be in the middle of an atomic replacement, and
			// the old token is usually still valid. Try again on the
			// next request rather than after a whole interval.
			return f.token, nil
		}
		return "", err
	}
	f.token, f.readAt, f.stale = t, now, false
	return t, nil
}

func (f *fileToken) authorization() (string, error) {
	t, err := f.get()
	if err != nil {
		return "", err
	}
	return "Bearer " + t, nil
}

// String keeps the token out of logs and error messages.
func (f *fileToken) String() string { return "token from " + f.path }

func (f *fileToken) refused() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stale = true
}

// authTransport sets agentk's credential on every request to the apiserver,
// replacing whatever Authorization the request carried.
type authTransport struct {
	base http.RoundTripper
	cred credential
}

func (t *authTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	auth, err := t.cred.authorization()
	if err != nil {
		if req.Body != nil {
			req.Body.Close() // RoundTrip must close the body, even on errors
		}
		return nil, fmt.Errorf("agentk credential: %w", err)
	}
	// A RoundTripper must not modify its request (net/http's contract).
	out := req.Clone(req.Context())
	out.Header.Del("Authorization")
	if auth != "" {
		out.Header.Set("Authorization", auth)
	}
	resp, err := t.base.RoundTrip(out)
	if err == nil && resp.StatusCode == http.StatusUnauthorized {
		t.cred.refused()
	}
	return resp, err
}
