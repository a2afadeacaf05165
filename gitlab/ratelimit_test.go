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
