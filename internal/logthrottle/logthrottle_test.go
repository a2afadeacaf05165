package logthrottle

import (
	"fmt"
	"testing"
	"testing/synctest"
	"time"
)

func TestLimiter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var l Limiter
		if ok, skipped := l.Allow("unknown token"); !ok || skipped != 0 {
			t.Fatalf("first event: %v, %d; want it logged", ok, skipped)
		}
		for range 199 {
			if ok, _ := l.Allow("unknown token"); ok {
				t.Fatal("a repeat within the interval was logged")
			}
		}
		if ok, _ := l.Allow("rate limited"); !ok {
			t.Fatal("the first event of another kind was not logged")
		}
		time.Sleep(DefaultInterval)
		if ok, skipped := l.Allow("unknown token"); !ok || skipped != 199 {
			t.Errorf("after the interval: %v, %d; want it logged with 199 left out", ok, skipped)
		}
	})
}

func TestLimiterBoundsKeys(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var l Limiter
		for i := range 3 * maxKeys {
			if ok, _ := l.Allow(fmt.Sprint(i)); !ok {
				t.Fatalf("the first event of kind %d was not logged", i)
			}
		}
		if n := len(l.keys); n > maxKeys {
			t.Errorf("%d kinds remembered, want at most %d", n, maxKeys)
		}
	})
}
