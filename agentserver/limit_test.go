package agentserver

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
)

// rateLimitedAuth checks no token: its backend's rate limit is reached.
type rateLimitedAuth struct{ wait time.Duration }

func (a rateLimitedAuth) AuthenticateAgent(context.Context, string) (Agent, error) {
	return Agent{}, &RateLimitedError{RetryAfter: a.wait, Err: errors.New("backend rate limit reached")}
}

// handshake sends our agentk's handshake with token to e and returns the
// answer.
func (e *env) handshake(t *testing.T, token string) *http.Response {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http"+strings.TrimPrefix(endpointURL, "ws"), nil)
	req.Header = wsHeader(h2tunnel.Subprotocol, token)
	resp, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp
}

// TestEndpointAuthenticationRateLimited: a token that could not be checked
// for a rate limit is answered 429 with Retry-After (our agentk), or
// Unavailable (GitLab's agentk), and counted under its own reason.
func TestEndpointAuthenticationRateLimited(t *testing.T) {
	t.Run("our agentk", func(t *testing.T) {
		e := newEnv(t, rateLimitedAuth{wait: 1500 * time.Millisecond})
		resp := e.handshake(t, goodToken)
		if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") != "2" {
			t.Errorf("answer %d with Retry-After %q, want 429 with 2", resp.StatusCode, resp.Header.Get("Retry-After"))
		}
		refusals := e.logged("agent refused")
		if len(refusals) != 1 || refusals[0].ContextMap()["reason"] != "authentication rate limited" {
			t.Errorf("refusal log %v, want one with reason %q", refusals, "authentication rate limited")
		}
	})
	t.Run("GitLab's agentk", func(t *testing.T) {
		core, logs := observer.New(zapcore.DebugLevel)
		srv := grpctunnel.NewServer(nil)
		store := tunnel.NewStore()
		client := servePipe(t, &Endpoint{Auth: rateLimitedAuth{wait: time.Second}, Store: store, GRPC: srv, Logger: zap.New(core)})
		t.Cleanup(func() {
			store.Close()
			srv.Close()
		})
		cc := dialGRPC(t, client)
		if err := register(cc, goodToken); status.Code(err) != codes.Unavailable {
			t.Fatalf("Register = %v, want Unavailable", err)
		}
		if n := logs.FilterMessage("agent refused").FilterField(zap.String("reason", "authentication rate limited")).Len(); n != 1 {
			t.Errorf("%d refusals logged as rate limited, want 1", n)
		}
	})
}
