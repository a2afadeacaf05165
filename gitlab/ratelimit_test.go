package gitlab

import (
	"context"
	"errors"
	"math"
	"net/http"
	"reflect"
	"testing"
	"testing/synctest"
	"time"

	"github.com/caddy-kas/caddy-kas/agentserver"
	"github.com/caddy-kas/caddy-kas/kubeproxy"
)

func TestRateLimiter(t *testing.T) {
	// step sleeps, then takes tokens until one is refused or takes are
	// done.
	type step struct {
		sleep    time.Duration
		takes    int
		wantOK   int           // how many of the takes get a token
		wantWait time.Duration // the wait of the first refused take; 0 if none is refused
	}
	tests := []struct {
		name  string
		rate  float64
		size  int
		steps []step
	}{
		{"GitLab's defaults: a full bucket, then 50 a second", DefaultAPIRefillRatePerSecond, DefaultAPIBucketSize, []step{
			{takes: 300, wantOK: 250, wantWait: 20 * time.Millisecond},
			{sleep: 10 * time.Millisecond, takes: 1, wantWait: 10 * time.Millisecond},
			{sleep: 10 * time.Millisecond, takes: 2, wantOK: 1, wantWait: 20 * time.Millisecond},
			{sleep: time.Second, takes: 100, wantOK: 50, wantWait: 20 * time.Millisecond},
		}},
		{"refill stops at the bucket size", 10, 5, []step{
			{takes: 5, wantOK: 5},
			{sleep: time.Hour, takes: 10, wantOK: 5, wantWait: 100 * time.Millisecond},
		}},
		{"a slow refill", 0.5, 1, []step{
			{takes: 2, wantOK: 1, wantWait: 2 * time.Second},
			{sleep: 1500 * time.Millisecond, takes: 1, wantWait: 500 * time.Millisecond},
			{sleep: 500 * time.Millisecond, takes: 1, wantOK: 1},
		}},
		{"refused takes cost nothing", 1, 1, []step{
			{takes: 1, wantOK: 1},
			{takes: 1000, wantWait: time.Second},
			{sleep: time.Second, takes: 1, wantOK: 1},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				l, err := NewRateLimiter(tt.rate, tt.size)
				if err != nil {
					t.Fatal(err)
				}
				for i, s := range tt.steps {
					time.Sleep(s.sleep)
					ok, refused, wait := 0, false, time.Duration(0)
					for range s.takes {
						took, w := l.Take()
						switch {
						case took && refused:
							t.Fatalf("step %d: a take succeeded after one was refused, with no time passing", i)
						case took:
							ok++
						case !refused:
							refused, wait = true, w
						}
					}
					if ok != s.wantOK || wait != s.wantWait {
						t.Errorf("step %d: %d takes succeeded, first refusal waits %v; want %d and %v", i, ok, wait, s.wantOK, s.wantWait)
					}
				}
			})
		})
	}
}

func TestNewRateLimiterRejects(t *testing.T) {
	tests := []struct {
		rate float64
		size int
	}{{0, 1}, {-1, 1}, {math.NaN(), 1}, {math.Inf(1), 1}, {1, 0}, {1, -5}}
	for _, tt := range tests {
		if _, err := NewRateLimiter(tt.rate, tt.size); err == nil {
			t.Errorf("NewRateLimiter(%v, %d) accepted", tt.rate, tt.size)
		}
	}
}

func TestNilRateLimiter(t *testing.T) {
	var l *RateLimiter
	for range 3 {
		if ok, _ := l.Take(); !ok {
			t.Fatal("a nil limiter refused")
		}
	}
}

