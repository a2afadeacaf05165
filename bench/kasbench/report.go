package kasbench

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"time"
)

// cell is one measured row of the request tables.
type cell struct {
	target string
	op     string // "GET" or "PUT" in the bulk table
	conc   int
	res    loadResult
	// cpu is the CPU of Caddy, of node B (the node holding the agent's
	// tunnel) in a cross-node cell, and of the agent (ours or GitLab's)
	// during the cell: the sum of the cpu of server, holder and agent.
	cpu      time.Duration
	cpuPerOp time.Duration
	// server, holder and agent are the counters of the Caddy the client
	// sent to, of the node holding the tunnel (cross-node cells only) and
	// of the agent during the measured part of the cell.
	server, holder, agent procCounters
}

type watchCell struct {
	target string
	watchResult
	cpu time.Duration
}

type stalledResult struct {
	holds, inFlight int
	alone, stalled  loadResult
	broken, failed  int64
	stallErr        error
}

type scaleStep struct {
	agents, connected, failed int
	connectTime               time.Duration
	caddy                     memory
	goStats
	window           time.Duration
	caddyCPU, simCPU time.Duration
	simRSS           int64
}

// Report is what a run measured.
type Report struct {
	Config            Config
	Started, Finished time.Time
	Machine           Machine
	FileLimit         uint64

	CaddyBinary, AgentkBinary int64
	CaddyIdle, AgentkIdle     memory
	CaddyEnd, AgentkEnd       memory

	// GitLabAgentk is the version of GitLab's agentk measured next to
	// ours, empty if it was not; GitLabAgentkNote then says why.
	GitLabAgentk, GitLabAgentkNote    string
	GitLabAgentkBinary                int64
	GitLabAgentkIdle, GitLabAgentkEnd memory

	// Redis is the version of redis-server the cross-node rows ran with,
	// empty if they were left out; CrossNodeNote then says why.
	Redis, CrossNodeNote string

	// FloorNote says why the rows of Caddy's own reverse_proxy were left
	// out; empty when they were measured.
	FloorNote string
	// GitLabKAS, GitLabKASAgentk and GitLabKASRedis are the versions of
	// GitLab's KAS, GitLab's agentk and redis-server that the rows of
	// GitLab's KAS ran with, GitLabKAS empty if they were left out;
	// GitLabKASNote then says why.
	GitLabKAS, GitLabKASAgentk, GitLabKASRedis, GitLabKASNote string
	// StandInViolations are the calls of GitLab's KAS that broke the
	// contract of the Rails stand-in: a sign that the stand-in is wrong.
	StandInViolations []string
	// StandInAuthCalls counts the CI job token checks (allowed_agents)
	// GitLab's KAS asked the Rails stand-in for: it caches their answers.
	StandInAuthCalls int

	Small, Bulk []cell
	Watches     []watchCell
	Stalled     *stalledResult
	// StalledBaseline is Stalled for the baseline binaries, if any.
	StalledBaseline *stalledResult

	ScaleBase scaleStep
	Scale     []scaleStep
	ScaleLost int
}

// Machine describes where the run happened.
type Machine struct {
	CPU, Kernel, GoVersion, LoadAvg string
	Cores                           int
}

