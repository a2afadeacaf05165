package configwatch

import (
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// TestEventLogBoundsOutageLines: a thousand agents failing at once make
// eventBurst lines, the first ones, and one line with the count of the
// others when the next window starts.
func TestEventLogBoundsOutageLines(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		core, logs := observer.New(zapcore.InfoLevel)
		base := zap.New(core)
		var l eventLog
		emitted := 0
		for range 1000 {
			l.note(base, eventFailed, func() { emitted++ })
		}
		if emitted != eventBurst || logs.Len() != 0 {
			t.Fatalf("%d lines emitted, %d other lines; want %d and none", emitted, logs.Len(), eventBurst)
		}
		time.Sleep(eventWindow)
		l.note(base, eventRecovered, func() { emitted++ })
		more := logs.FilterMessage("more agent configuration poll events").All()
		if emitted != eventBurst+1 || len(more) != 1 || more[0].ContextMap()["count"] != int64(1000-eventBurst) || more[0].ContextMap()["kind"] != eventFailed {
			t.Errorf("after the window: %d emitted, lines %v", emitted, logs.All())
		}
	})
}
