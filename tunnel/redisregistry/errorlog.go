package redisregistry

import (
	"sync"
	"time"

	"go.uber.org/zap"
)

// errorLog logs a repeating error at most once per interval, with the
// number of failures since the last log, and the recovery once.
type errorLog struct {
	log *zap.Logger
	// failedMsg and okMsg are the messages of a failure and of the
	// recovery.
	failedMsg, okMsg string
	interval         time.Duration

	mu      sync.Mutex // guards next, count and failing
	next    time.Time  // the earliest time of the next log
	count   int        // failures not yet logged
	failing bool
}

func newErrorLog(log *zap.Logger, failedMsg, okMsg string, interval time.Duration) *errorLog {
	return &errorLog{log: log, failedMsg: failedMsg, okMsg: okMsg, interval: interval}
}

func (l *errorLog) failed(err error) {
	now := time.Now()
	l.mu.Lock()
	l.count++
	l.failing = true
	if now.Before(l.next) {
		l.mu.Unlock()
		return
	}
	n := l.count
	l.count = 0
	l.next = now.Add(l.interval)
	l.mu.Unlock()
	l.log.Warn(l.failedMsg, zap.Int("count", n), zap.Duration("interval", l.interval), zap.Error(err))
}

func (l *errorLog) ok() {
	l.mu.Lock()
	was, n := l.failing, l.count
	l.failing, l.count = false, 0
	l.mu.Unlock()
	if was {
		l.log.Info(l.okMsg, zap.Int("failures_since_last_log", n))
	}
}
