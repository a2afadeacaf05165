package gitlab

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeClock is a settable time.
type fakeClock struct {
	mu  sync.Mutex // guards now
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func newTestCache[V any](ttl, errorTTL time.Duration) (*Cache[V], *fakeClock) {
	clock := &fakeClock{now: time.Unix(1_000_000, 0)}
	c := NewCache[V](ttl, errorTTL)
	c.now = clock.Now
	return c, clock
}

// waitForWaiters returns once n Gets wait for the call of key.
func waitForWaiters[V any](t *testing.T, c *Cache[V], key string, n int) {
	t.Helper()
	for {
		c.mu.Lock()
		call := c.calls[key]
		got := 0
		if call != nil {
			got = call.waiters
		}
		c.mu.Unlock()
		if got == n {
			return
		}
		runtime.Gosched()
	}
}

func TestCacheSingleflight(t *testing.T) {
	c, _ := newTestCache[int](time.Minute, time.Second)
	release := make(chan struct{})
	var calls atomic.Int32
	fetch := func(context.Context) (int, error) {
		calls.Add(1)
		<-release
		return 42, nil
	}
	const n = 50
	var wg sync.WaitGroup
	results := make([]int, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() { results[i], errs[i] = c.Get(context.Background(), "k", fetch) })
	}
	waitForWaiters(t, c, "k", n)
	close(release)
	wg.Wait()
	if got := calls.Load(); got != 1 {
		t.Errorf("%d backend calls for %d concurrent Gets, want 1", got, n)
	}
	for i := range n {
		if results[i] != 42 || errs[i] != nil {
			t.Fatalf("Get %d = %d, %v", i, results[i], errs[i])
		}
	}
	// And now it is cached.
	if v, err := c.Get(context.Background(), "k", fetch); v != 42 || err != nil || calls.Load() != 1 {
		t.Errorf("cached Get = %d, %v after %d calls", v, err, calls.Load())
	}
}

func TestCacheTTL(t *testing.T) {
	errBackend := errors.New("backend says no")
	tests := []struct {
		name    string
		err     error
		advance time.Duration
		refetch bool
	}{
		{"success within ttl", nil, time.Minute - time.Nanosecond, false},
		{"success at ttl", nil, time.Minute, true},
		{"error within error ttl", errBackend, 10*time.Second - time.Nanosecond, false},
		{"error at error ttl", errBackend, 10 * time.Second, true},
		{"canceled never cached", context.Canceled, 0, true},
		{"wrapped canceled never cached", fmt.Errorf("call: %w", context.Canceled), 0, true},
		{"rate limited never cached", fmt.Errorf("call: %w", &RateLimitError{Path: PathAgentInfo, Wait: time.Second}), 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, clock := newTestCache[string](time.Minute, 10*time.Second)
			calls := 0
			fetch := func(context.Context) (string, error) {
				calls++
				if tt.err != nil {
					return "", tt.err
				}
				return fmt.Sprint("v", calls), nil
			}
			v1, err1 := c.Get(context.Background(), "k", fetch)
			if !errors.Is(err1, tt.err) {
				t.Fatalf("first Get error %v, want %v", err1, tt.err)
			}
			clock.Advance(tt.advance)
			v2, err2 := c.Get(context.Background(), "k", fetch)
			if !errors.Is(err2, tt.err) {
				t.Fatalf("second Get error %v, want %v", err2, tt.err)
			}
			wantCalls := 1
			if tt.refetch {
				wantCalls = 2
			}
			if calls != wantCalls {
				t.Errorf("%d backend calls, want %d", calls, wantCalls)
			}
			if tt.err == nil && !tt.refetch && v2 != v1 {
				t.Errorf("cached value %q, want %q", v2, v1)
			}
		})
	}
}

