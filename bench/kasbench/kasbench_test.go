package kasbench

import (
	"context"
	"path/filepath"
	"runtime"
	"testing"
	"time"
)

// TestQuickRun runs every measurement of the harness on a tiny scale: it
// builds the real binaries, starts them, and checks that each table got
// numbers. It asserts nothing about speed.
func TestQuickRun(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and starts caddy and agentk")
	}
	if runtime.GOOS != "linux" {
		t.Skip("reads /proc")
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	cfg := QuickConfig()
	cfg.Root = root
	cfg.Log = testWriter{t}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	rep, err := Run(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := rep.Sane(); err != nil {
		t.Fatal(err)
	}
	if len(rep.Small) == 0 || len(rep.Bulk) == 0 || len(rep.Watches) == 0 || rep.Stalled == nil || len(rep.Scale) == 0 {
		t.Fatalf("a measurement is missing:\n%s", rep.Tables())
	}
	for _, c := range rep.Small {
		if c.res.perSecond() <= 0 || c.res.quantile(0.5) <= 0 {
			t.Errorf("%s c=%d: no rate or latency", c.target, c.conc)
		}
	}
	for _, c := range rep.Bulk {
		if c.res.mibPerSecond() <= 0 {
			t.Errorf("%s %s c=%d: no throughput", c.op, c.target, c.conc)
		}
	}
	if s := rep.Scale[0]; s.connected != s.agents || s.caddy.rss <= 0 {
		t.Errorf("scale: %d of %d agents, RSS %d", s.connected, s.agents, s.caddy.rss)
	}
	md := rep.Markdown("go test")
	if len(md) < 500 {
		t.Errorf("report too short:\n%s", md)
	}
	t.Log("\n" + md)
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}