func TestClientRateLimit(t *testing.T) {
	f := newFakeGitLab(t, "")
	f.handle(PathAgentInfo, jsonAnswer(http.StatusUnauthorized, `{"message":"401 Unauthorized"}`))
	c := f.client()
	rec := &callRecorder{}
	c.Observer = rec
	var err error
	// A token in about three hours: none comes back during the test.
	if c.Limiter, err = NewRateLimiter(1e-4, 2); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := c.AgentInfo(context.Background(), "agent-token"); statusCode(err) != http.StatusUnauthorized {
			t.Fatalf("call within the limit: %v, want GitLab's 401", err)
		}
	}
	_, err = c.AgentInfo(context.Background(), "agent-token")
	var rl *RateLimitError
	if !errors.Is(err, ErrRateLimited) || !errors.As(err, &rl) {
		t.Fatalf("call over the limit: %v, want a RateLimitError", err)
	}
	if rl.Path != PathAgentInfo || rl.Wait <= time.Hour {
		t.Errorf("RateLimitError %+v, want path %s and a wait of hours", rl, PathAgentInfo)
	}
	if err := c.SendUsageMetrics(context.Background(), &UsageMetrics{}); !errors.Is(err, ErrRateLimited) {
		t.Errorf("usage metrics over the limit: %v, want ErrRateLimited", err)
	}
	if n := f.callCount(PathAgentInfo); n != 2 {
		t.Errorf("GitLab got %d agent_info calls, want 2", n)
	}
	want := []recordedCall{{PathAgentInfo, 401}, {PathAgentInfo, 401}, {PathAgentInfo, -1}, {PathUsageMetrics, -1}}
	if !reflect.DeepEqual(rec.calls, want) {
		t.Errorf("observed %v, want %v", rec.calls, want)
	}
}

// TestAuthenticatorsRateLimited: a check the rate limit had no room for
// is refused with a wait, not as the credential's answer, and is not
// cached: once the limit allows, GitLab is asked.
func TestAuthenticatorsRateLimited(t *testing.T) {
	tests := []struct {
		name   string
		header http.Header // a proxy request's; nil: an agent token
		path   string
	}{
		{"personal access token", http.Header{"Authorization": {"Bearer pat:1:tok"}}, PathAuthorizeProxyUser},
		{"session cookie", http.Header{"Cookie": {"_gitlab_kas=tok"}, "Gitlab-Agent-Id": {"1"}, "X-Csrf-Token": {"c"}}, PathAuthorizeProxyUser},
		{"ci job token", http.Header{"Authorization": {"Bearer ci:5:job"}}, PathAllowedAgents},
		{"agent token", nil, PathAgentInfo},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeGitLab(t, "")
			f.handle(tt.path, jsonAnswer(http.StatusUnauthorized, `{"message":"401 Unauthorized"}`))
			c := f.client()
			var err error
			if c.Limiter, err = NewRateLimiter(1e-4, 1); err != nil {
				t.Fatal(err)
			}
			c.Limiter.Take() // the only token
			proxy := NewProxyAuthenticator(c, nil, nil)
			agents := NewAgentAuthenticator(c, 0, 0)
			check := func() error {
				if tt.header == nil {
					_, err := agents.AuthenticateAgent(context.Background(), "agent-token")
					return err
				}
				_, err := proxy.Authenticate(newRequest("/api", tt.header.Clone()))
				return err
			}
			for range 2 {
				err := check()
				if tt.header == nil {
					var limited *agentserver.RateLimitedError
					if !errors.As(err, &limited) || limited.RetryAfter < time.Hour || !errors.Is(err, ErrRateLimited) || errors.Is(err, agentserver.ErrUnknownToken) {
						t.Fatalf("error %v, want a RateLimitedError with a wait of hours", err)
					}
					continue
				}
				var e *kubeproxy.Error
				if !errors.As(err, &e) || e.Code != http.StatusTooManyRequests || e.RetryAfter < time.Hour || e.Message != msgRateLimited {
					t.Fatalf("error %#v, want 429 with a wait of hours", err)
				}
			}
			if n := f.callCount(tt.path); n != 0 {
				t.Fatalf("GitLab got %d calls past the rate limit", n)
			}
			c.Limiter = nil // the limit lifts; the refusal must not be cached
			err = check()
			if tt.header == nil {
				if !errors.Is(err, agentserver.ErrUnknownToken) {
					t.Errorf("once the limit allows: %v, want GitLab's 401 as an unknown token", err)
				}
			} else if e := (*kubeproxy.Error)(nil); !errors.As(err, &e) || e.Code != http.StatusUnauthorized {
				t.Errorf("once the limit allows: %v, want GitLab's 401", err)
			}
			if n := f.callCount(tt.path); n != 1 {
				t.Errorf("GitLab got %d calls once the limit allowed, want 1", n)
			}
		})
	}
}
