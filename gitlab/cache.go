package gitlab

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Cache limits and defaults.
const (
	// DefaultCacheMaxEntries caps the entries of a [Cache].
	DefaultCacheMaxEntries = 10000
	// defaultCallTimeout bounds one backend call made for a cache miss. It
	// is longer than the default HTTP client's timeout, so that timeout is
	// the one that normally fires.
	defaultCallTimeout = 30 * time.Second
)

// Cache remembers the answers of a slow backend, such as GitLab, for a
// while: successes for one TTL and errors for another, shorter one, so
// that a flood of requests with a bad credential does not become a flood
// of calls to GitLab (kas-spec §2.1). Concurrent misses for one key make a
// single backend call whose answer they all get.
//
// Keys are strings the caller derives; when a key stands for a secret, the
// caller hashes it (see [CacheKey]) so that the raw secret is not kept.
// A nil *Cache caches nothing and calls the backend every time; the zero
// Cache caches nothing either but still shares concurrent calls. Use
// [NewCache].
type Cache[V any] struct {
	ttl, errorTTL time.Duration
	maxEntries    int
	callTimeout   time.Duration
	now           func() time.Time

	mu        sync.Mutex // guards entries, calls and lastSweep
	entries   map[string]cacheEntry[V]
	calls     map[string]*cacheCall[V]
	lastSweep time.Time
}

type cacheEntry[V any] struct {
	value   V
	err     error
	expires time.Time
}

// cacheCall is a backend call in flight; done is closed once value and
// err are set.
type cacheCall[V any] struct {
	done    chan struct{}
	value   V
	err     error
	waiters int // Gets waiting for this call; guarded by Cache.mu
}

// NewCache returns a cache that keeps successes for ttl and errors for
// errorTTL. A TTL of zero or less keeps no such answers; concurrent misses
// still share one call.
func NewCache[V any](ttl, errorTTL time.Duration) *Cache[V] {
	return &Cache[V]{
		ttl:         ttl,
		errorTTL:    errorTTL,
		maxEntries:  DefaultCacheMaxEntries,
		callTimeout: defaultCallTimeout,
		now:         time.Now,
		entries:     map[string]cacheEntry[V]{},
		calls:       map[string]*cacheCall[V]{},
	}
}

// CacheKey derives a cache key from parts, some of which may be secrets:
// the hex SHA-256 of the parts, each prefixed with its length so that
// different splits of the same bytes give different keys.
func CacheKey(parts ...string) string {
	h := sha256.New()
	var n [8]byte
	for _, p := range parts {
		binary.BigEndian.PutUint64(n[:], uint64(len(p)))
		h.Write(n[:])
		h.Write([]byte(p))
	}
	return hex.EncodeToString(h.Sum(nil))
}

// Get returns the cached answer for key, or calls fetch for it. fetch runs
// with a context of its own, detached from ctx's cancellation but bounded
// by a timeout, because other callers may be waiting for the same call:
// when ctx ends, Get returns ctx's error at once and the call carries on
// for the others (and the cache). Errors that say a context was canceled
// or that the call was not made for the rate limit ([ErrRateLimited]) are
// never cached, as they are not the backend's answer.
func (c *Cache[V]) Get(ctx context.Context, key string, fetch func(context.Context) (V, error)) (V, error) {
	if c == nil {
		return fetch(ctx)
	}
	if err := ctx.Err(); err != nil {
		var zero V
		return zero, err
	}
	c.mu.Lock()
	if e, ok := c.entries[key]; ok {
		if c.clock().Before(e.expires) {
			c.mu.Unlock()
			return e.value, e.err
		}
		delete(c.entries, key)
	}
	call, ok := c.calls[key]
	if !ok {
		call = &cacheCall[V]{done: make(chan struct{})}
		if c.calls == nil {
			c.calls = map[string]*cacheCall[V]{}
		}
		c.calls[key] = call
		// The cache owns this goroutine; it ends when fetch returns, which
		// callTimeout bounds for a fetch that honours its context.
		go c.run(context.WithoutCancel(ctx), key, call, fetch)
	}
	call.waiters++
	c.mu.Unlock()

	select {
	case <-call.done:
		return call.value, call.err
	case <-ctx.Done():
		c.mu.Lock()
		call.waiters--
		c.mu.Unlock()
		var zero V
		return zero, ctx.Err()
	}
}

// run makes the backend call for key and stores its answer.
func (c *Cache[V]) run(ctx context.Context, key string, call *cacheCall[V], fetch func(context.Context) (V, error)) {
	timeout := c.callTimeout
	if timeout <= 0 {
		timeout = defaultCallTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	defer func() {
		if p := recover(); p != nil {
			// A panicking backend must not leave waiters hanging forever.
			var zero V
			call.value, call.err = zero, fmt.Errorf("cache backend call panicked: %v", p)
		}
		c.finish(key, call)
	}()
	call.value, call.err = fetch(ctx)
}

// finish stores call's answer under key, if it may be cached, and wakes
// its waiters.
func (c *Cache[V]) finish(key string, call *cacheCall[V]) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.calls, key)
	close(call.done)
	ttl := c.ttl
	if call.err != nil {
		ttl = c.errorTTL
		if errors.Is(call.err, context.Canceled) || errors.Is(call.err, ErrRateLimited) {
			// Not the backend's answer: the call was cut short, or not
			// made at all because the rate limit was reached (the next
			// Get should ask once the limit allows).
			ttl = 0
		}
	}
	if ttl <= 0 {
		return
	}
	now := c.clock()
	if c.entries == nil {
		c.entries = map[string]cacheEntry[V]{}
	}
	c.makeRoom(now)
	c.entries[key] = cacheEntry[V]{value: call.value, err: call.err, expires: now.Add(ttl)}
}

// makeRoom drops expired entries now and then, and arbitrary ones when the
// cache is full of live entries. c.mu must be held.
func (c *Cache[V]) makeRoom(now time.Time) {
	limit := c.maxEntries
	if limit <= 0 {
		limit = DefaultCacheMaxEntries
	}
	full := len(c.entries) >= limit
	sweepEvery := max(c.ttl, c.errorTTL)
	if !full && now.Sub(c.lastSweep) < sweepEvery {
		return
	}
	c.lastSweep = now
	for k, e := range c.entries {
		if !now.Before(e.expires) {
			delete(c.entries, k)
		}
	}
	// Still full of live entries: drop a tenth of them. Map iteration
	// order is unspecified, so which ones is arbitrary; they are fetched
	// again when next needed.
	if len(c.entries) >= limit {
		drop := max(limit/10, 1)
		for k := range c.entries {
			if drop == 0 {
				break
			}
			delete(c.entries, k)
			drop--
		}
	}
}

// clock returns the time of the cache's clock.
func (c *Cache[V]) clock() time.Time {
	if c.now == nil {
		return time.Now()
	}
	return c.now()
}

// len returns the number of entries, live or expired, for tests.
func (c *Cache[V]) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}
