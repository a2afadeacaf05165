package kubeproxy

import (
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/tunnel"
)

// refusingAuth refuses every request with its error.
type refusingAuth struct{ err *Error }

func (a refusingAuth) Authenticate(*http.Request) (*Access, error) { return nil, a.err }

// TestProxyRefusalRetryAfter: a refusal that says when to come back is a
// Status with retryAfterSeconds and a Retry-After header, both in whole
// seconds rounded up, as the kube-apiserver sends its own 429s.
func TestProxyRefusalRetryAfter(t *testing.T) {
	tests := []struct {
		name        string
		err         *Error
		wantSeconds int // 0: no Retry-After
		wantReason  string
	}{
		{"429 with a wait", &Error{Code: http.StatusTooManyRequests, Message: "slow down", RetryAfter: 1500 * time.Millisecond}, 2, "TooManyRequests"},
		{"429 with a short wait", &Error{Code: http.StatusTooManyRequests, Message: "slow down", RetryAfter: time.Millisecond}, 1, "TooManyRequests"},
		{"401 without", &Error{Code: http.StatusUnauthorized, Message: "no"}, 0, "Unauthorized"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(&Proxy{Prefix: prefix, Auth: refusingAuth{tt.err}, Router: tunnel.NewRouter(tunnel.NewStore())})
			t.Cleanup(srv.Close)
			resp, err := srv.Client().Get(srv.URL + prefix + "api/v1/namespaces")
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != tt.err.Code {
				t.Errorf("status %d, want %d", resp.StatusCode, tt.err.Code)
			}
			wantHeader := ""
			if tt.wantSeconds > 0 {
				wantHeader = strconv.Itoa(tt.wantSeconds)
			}
			if got := resp.Header.Get("Retry-After"); got != wantHeader {
				t.Errorf("Retry-After %q, want %q", got, wantHeader)
			}
			st := decodeStatus(t, resp)
			if st["reason"] != tt.wantReason {
				t.Errorf("reason %v, want %s", st["reason"], tt.wantReason)
			}
			details, _ := st["details"].(map[string]any)
			switch {
			case tt.wantSeconds == 0 && details != nil:
				t.Errorf("details %v, want none", details)
			case tt.wantSeconds > 0 && (details == nil || details["retryAfterSeconds"] != float64(tt.wantSeconds)):
				t.Errorf("details %v, want retryAfterSeconds %d", details, tt.wantSeconds)
			}
		})
	}
}
