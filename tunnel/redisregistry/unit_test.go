package redisregistry

import (
	"errors"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// TestErrorLogOncePerInterval: a repeating failure is logged once per
// interval with the number of failures, and the recovery once.
func TestErrorLogOncePerInterval(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		core, logs := observer.New(zapcore.InfoLevel)
		l := newErrorLog(zap.New(core), "failing", "works again", time.Minute)
		err := errors.New("connection refused")
		steps := []struct {
			name     string
			failures int
			wait     time.Duration
			recover  bool
			// wantMsg is the one message logged, if any, with wantKey
			// set to wantCount.
			wantMsg, wantKey string
			wantCount        int64
		}{
			{name: "the first failure is logged at once", failures: 1, wantMsg: "failing", wantKey: "count", wantCount: 1},
			{name: "more within the interval are only counted", failures: 5},
			{name: "after the interval the next is logged with the count", failures: 1, wait: time.Minute, wantMsg: "failing", wantKey: "count", wantCount: 6},
			{name: "the recovery is logged with the failures not logged", failures: 2, recover: true, wantMsg: "works again", wantKey: "failures_since_last_log", wantCount: 2},
			{name: "and only once", recover: true},
		}
		for _, s := range steps {
			time.Sleep(s.wait)
			for range s.failures {
				l.failed(err)
			}
			if s.recover {
				l.ok()
			}
			entries := logs.TakeAll()
			if s.wantMsg == "" {
				if len(entries) != 0 {
					t.Fatalf("%s: logged %+v, want nothing", s.name, entries)
				}
				continue
			}
			if len(entries) != 1 || entries[0].Message != s.wantMsg || entries[0].ContextMap()[s.wantKey] != s.wantCount {
				t.Fatalf("%s: logged %+v, want %q with %s %d", s.name, entries, s.wantMsg, s.wantKey, s.wantCount)
			}
		}
	})
}

// TestNewRefusesBadOptions: the options are checked before anything
// starts.
func TestNewRefusesBadOptions(t *testing.T) {
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer client.Close()
	urls := []string{"grpc://10.0.0.1:8155"}
	tests := []struct {
		name string
		opts Options
		want string
	}{
		{"no client", Options{OwnURLs: urls}, "client is required"},
		{"no own URL", Options{Client: client}, "own private API URLs are required"},
		{"an empty own URL", Options{Client: client, OwnURLs: []string{""}}, "is empty"},
		{"refresh not below the TTL", Options{Client: client, OwnURLs: urls, TTL: time.Minute, Refresh: time.Minute}, "less than the TTL"},
		{"refresh default above a short TTL", Options{Client: client, OwnURLs: urls, TTL: time.Minute}, "less than the TTL"},
		{"negative TTL", Options{Client: client, OwnURLs: urls, TTL: -time.Minute, Refresh: time.Second}, "less than the TTL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := New(tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("New: %v, %v; want an error saying %q", r, err, tt.want)
			}
		})
	}
}

// TestStoredValues: the stored forms read back as written, and a
// malformed value counts as expired.
func TestStoredValues(t *testing.T) {
	now := time.UnixMilli(1_700_000_000_000)
	tests := []struct {
		name   string
		value  string
		want   time.Time
		wantOK bool
	}{
		{"node entry", "1700000000000", now, true},
		{"tracker entry", `{"expires_at":1700000000000,"agent_id":7}`, now, true},
		{"not a number", "soon", time.Time{}, false},
		{"broken JSON", `{"expires_at":`, time.UnixMilli(0), false},
		{"JSON without expiry", `{"agent_id":7}`, time.UnixMilli(0), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := expiryOf(tt.value)
			if ok != tt.wantOK || (ok && !got.Equal(tt.want)) {
				t.Fatalf("expiryOf(%q) = %v, %v; want %v, %v", tt.value, got, ok, tt.want, tt.wantOK)
			}
		})
	}
}
