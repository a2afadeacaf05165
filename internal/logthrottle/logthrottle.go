// Package logthrottle keeps a refusal or failure that can repeat from
// flooding the log: the first of a kind is logged at once, and then at most
// one line per interval, which says how many were left out since the last.
package logthrottle

import (
	"sync"
	"time"
)

// DefaultInterval is the interval of a zero Limiter.
const DefaultInterval = time.Minute

// maxKeys bounds the kinds a Limiter remembers, so that keys made from
// what clients send cannot grow it without limit. When it is reached, the
// windows whose interval has passed are forgotten; if none has, a new kind
// is not remembered, and each of its events is logged, as a first one.
const maxKeys = 1024

// Limiter decides which events of each kind (key) to log. The zero value
// is ready to use. It is safe for concurrent use.
type Limiter struct {
	// Interval is the least time between two lines of one kind; zero
	// means DefaultInterval.
	Interval time.Duration

	mu   sync.Mutex // guards keys
	keys map[string]*window
}

type window struct {
	last    time.Time // of the last line logged
	skipped int       // events since, not logged
}

// Allow reports whether to log an event of kind key now, and how many
// events of that kind were left out since the last line, for the line to
// say.
func (l *Limiter) Allow(key string) (ok bool, skipped int) {
	interval := l.Interval
	if interval <= 0 {
		interval = DefaultInterval
	}
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.keys == nil {
		l.keys = make(map[string]*window)
	}
	w := l.keys[key]
	if w == nil {
		if len(l.keys) >= maxKeys {
			for k, old := range l.keys {
				if now.Sub(old.last) >= interval {
					delete(l.keys, k)
				}
			}
		}
		w = &window{}
		if len(l.keys) < maxKeys {
			l.keys[key] = w
		}
	}
	if !w.last.IsZero() && now.Sub(w.last) < interval {
		w.skipped++
		return false, 0
	}
	skipped = w.skipped
	w.last, w.skipped = now, 0
	return true, skipped
}
