package integration

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/caddy-kas/caddy-kas/integration/internal/kubetest"
)

// startOwnedProcess starts spec for the test t and makes t its owner: at the
// end of the test the process is stopped, its output is checked for data race
// reports and leaked tokens, and on failure the tail of its output is logged.
func startOwnedProcess(t testing.TB, spec kubetest.ProcessSpec) *kubetest.Process {
	t.Helper()
	p, err := kubetest.StartProcess(spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if p.Stop(kubetest.StopGrace) {
			t.Logf("%s did not exit within %s of SIGTERM and was killed", p.Name, kubetest.StopGrace)
		}
		checkProcessOutput(t, p)
		if t.Failed() {
			logTail(t, p)
		}
	})
	return p
}

// checkProcessOutput fails t when the process printed a data race report
// (the product binaries are built with -race when the tests are) or one of
// the tokens the tests made.
func checkProcessOutput(t testing.TB, p *kubetest.Process) {
	t.Helper()
	output := p.Stdout() + p.Stderr()
	for _, report := range raceReports(output) {
		if !strings.Contains(report, ourModule) {
			// Caddy v2.11.9 races between caddytls.(*TLS).Start and
			// certmagic's background jobs on certificates already in
			// storage; no frame of ours is in it, and there is no Caddy
			// release without it to move to.
			t.Logf("%s reported a data race inside Caddy, with no frame of ours; not ours to fix:\n%s", p.Name, report)
			continue
		}
		t.Errorf("%s reported a data race (see its stderr below):\n%s", p.Name, report)
	}
	if label, found := kubetest.LeakedSecret(output); found {
		t.Errorf("the output of %s contains %s", p.Name, label)
	}
}

// ourModule prefixes the frames of our code in a race report.
const ourModule = "github.com/caddy-kas/caddy-kas/"

// raceReports splits the race detector's reports out of a process's
// output.
func raceReports(output string) []string {
	const start, end = "WARNING: DATA RACE", "=================="
	var out []string
	for {
		i := strings.Index(output, start)
		if i < 0 {
			return out
		}
		output = output[i:]
		j := strings.Index(output, end)
		if j < 0 {
			return append(out, output)
		}
		out = append(out, output[:j])
		output = output[j:]
	}
}

// noisyLoggers are Caddy loggers whose debug lines (certificate handling,
// TLS handshakes, events) would crowd everything else out of a log tail.
var noisyLoggers = []string{"events", "tls", "pki", "http.auto_https"}

func logTail(t testing.TB, p *kubetest.Process) {
	t.Helper()
	for _, stream := range []struct{ name, text string }{{"stdout", p.Stdout()}, {"stderr", p.Stderr()}} {
		text := strings.TrimSpace(withoutNoisyLines(stream.text))
		if text == "" {
			continue
		}
		t.Logf("--- last %d lines of %s %s (without TLS and event lines) ---\n%s",
			kubetest.TailLineCount, p.Name, stream.name, kubetest.Redact(kubetest.LastLines(text, kubetest.TailLineCount)))
	}
}

// withoutNoisyLines drops the JSON log lines of noisyLoggers from log.
func withoutNoisyLines(log string) string {
	var b strings.Builder
	for line := range strings.Lines(log) {
		var entry struct {
			Logger string `json:"logger"`
		}
		if json.Unmarshal([]byte(line), &entry) == nil && isNoisyLogger(entry.Logger) {
			continue
		}
		b.WriteString(line)
	}
	return b.String()
}

func isNoisyLogger(name string) bool {
	for _, noisy := range noisyLoggers {
		if name == noisy || strings.HasPrefix(name, noisy+".") {
			return true
		}
	}
	return false
}

func mustFreeLoopbackPorts(t testing.TB, n int) []int {
	t.Helper()
	ports, err := kubetest.FreeLoopbackPorts(n)
	if err != nil {
		t.Fatal(err)
	}
	return ports
}

// TestRaceReports: a race with a frame of ours fails a test; one wholly
// inside Caddy is told apart.
func TestRaceReports(t *testing.T) {
	output := "log line\n==================\nWARNING: DATA RACE\nRead at 0x1 by goroutine 7:\n  github.com/caddyserver/certmagic.(*jobManager).worker()\n" +
		"Previous write at 0x1 by main goroutine:\n  github.com/caddyserver/caddy/v2/modules/caddytls.(*TLS).Start()\n==================\n" +
		"more\n==================\nWARNING: DATA RACE\nWrite at 0x2 by goroutine 9:\n  github.com/caddy-kas/caddy-kas/tunnel.(*Store).Add()\n==================\n"
	reports := raceReports(output)
	if len(reports) != 2 || strings.Contains(reports[0], ourModule) || !strings.Contains(reports[1], ourModule) {
		t.Errorf("reports %q", reports)
	}
	if len(raceReports("no race here")) != 0 {
		t.Error("a report in output without one")
	}
}