func TestCacheZeroTTLs(t *testing.T) {
	c, _ := newTestCache[int](0, 0)
	calls := 0
	fetch := func(context.Context) (int, error) { calls++; return calls, errors.New("x") }
	c.Get(context.Background(), "k", fetch)
	c.Get(context.Background(), "k", fetch)
	if calls != 2 {
		t.Errorf("%d calls, want 2: nothing is cached with zero TTLs", calls)
	}
	var zero Cache[int]
	zero.Get(context.Background(), "k", fetch)
	zero.Get(context.Background(), "k", fetch)
	if calls != 4 {
		t.Errorf("%d calls, want 4: the zero Cache caches nothing", calls)
	}
	var nilCache *Cache[int]
	if v, _ := nilCache.Get(context.Background(), "k", fetch); v != 5 {
		t.Errorf("nil cache Get = %d, want a fresh call", v)
	}
}

func TestCacheWaiterCancel(t *testing.T) {
	c, _ := newTestCache[int](time.Minute, time.Second)
	release := make(chan struct{})
	var sawCancel atomic.Bool
	var calls atomic.Int32
	fetch := func(ctx context.Context) (int, error) {
		calls.Add(1)
		select {
		case <-release:
		case <-ctx.Done():
			sawCancel.Store(true)
			return 0, ctx.Err()
		}
		return 7, nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	firstDone := make(chan error, 1)
	go func() {
		_, err := c.Get(ctx, "k", fetch)
		firstDone <- err
	}()
	waitForWaiters(t, c, "k", 1)
	otherDone := make(chan int, 1)
	go func() {
		v, _ := c.Get(context.Background(), "k", fetch)
		otherDone <- v
	}()
	waitForWaiters(t, c, "k", 2)

	// The first waiter gives up: it gets its context's error, and the call
	// goes on for the other.
	cancel()
	if err := <-firstDone; !errors.Is(err, context.Canceled) {
		t.Errorf("canceled waiter got %v", err)
	}
	close(release)
	if v := <-otherDone; v != 7 {
		t.Errorf("other waiter got %d, want 7", v)
	}
	if sawCancel.Load() {
		t.Error("the shared call saw the first waiter's cancellation")
	}
	if v, err := c.Get(context.Background(), "k", fetch); v != 7 || err != nil || calls.Load() != 1 {
		t.Errorf("after: Get = %d, %v with %d calls; want the cached 7 from 1 call", v, err, calls.Load())
	}

	// A Get with a context already done makes no call.
	done, cancel2 := context.WithCancel(context.Background())
	cancel2()
	if _, err := c.Get(done, "other", fetch); !errors.Is(err, context.Canceled) || calls.Load() != 1 {
		t.Errorf("done context: %v, %d calls", err, calls.Load())
	}
}

func TestCacheCallTimeout(t *testing.T) {
	c, _ := newTestCache[int](time.Minute, time.Minute)
	c.callTimeout = time.Millisecond
	_, err := c.Get(context.Background(), "k", func(ctx context.Context) (int, error) {
		<-ctx.Done() // a backend that never answers
		return 0, ctx.Err()
	})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("error %v, want the call timeout", err)
	}
}

func TestCachePanic(t *testing.T) {
	c, _ := newTestCache[int](time.Minute, 0)
	_, err := c.Get(context.Background(), "k", func(context.Context) (int, error) { panic("boom") })
	if err == nil {
		t.Error("no error from a panicking fetch")
	}
}

func TestCacheBounded(t *testing.T) {
	c, clock := newTestCache[int](time.Minute, time.Minute)
	c.maxEntries = 100
	fetch := func(context.Context) (int, error) { return 1, nil }
	for i := range 1000 {
		c.Get(context.Background(), fmt.Sprint(i), fetch)
		if n := c.len(); n > c.maxEntries {
			t.Fatalf("%d entries, cap %d", n, c.maxEntries)
		}
	}
	// Expired entries are swept as new ones come.
	clock.Advance(2 * time.Minute)
	c.Get(context.Background(), "new", fetch)
	if n := c.len(); n != 1 {
		t.Errorf("%d entries after all others expired, want 1", n)
	}
}

func TestCacheKey(t *testing.T) {
	if CacheKey("a:b", "c") == CacheKey("a", "b:c") || CacheKey("ab", "") == CacheKey("a", "b") {
		t.Error("different parts give the same key")
	}
	if CacheKey("x", "secret") != CacheKey("x", "secret") {
		t.Error("key not deterministic")
	}
	if k := CacheKey("secret-token"); len(k) != 64 {
		t.Errorf("key %q is not a hex SHA-256", k)
	}
}