func describeMachine() Machine {
	m := Machine{Cores: runtime.NumCPU(), GoVersion: runtime.Version()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if out, err := exec.Command("uname", "-srm").Output(); err == nil {
		m.Kernel = strings.TrimSpace(string(out))
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		f := strings.Fields(string(b))
		if len(f) >= 3 {
			m.LoadAvg = strings.Join(f[:3], " ")
		}
	}
	return m
}

// Sane reports an error if a measurement came out empty: a request table
// with no requests, lost watch lines, agents that did not connect. It
// makes no claim about speed.
func (r *Report) Sane() error {
	var problems []string
	for _, c := range append(append([]cell{}, r.Small...), r.Bulk...) {
		if c.res.requests == 0 && c.res.bytes == 0 {
			problems = append(problems, fmt.Sprintf("%s %s c=%d: no requests (%v)", c.target, c.op, c.conc, c.res.firstErr))
		}
		if c.res.errors > 0 {
			problems = append(problems, fmt.Sprintf("%s %s c=%d: %d errors, first: %v", c.target, c.op, c.conc, c.res.errors, c.res.firstErr))
		}
	}
	for _, w := range r.Watches {
		if w.got != w.expected || w.errors > 0 {
			problems = append(problems, fmt.Sprintf("%s %d watches: %d of %d lines, %d errors, first: %v", w.target, w.streams, w.got, w.expected, w.errors, w.firstErr))
		}
	}
	if s := r.Stalled; s != nil && (s.alone.requests == 0 || s.stalled.requests == 0 || s.broken > 0 || s.failed > 0) {
		problems = append(problems, fmt.Sprintf("stalled reader: %d/%d requests, %d broken and %d failed streams", s.alone.requests, s.stalled.requests, s.broken, s.failed))
	}
	for _, s := range r.Scale {
		if s.connected != s.agents {
			problems = append(problems, fmt.Sprintf("scale: %d of %d agents connected", s.connected, s.agents))
		}
	}
	if n := len(r.StandInViolations); n > 0 {
		problems = append(problems, fmt.Sprintf("the Rails stand-in saw %d contract violations by GitLab's KAS, first: %s", n, r.StandInViolations[0]))
	}
	if r.CaddyIdle.rss == 0 || r.AgentkIdle.rss == 0 || (r.GitLabAgentk != "" && r.GitLabAgentkIdle.rss == 0) {
		problems = append(problems, "no idle memory")
	}
	if len(problems) > 0 {
		return fmt.Errorf("kasbench: %s", strings.Join(problems, "; "))
	}
	return nil
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f", float64(d)/float64(time.Millisecond)) }

func mib(b int64) string { return fmt.Sprintf("%.1f", float64(b)/(1<<20)) }

func ratio(a, b float64) string {
	if b == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f×", a/b)
}

// directOf finds the direct cell that a proxied cell is compared with.
func directOf(cells []cell, c cell) (cell, bool) {
	want := "direct" + c.target[strings.LastIndexByte(c.target, ' '):]
	for _, d := range cells {
		if d.target == want && d.conc == c.conc && d.op == c.op {
			return d, true
		}
	}
	return cell{}, false
}

// Tables renders the measurements as markdown.
func (r *Report) Tables() string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }

	w("### 1 KiB GET\n\n")
	w("| path | c | req/s | × direct | p50 ms | p99 ms | added p50 ms | CPU µs/req (%s) | of which agentk |\n", cpuCounted)
	w("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, c := range r.Small {
		d, _ := directOf(r.Small, c)
		x, added, cpu, agentCPU := "1.00×", "", "", ""
		if !strings.HasPrefix(c.target, "direct") {
			x = ratio(c.res.perSecond(), d.res.perSecond())
			added = fmt.Sprintf("%+.2f", float64(c.res.quantile(0.5)-d.res.quantile(0.5))/float64(time.Millisecond))
			cpu = fmt.Sprintf("%d", c.cpuPerOp.Microseconds())
			if c.res.requests > 0 && !isFloor(c) {
				agentCPU = fmt.Sprintf("%d", agentMicros(c))
			}
		}
		w("| %s | %d | %.0f | %s | %s | %s | %s | %s | %s |\n", c.target, c.conc, c.res.perSecond(), x,
			ms(c.res.quantile(0.5)), ms(c.res.quantile(0.99)), added, cpu, agentCPU)
	}

	r.budgetTable(w)
	r.anchorTables(w)
	r.crossNodeTables(w)

	w("\n### 10 MiB GET and PUT\n\n")
	w("| op | path | c | MiB/s | × direct | CPU ms/GiB (%s) |\n", cpuCounted)
	w("|---|---|---:|---:|---:|---:|\n")
	for _, c := range r.Bulk {
		d, _ := directOf(r.Bulk, c)
		x, cpu := "1.00×", ""
		if !strings.HasPrefix(c.target, "direct") {
			x = ratio(c.res.mibPerSecond(), d.res.mibPerSecond())
			if c.res.bytes > 0 {
				cpu = fmt.Sprintf("%.0f", float64(c.cpu.Milliseconds())/(float64(c.res.bytes)/(1<<30)))
			}
		}
		w("| %s | %s | %d | %.0f | %s | %s |\n", c.op, c.target, c.conc, c.res.mibPerSecond(), x, cpu)
	}

	if len(r.Watches) > 0 {
		w("\n### Watch streams (one flushed line every 10 ms, HTTP/2 client)\n\n")
		w("| path | streams | lines | lost | delay p50 ms | p99 ms | max ms | CPU %% of a core (%s) |\n", cpuCounted)
		w("|---|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, c := range r.Watches {
			cpu := ""
			if !strings.HasPrefix(c.target, "direct") && c.elapsed > 0 {
				cpu = fmt.Sprintf("%.0f", 100*c.cpu.Seconds()/c.elapsed.Seconds())
			}
			w("| %s | %d | %d | %d | %s | %s | %s | %s |\n", c.target, c.streams, c.expected, c.expected-c.got,
				ms(c.p50), ms(c.p99), ms(c.maxD), cpu)
		}
	}

	for i, s := range []*stalledResult{r.Stalled, r.StalledBaseline} {
		if s == nil {
			continue
		}
		title := ""
		if i == 1 {
			title = " (baseline)"
		}
		w("\n### One agent%s: %d open streams, %d requests in flight, one stalled reader (HTTP/2 client)\n\n", title, s.holds, s.inFlight)
		w("| | req/s | p50 ms | p99 ms |\n|---|---:|---:|---:|\n")
		w("| without the stalled reader | %.0f | %s | %s |\n", s.alone.perSecond(), ms(s.alone.quantile(0.5)), ms(s.alone.quantile(0.99)))
		w("| with the stalled reader | %.0f | %s | %s |\n", s.stalled.perSecond(), ms(s.stalled.quantile(0.5)), ms(s.stalled.quantile(0.99)))
		w("| ratio | %s | %s | %s |\n", ratio(s.stalled.perSecond(), s.alone.perSecond()),
			ratio(float64(s.stalled.quantile(0.5)), float64(s.alone.quantile(0.5))),
			ratio(float64(s.stalled.quantile(0.99)), float64(s.alone.quantile(0.99))))
		stallState := "still delivers data when read again"
		if s.stallErr != nil {
			stallState = fmt.Sprintf("failed when read again: %v", s.stallErr)
		}
		w("\nOpen streams broken during the measurement: %d; not opened: %d. The stalled stream %s.\n", s.broken, s.failed, stallState)
	}

	w("\n### Memory\n\n")
	w("| process | idle RSS MiB | RSS at end MiB | peak RSS MiB | binary MB |\n|---|---:|---:|---:|---:|\n")
	w("| Caddy | %s | %s | %s | %.1f |\n", mib(r.CaddyIdle.rss), mib(r.CaddyEnd.rss), mib(r.CaddyEnd.peak), float64(r.CaddyBinary)/1e6)
	w("| agentk | %s | %s | %s | %.1f |\n", mib(r.AgentkIdle.rss), mib(r.AgentkEnd.rss), mib(r.AgentkEnd.peak), float64(r.AgentkBinary)/1e6)
	if r.GitLabAgentk != "" {
		w("| GitLab's agentk | %s | %s | %s | %.1f |\n", mib(r.GitLabAgentkIdle.rss), mib(r.GitLabAgentkEnd.rss), mib(r.GitLabAgentkEnd.peak), float64(r.GitLabAgentkBinary)/1e6)
	}

	if len(r.Scale) > 0 {
		b0 := r.ScaleBase
		w("\n### Idle agents on one Caddy (wss, TLS 1.3, one tunnel per agent)\n\n")
		w("Before any agent: RSS %s MiB, Go heap in use %s MiB, %0.f goroutines.\n\n", mib(b0.caddy.rss), mib(int64(b0.heapInuse)), b0.goroutines)
		w("| agents | connected | connect s | Caddy RSS MiB | RSS KiB/agent | heap KiB/agent | goroutines/agent | Caddy idle CPU %% of a core | µs CPU per agent per s | simulator RSS MiB | simulator idle CPU %% |\n")
		w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, s := range r.Scale {
			n := float64(max(s.connected, 1))
			w("| %d | %d | %.1f | %s | %.1f | %.1f | %.2f | %.2f | %.2f | %s | %.2f |\n",
				s.agents, s.connected, s.connectTime.Seconds(), mib(s.caddy.rss),
				float64(s.caddy.rss-b0.caddy.rss)/1024/n, (s.heapInuse-b0.heapInuse)/1024/n,
				(s.goroutines-b0.goroutines)/n,
				100*s.caddyCPU.Seconds()/s.window.Seconds(), float64(s.caddyCPU.Microseconds())/s.window.Seconds()/n,
				mib(s.simRSS), 100*s.simCPU.Seconds()/s.window.Seconds())
		}
		w("\nTunnels lost while idle: %d. Open files limit: %d.\n", r.ScaleLost, r.FileLimit)
	}
	return b.String()
}

