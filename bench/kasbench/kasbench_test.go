package kasbench

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestQuickRun runs every measurement of the harness on a tiny scale: it
// builds the real binaries, starts them, and checks that each table got
// numbers. It asserts nothing about speed. GitLab's agentk's rows are
// covered when its binary is at hand (see GitLabAgentkPath), and checked to
// be left out with a reason when it is not; so are the cross-node rows,
// which need redis-server, and GitLab's KAS's, which need GitLab's KAS and
// agentk and redis-server. The floor's rows are always there.
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
	cfg.GitLabAgentk = GitLabAgentkPath(root)
	cfg.GitLabKAS = GitLabKASPath(root)
	_, err = os.Stat(cfg.GitLabAgentk)
	withGitLab := err == nil
	// GitLab's KAS needs both of GitLab's binaries and redis-server;
	// under CI=true all must be there.
	_, errKAS := os.Stat(cfg.GitLabKAS)
	_, errRedis := exec.LookPath("redis-server")
	withKAS := (withGitLab && errKAS == nil && errRedis == nil) || os.Getenv("CI") == "true"
	if !withGitLab {
		t.Logf("GitLab's agentk is not at hand, its rows are left out: %v (set %s)", err, GitLabAgentkEnv)
	}
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
	const gitlabRow = "single node, GitLab agentk "
	var gitlabRows int
	for _, c := range rep.Small {
		if strings.HasPrefix(c.target, gitlabRow) {
			gitlabRows++
			if c.cpuPerOp <= 0 {
				t.Errorf("%s c=%d: no CPU per request", c.target, c.conc)
			}
		}
	}
	if want := 2 * len(cfg.Concurrency); withGitLab && gitlabRows != want {
		t.Errorf("%d 1 KiB rows of GitLab's agentk, want %d (%s)", gitlabRows, want, rep.GitLabAgentkNote)
	}
	for _, c := range rep.Bulk {
		if strings.HasPrefix(c.target, gitlabRow) {
			gitlabRows++
		}
	}
	for _, w := range rep.Watches {
		if strings.HasPrefix(w.target, gitlabRow) {
			gitlabRows++
		}
	}
	if want := 2*len(cfg.Concurrency) + 2*2*len(cfg.BulkConcurrency) + len(cfg.WatchStreams); withGitLab && gitlabRows != want {
		t.Errorf("%d rows of GitLab's agentk in all, want %d", gitlabRows, want)
	}
	if !withGitLab && (gitlabRows != 0 || rep.GitLabAgentkNote == "") {
		t.Errorf("without GitLab's agentk: %d rows of it, note %q", gitlabRows, rep.GitLabAgentkNote)
	}
	// The cross-node rows need Debian's redis-server; under CI=true it
	// must be there.
	_, err = exec.LookPath("redis-server")
	withRedis := err == nil || os.Getenv("CI") == "true"
	var crossRows int
	for _, c := range rep.Small {
		if strings.HasPrefix(c.target, crossNodeName+" ") {
			crossRows++
			if c.cpuPerOp <= 0 || c.holder.cpu < 0 || c.agent.cpu < 0 {
				t.Errorf("%s c=%d: CPU per request %v, node B %v, agentk %v", c.target, c.conc, c.cpuPerOp, c.holder.cpu, c.agent.cpu)
			}
		}
	}
	switch {
	case withRedis && crossRows != 2*len(cfg.Concurrency):
		t.Errorf("%d 1 KiB cross-node rows, want %d (%s)", crossRows, 2*len(cfg.Concurrency), rep.CrossNodeNote)
	case withRedis && !strings.Contains(rep.Tables(), "### Across nodes"):
		t.Errorf("no cross-node comparison:\n%s", rep.Tables())
	case !withRedis && (crossRows != 0 || rep.CrossNodeNote == ""):
		t.Errorf("without redis-server: %d cross-node rows, note %q", crossRows, rep.CrossNodeNote)
	}
	// rows counts the rows of name in every table; withCPU: each 1 KiB
	// row must have CPU per request (the floor's few requests of a quick
	// run may take less than a clock tick).
	rows := func(name string, withCPU bool) (n int) {
		for _, c := range append(append([]cell{}, rep.Small...), rep.Bulk...) {
			if strings.HasPrefix(c.target, name+" ") {
				n++
				if withCPU && c.cpuPerOp <= 0 && c.op == "" {
					t.Errorf("%s c=%d: no CPU per request", c.target, c.conc)
				}
			}
		}
		for _, w := range rep.Watches {
			if strings.HasPrefix(w.target, name+" ") {
				n++
			}
		}
		return n
	}
	allRows := 2*len(cfg.Concurrency) + 2*2*len(cfg.BulkConcurrency) + len(cfg.WatchStreams)
	if n := rows(floorName, false); n != allRows || rep.FloorNote != "" {
		t.Errorf("%d rows of Caddy's own reverse_proxy, want %d (%s)", n, allRows, rep.FloorNote)
	}
	for _, c := range rep.Small {
		if isFloor(c) && c.agent.cpu != 0 {
			t.Errorf("%s c=%d: agent CPU %v without an agent", c.target, c.conc, c.agent.cpu)
		}
	}
	tables := rep.Tables()
	switch n := rows(gitlabKASName, true); {
	case withKAS && (n != allRows || rep.GitLabKAS == ""):
		t.Errorf("%d rows of GitLab's KAS, want %d (%s)", n, allRows, rep.GitLabKASNote)
	case withKAS && !strings.Contains(tables, "### Against GitLab's KAS"):
		t.Errorf("no comparison with GitLab's KAS:\n%s", tables)
	case withKAS && rep.StandInAuthCalls == 0:
		t.Errorf("GitLab's KAS never checked the CI job token with the Rails stand-in")
	case !withKAS && (n != 0 || rep.GitLabKASNote == ""):
		t.Errorf("without GitLab's KAS: %d rows of it, note %q", n, rep.GitLabKASNote)
	}
	if !strings.Contains(tables, "### Cost over Caddy's own reverse_proxy") {
		t.Errorf("no cost over the floor:\n%s", tables)
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

// TestSmallRequestTargets: the small-request goals are judged from the
// single node's cells against the direct cells of the same run.
func TestSmallRequestTargets(t *testing.T) {
	ms := time.Millisecond
	watch := func(label string, p99 time.Duration) watchCell {
		return watchCell{target: label, watchResult: watchResult{streams: 100, p99: p99}}
	}
	tests := []struct {
		name    string
		small   []cell
		watches []watchCell
		want    []string // rows of the targets table, whole
	}{
		{
			name: "met",
			small: []cell{
				smallCell("direct h1", 16, 10000, 0, 0, 300*time.Microsecond),
				smallCell("single node h1", 16, 2500, 400*ms, 200*ms, 2*ms),
				smallCell("direct h1", 1, 20000, 0, 0, 20*time.Microsecond),
				smallCell("single node h1", 1, 2000, 800*ms, 400*ms, 400*time.Microsecond),
			},
			watches: []watchCell{watch("direct h2", 2*ms), watch("single node h2", 3*ms)},
			want: []string{
				"| small requests: CPU per request / req/s vs direct, c=16 (h1) | ≤ 200 µs / ≥ 0.20× | 160 µs / 0.25× | yes |",
				"| small requests: added p50 latency, c=1 (h1) | ≤ +0.40 ms | +0.38 ms | yes |",
				"| 100 watch streams: p99 delay vs direct | ≤ 2× direct's p99 | 3.00 ms against 2.00 ms (1.50×) | yes |",
			},
		},
		{
			name: "missed",
			small: []cell{
				smallCell("direct h2", 16, 10000, 0, 0, 300*time.Microsecond),
				smallCell("single node h2", 16, 1500, 450*ms, 200*ms, 2*ms),
				smallCell("direct h2", 1, 20000, 0, 0, 20*time.Microsecond),
				smallCell("single node h2", 1, 2000, 800*ms, 400*ms, 500*time.Microsecond),
			},
			watches: []watchCell{watch("direct h2", 2*ms), watch("single node h2", 5*ms)},
			want: []string{
				"| small requests: CPU per request / req/s vs direct, c=16 (h2) | ≤ 200 µs / ≥ 0.20× | 300 µs / 0.15× | no |",
				"| small requests: added p50 latency, c=1 (h2) | ≤ +0.40 ms | +0.48 ms | no |",
				"| 100 watch streams: p99 delay vs direct | ≤ 2× direct's p99 | 5.00 ms against 2.00 ms (2.50×) | no |",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := &Report{Small: tt.small, Watches: tt.watches}
			got := r.Targets()
			for _, row := range tt.want {
				if !strings.Contains(got, row+"\n") {
					t.Errorf("targets lack\n%s\nin\n%s", row, got)
				}
			}
		})
	}
}