// target is one row of the targets table.
type targetRow struct {
	metric, target, measured string
	met                      bool
	known                    bool
}

// Targets compares the run with the targets of the benchmark issue.
func (r *Report) Targets() string {
	var rows []targetRow
	find := func(cells []cell, label, op string, conc int) (cell, bool) {
		for _, c := range cells {
			if c.target == label && c.conc == conc && c.op == op {
				return c, true
			}
		}
		return cell{}, false
	}
	for _, proto := range []string{"h1", "h2"} {
		var parts []string
		met, known := true, true
		for _, conc := range []int{16, 128} {
			want := map[int]float64{16: 0.30, 128: 0.40}[conc]
			c, ok1 := find(r.Small, "single node "+proto, "", conc)
			d, ok2 := find(r.Small, "direct "+proto, "", conc)
			if !ok1 || !ok2 || d.res.perSecond() == 0 {
				known = false
				continue
			}
			x := c.res.perSecond() / d.res.perSecond()
			parts = append(parts, fmt.Sprintf("%.2f×", x))
			met = met && x >= want
		}
		rows = append(rows, targetRow{"1 KiB req/s vs direct, c=16 / c=128 (" + proto + ")", "≥ 0.30× / ≥ 0.40×", strings.Join(parts, " / "), met, known})
	}
	for _, proto := range []string{"h1", "h2"} {
		c, ok := find(r.Small, "single node "+proto, "", 16)
		rows = append(rows, targetRow{"CPU per proxied request, c=16 (" + proto + ")", "≤ 120 µs", fmt.Sprintf("%d µs", c.cpuPerOp.Microseconds()), c.cpuPerOp <= 120*time.Microsecond, ok})
	}
	for _, proto := range []string{"h1", "h2"} {
		c, ok1 := find(r.Small, "single node "+proto, "", 1)
		d, ok2 := find(r.Small, "direct "+proto, "", 1)
		added := c.res.quantile(0.5) - d.res.quantile(0.5)
		rows = append(rows, targetRow{"added p50 latency, c=1 (" + proto + ")", "≤ +0.30 ms", "+" + ms(added) + " ms", added <= 300*time.Microsecond, ok1 && ok2})
	}
	// The goal of the small-request work, over wss with a TLS client:
	// looser than the long-term targets above, and measured the same way.
	for _, proto := range []string{"h1", "h2"} {
		c, ok1 := find(r.Small, "single node "+proto, "", 16)
		d, ok2 := find(r.Small, "direct "+proto, "", 16)
		x := 0.0
		if d.res.perSecond() > 0 {
			x = c.res.perSecond() / d.res.perSecond()
		}
		rows = append(rows, targetRow{"small requests: CPU per request / req/s vs direct, c=16 (" + proto + ")", "≤ 200 µs / ≥ 0.20×",
			fmt.Sprintf("%d µs / %.2f×", c.cpuPerOp.Microseconds(), x), c.cpuPerOp <= 200*time.Microsecond && x >= 0.20, ok1 && ok2})
	}
	for _, proto := range []string{"h1", "h2"} {
		c, ok1 := find(r.Small, "single node "+proto, "", 1)
		d, ok2 := find(r.Small, "direct "+proto, "", 1)
		added := c.res.quantile(0.5) - d.res.quantile(0.5)
		rows = append(rows, targetRow{"small requests: added p50 latency, c=1 (" + proto + ")", "≤ +0.40 ms", "+" + ms(added) + " ms", added <= 400*time.Microsecond, ok1 && ok2})
	}
	for _, wc := range r.Watches {
		if wc.streams != 100 || wc.target != "single node h2" {
			continue
		}
		for _, d := range r.Watches {
			if d.streams == 100 && d.target == "direct h2" {
				rows = append(rows, targetRow{"100 watch streams: p99 delay vs direct", "≤ 2× direct's p99",
					fmt.Sprintf("%s ms against %s ms (%s)", ms(wc.p99), ms(d.p99), ratio(float64(wc.p99), float64(d.p99))),
					d.p99 > 0 && wc.p99 <= 2*d.p99, d.p99 > 0})
			}
		}
	}
	for _, op := range []string{"GET", "PUT"} {
		for _, proto := range []string{"h1", "h2"} {
			c, ok1 := find(r.Bulk, "single node "+proto, op, 8)
			d, ok2 := find(r.Bulk, "direct "+proto, op, 8)
			x := 0.0
			if d.res.mibPerSecond() > 0 {
				x = c.res.mibPerSecond() / d.res.mibPerSecond()
			}
			rows = append(rows, targetRow{fmt.Sprintf("10 MiB %s vs direct, c=8 (%s)", op, proto), "≥ 0.30×", fmt.Sprintf("%.2f×", x), x >= 0.30, ok1 && ok2})
		}
	}
	for _, wc := range r.Watches {
		if wc.streams == 1000 && wc.target == "single node h2" {
			lost := wc.expected - wc.got
			rows = append(rows, targetRow{"1,000 watch streams through one agent", "p99 ≤ 5 ms, 0 lost",
				fmt.Sprintf("p99 %s ms, %d lost", ms(wc.p99), lost), wc.p99 <= 5*time.Millisecond && lost == 0, true})
		}
	}
	for _, s := range r.Scale {
		if s.agents == 10000 {
			per := float64(s.caddy.rss-r.ScaleBase.caddy.rss) / 1024 / float64(max(s.connected, 1))
			rows = append(rows, targetRow{"idle agents on one node (wss, TLS)", "10,000 at ≤ 36 KiB each",
				fmt.Sprintf("%d at %.1f KiB each", s.connected, per), s.connected == 10000 && per <= 36, true})
		}
	}
	for _, proto := range []string{"h1", "h2"} {
		x, ok := r.crossNodeRatio(proto, 16)
		measured := r.CrossNodeNote
		if ok {
			measured = fmt.Sprintf("%.2f× (%s µs against %s µs)", x.ratio, perOpMicros(x.cross), perOpMicros(x.single))
		}
		rows = append(rows, targetRow{"cross-node CPU per request, c=16 (" + proto + ")", "≤ 1.3× single node", measured, ok && x.ratio <= 1.3, ok})
	}
	rows = append(rows, r.gitlabKASTarget())
	rows = append(rows, targetRow{"agentk idle RSS / binary", "≤ 20 MiB / ≤ 20 MB",
		fmt.Sprintf("%s MiB / %.1f MB", mib(r.AgentkIdle.rss), float64(r.AgentkBinary)/1e6),
		r.AgentkIdle.rss <= 20<<20 && r.AgentkBinary <= 20e6, r.AgentkBinary > 0})

	var b strings.Builder
	b.WriteString("| metric | target | this run | met |\n|---|---|---|---|\n")
	for _, t := range rows {
		verdict := "no"
		switch {
		case !t.known:
			verdict = "n/a"
		case t.met:
			verdict = "yes"
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", t.metric, t.target, t.measured, verdict)
	}
	return b.String()
}

// Header describes the run: when, where, with what.
func (r *Report) Header(command string) string {
	m := r.Machine
	gitlab := r.GitLabAgentkNote
	if r.GitLabAgentk != "" {
		gitlab = r.GitLabAgentk + " (rows \"single node, GitLab agentk\")"
	}
	nodes := r.CrossNodeNote
	if r.Redis != "" {
		nodes = "two Caddy nodes sharing redis-server " + r.Redis + " (rows \"" + crossNodeName + "\")"
	}
	floor := r.FloorNote
	if floor == "" {
		floor = "the same Caddy binary with its stock reverse_proxy, a process of its own (rows \"" + floorName + "\")"
	}
	kas := r.GitLabKASNote
	if r.GitLabKAS != "" {
		times := fmt.Sprintf("%d times", r.StandInAuthCalls)
		if r.StandInAuthCalls == 1 {
			times = "once"
		}
		kas = fmt.Sprintf("%s with GitLab's agentk %s, redis-server %s and the Rails stand-in, which it asked %s to check the CI job token (rows \"%s\")",
			r.GitLabKAS, r.GitLabKASAgentk, r.GitLabKASRedis, times, gitlabKASName)
	}
	return fmt.Sprintf("- Date: %s\n- Machine: %s, %d cores, %s\n- Load average at start: %s\n- Go: %s\n- GitLab's agentk: %s\n- Cross node: %s\n- Caddy's own reverse_proxy: %s\n- GitLab's KAS: %s\n- Command: `%s`\n- Run time: %s\n",
		r.Started.UTC().Format("2006-01-02 15:04 MST"), m.CPU, m.Cores, m.Kernel, m.LoadAvg, m.GoVersion, gitlab, nodes, floor, kas, command,
		r.Finished.Sub(r.Started).Round(time.Second))
}

// Markers delimit the generated part of docs/benchmarks.md; the rest of
// the file is kept when -write replaces it.
const (
	BeginMarker = "<!-- kasbench:begin -->"
	EndMarker   = "<!-- kasbench:end -->"
)

// Markdown is the generated part of docs/benchmarks.md.
func (r *Report) Markdown(command string) string {
	return BeginMarker + "\n\n" + r.Header(command) + "\n## Targets\n\n" + r.Targets() + "\n## Results\n\n" + r.Tables() + "\n" + EndMarker
}

// WriteDoc replaces the generated part of the document at path (or
// creates it) with this report.
func (r *Report) WriteDoc(path, command string) error {
	gen := r.Markdown(command)
	old, err := os.ReadFile(path)
	var doc string
	switch {
	case err == nil && strings.Contains(string(old), BeginMarker) && strings.Contains(string(old), EndMarker):
		s := string(old)
		i, j := strings.Index(s, BeginMarker), strings.Index(s, EndMarker)+len(EndMarker)
		doc = s[:i] + gen + s[j:]
	case err == nil || os.IsNotExist(err):
		doc = "# Benchmarks\n\n" + gen + "\n"
	default:
		return fmt.Errorf("reading %s: %w", path, err)
	}
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

// crossNodeComparison is one cross-node cell next to the single-node and
// direct cells of the same load, protocol and concurrency.
type crossNodeComparison struct {
	cross, single, direct cell
	// ratio is the cross-node CPU per request (per byte in the 10 MiB
	// table) over the single node's.
	ratio float64
}

// crossNodeOf finds the single-node and direct cells that the cross-node
// cell c is compared with.
func crossNodeOf(cells []cell, c cell) (crossNodeComparison, bool) {
	x := crossNodeComparison{cross: c}
	proto := c.target[strings.LastIndexByte(c.target, ' ')+1:]
	var okSingle, okDirect bool
	for _, d := range cells {
		if d.conc != c.conc || d.op != c.op {
			continue
		}
		switch d.target {
		case "single node " + proto:
			x.single, okSingle = d, true
		case "direct " + proto:
			x.direct, okDirect = d, true
		}
	}
	if !okSingle || !okDirect {
		return x, false
	}
	// Per request for 1 KiB; per byte for 10 MiB, so that transfers
	// still running at the end of a cell count for what they moved.
	single, cross := float64(x.single.cpuPerOp), float64(c.cpuPerOp)
	if c.op != "" {
		single = float64(x.single.cpu) / float64(max(x.single.res.bytes, 1))
		cross = float64(c.cpu) / float64(max(c.res.bytes, 1))
	}
	if single > 0 {
		x.ratio = cross / single
	}
	return x, single > 0 && cross > 0
}

// crossNodeComparisons are the cross-node cells among cells, each with the
// single-node and direct cells it is compared with.
func crossNodeComparisons(cells []cell) []crossNodeComparison {
	var xs []crossNodeComparison
	for _, c := range cells {
		if !strings.HasPrefix(c.target, crossNodeName+" ") {
			continue
		}
		if x, ok := crossNodeOf(cells, c); ok {
			xs = append(xs, x)
		}
	}
	return xs
}

// crossNodeRatio is the comparison of the 1 KiB cross-node cell of proto
// at conc, if it was measured.
func (r *Report) crossNodeRatio(proto string, conc int) (crossNodeComparison, bool) {
	for _, x := range crossNodeComparisons(r.Small) {
		if x.cross.target == crossNodeName+" "+proto && x.cross.conc == conc {
			return x, true
		}
	}
	return crossNodeComparison{}, false
}

// perOpMicros is a cell's CPU per request in whole microseconds.
func perOpMicros(c cell) string { return fmt.Sprintf("%d", c.cpuPerOp.Microseconds()) }

// crossNodeTables compare the cross-node cells with the single-node ones
// of the same run: CPU split between the processes, and added latency.
func (r *Report) crossNodeTables(w func(string, ...any)) {
	client := func(c cell) string { return c.target[len(crossNodeName)+1:] }
	if small := crossNodeComparisons(r.Small); len(small) > 0 {
		per := func(d time.Duration, c cell) string {
			return fmt.Sprintf("%d", (d / time.Duration(max(c.res.requests, 1))).Microseconds())
		}
		w("\n### Across nodes: client → node A → node B → agentk (1 KiB GET)\n\n")
		w("CPU per request counts both Caddy nodes and agentk; the single-node row of the same run counts its Caddy and agentk.\n\n")
		w("| client | c | req/s | CPU µs/req: single node | cross-node | × single node | node A | node B | agentk | p50 ms | added p50 ms vs direct | vs single node |\n")
		w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, x := range small {
			c, p50 := x.cross, x.cross.res.quantile(0.5)
			w("| %s | %d | %.0f | %s | %s | %.2f× | %s | %s | %s | %s | %+.2f | %+.2f |\n",
				client(c), c.conc, c.res.perSecond(), perOpMicros(x.single), perOpMicros(c), x.ratio,
				per(c.cpu-c.holder.cpu-c.agent.cpu, c), per(c.holder.cpu, c), per(c.agent.cpu, c), ms(p50),
				float64(p50-x.direct.res.quantile(0.5))/float64(time.Millisecond),
				float64(p50-x.single.res.quantile(0.5))/float64(time.Millisecond))
		}
	}
	if bulk := crossNodeComparisons(r.Bulk); len(bulk) > 0 {
		perGiB := func(d time.Duration, c cell) float64 {
			return float64(d.Milliseconds()) / (float64(max(c.res.bytes, 1)) / (1 << 30))
		}
		w("\n### Across nodes: 10 MiB GET and PUT\n\n")
		w("| op | client | c | MiB/s: single node | cross-node | CPU ms/GiB: single node | cross-node | × single node | of which node A / node B / agentk |\n")
		w("|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, x := range bulk {
			c := x.cross
			w("| %s | %s | %d | %.0f | %.0f | %.0f | %.0f | %.2f× | %.0f / %.0f / %.0f |\n",
				c.op, client(c), c.conc, x.single.res.mibPerSecond(), c.res.mibPerSecond(),
				perGiB(x.single.cpu, x.single), perGiB(c.cpu, c), x.ratio,
				perGiB(c.cpu-c.holder.cpu-c.agent.cpu, c), perGiB(c.holder.cpu, c), perGiB(c.agent.cpu, c))
		}
	}
}

// budgetTable renders what each proxied 1 KiB request cost the processes
// on its way in system calls and context switches, the work counters
// behind its CPU time.
func (r *Report) budgetTable(w func(string, ...any)) {
	if !slices.ContainsFunc(r.Small, func(c cell) bool { return c.res.requests > 0 && !strings.HasPrefix(c.target, "direct") }) {
		return
	}
	w("\n### Per request: system calls and context switches (1 KiB GET)\n\n")
	w("Counted by Linux for each process during the cell (`/proc/<pid>/io` `syscr` and `syscw`, and the context switches of its threads), divided by the requests completed. The Caddy columns count both nodes in the cross-node rows and GitLab's KAS in its rows; %s has no agent.\n\n", floorName)
	w("| path | c | Caddy reads | Caddy writes | Caddy switches | agent reads | agent writes | agent switches | all syscalls (reads + writes) |\n")
	w("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, c := range r.Small {
		if c.res.requests == 0 || strings.HasPrefix(c.target, "direct") {
			continue
		}
		n := float64(c.res.requests)
		caddy := c.server.add(c.holder)
		per := func(v int64) string { return fmt.Sprintf("%.1f", float64(v)/n) }
		agentReads, agentWrites, agentSwitches := per(c.agent.reads), per(c.agent.writes), per(c.agent.contextSwitches)
		if isFloor(c) {
			agentReads, agentWrites, agentSwitches = "", "", ""
		}
		w("| %s | %d | %s | %s | %s | %s | %s | %s | %s |\n", c.target, c.conc,
			per(caddy.reads), per(caddy.writes), per(caddy.contextSwitches),
			agentReads, agentWrites, agentSwitches,
			per(caddy.reads+caddy.writes+c.agent.reads+c.agent.writes))
	}
}
