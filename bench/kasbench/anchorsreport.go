package kasbench

import (
	"fmt"
	"strings"
	"time"
)

// cpuCounted says, in the tables' headers, whose CPU each kind of row
// counts.
const cpuCounted = "Caddy + agentk; cross-node: both nodes + agentk; " + floorName + ": that Caddy; " + gitlabKASName + ": GitLab's KAS + its agentk"

// isFloor reports whether c is a row of Caddy's own reverse_proxy, which
// has no agent.
func isFloor(c cell) bool { return strings.HasPrefix(c.target, floorName+" ") }

// isGitLabKAS reports whether c is a row of GitLab's KAS.
func isGitLabKAS(c cell) bool { return strings.HasPrefix(c.target, gitlabKASName+" ") }

// protoOf is the client's protocol of a cell, "h1" or "h2".
func protoOf(c cell) string { return c.target[strings.LastIndexByte(c.target, ' ')+1:] }

// sameLoad finds the cell labelled label that measured c's load: the same
// operation and concurrency.
func sameLoad(cells []cell, label string, c cell) (cell, bool) {
	for _, d := range cells {
		if d.target == label && d.conc == c.conc && d.op == c.op {
			return d, true
		}
	}
	return cell{}, false
}

// agentMicros is the CPU of c's agent per request in whole microseconds,
// as the 1 KiB table shows it; 0 without requests.
func agentMicros(c cell) int64 {
	if c.res.requests == 0 {
		return 0
	}
	return (c.agent.cpu / time.Duration(c.res.requests)).Microseconds()
}

// floorCost is a single-node cell over the floor's cell of the same load:
// what our modules and agentk add to what Caddy costs by itself.
type floorCost struct {
	ours, floor cell
	// oursCPU and floorCPU are the CPU per request in whole µs, as the
	// 1 KiB table shows them; added is their difference, which is
	// caddySide (our Caddy's CPU minus the floor Caddy's) plus agentkSide
	// (our agentk's CPU).
	oursCPU, floorCPU, added, caddySide, agentkSide int64
	// addedP50 is our median latency minus the floor's.
	addedP50 time.Duration
}

// floorCosts compares every floor cell among cells with the single-node
// cell of the same load and protocol.
func floorCosts(cells []cell) []floorCost {
	var out []floorCost
	for _, f := range cells {
		if !isFloor(f) {
			continue
		}
		ours, ok := sameLoad(cells, "single node "+protoOf(f), f)
		if !ok || ours.res.requests == 0 || f.res.requests == 0 {
			continue
		}
		x := floorCost{ours: ours, floor: f, oursCPU: ours.cpuPerOp.Microseconds(), floorCPU: f.cpuPerOp.Microseconds()}
		x.added = x.oursCPU - x.floorCPU
		x.agentkSide = agentMicros(ours)
		x.caddySide = x.added - x.agentkSide
		x.addedP50 = ours.res.quantile(0.5) - f.res.quantile(0.5)
		out = append(out, x)
	}
	return out
}

// kasComparison is a single-node cell next to GitLab's KAS's cell of the
// same load: ours over theirs.
type kasComparison struct {
	ours, kas cell
	// rate, cpu and p50 are ours over GitLab's KAS's: requests per
	// second, CPU per request and median latency.
	rate, cpu, p50 float64
	// behind names what ours is not ahead in: "req/s" if not higher,
	// "CPU" and "p50" if not lower. Empty: ahead on all three.
	behind []string
}

// gitlabKASComparisons compares every cell of GitLab's KAS among cells with
// the single-node cell of the same load and protocol.
func gitlabKASComparisons(cells []cell) []kasComparison {
	var out []kasComparison
	for _, k := range cells {
		if !isGitLabKAS(k) {
			continue
		}
		ours, ok := sameLoad(cells, "single node "+protoOf(k), k)
		if !ok {
			continue
		}
		x := kasComparison{ours: ours, kas: k}
		ratioOf := func(a, b float64) float64 {
			if b == 0 {
				return 0
			}
			return a / b
		}
		x.rate = ratioOf(ours.res.perSecond(), k.res.perSecond())
		x.cpu = ratioOf(float64(ours.cpuPerOp), float64(k.cpuPerOp))
		x.p50 = ratioOf(float64(ours.res.quantile(0.5)), float64(k.res.quantile(0.5)))
		if ours.res.perSecond() <= k.res.perSecond() {
			x.behind = append(x.behind, "req/s")
		}
		if ours.cpuPerOp >= k.cpuPerOp {
			x.behind = append(x.behind, "CPU")
		}
		if ours.res.quantile(0.5) >= k.res.quantile(0.5) {
			x.behind = append(x.behind, "p50")
		}
		out = append(out, x)
	}
	return out
}

// gitlabKASTarget is the target row "ahead of GitLab's KAS on every 1 KiB
// row": higher req/s, lower CPU per request and lower p50 than GitLab's
// KAS at every concurrency and client protocol.
func (r *Report) gitlabKASTarget() targetRow {
	row := targetRow{metric: "ahead of GitLab's KAS on every 1 KiB row", target: "req/s higher, CPU lower, p50 lower"}
	xs := gitlabKASComparisons(r.Small)
	if len(xs) == 0 {
		row.measured = r.GitLabKASNote
		if row.measured == "" {
			row.measured = "no 1 KiB rows of GitLab's KAS"
		}
		return row
	}
	var behind []string
	for _, x := range xs {
		if len(x.behind) > 0 {
			behind = append(behind, fmt.Sprintf("c=%d %s: %s", x.ours.conc, protoOf(x.ours), strings.Join(x.behind, ", ")))
		}
	}
	row.known = true
	row.met = len(behind) == 0
	row.measured = fmt.Sprintf("ahead on %d of %d rows", len(xs)-len(behind), len(xs))
	if len(behind) > 0 {
		row.measured += "; not ahead at " + strings.Join(behind, "; ")
	}
	return row
}

// anchorTables compare the single node with the floor and with GitLab's
// KAS in the 1 KiB GET table of the same run.
func (r *Report) anchorTables(w func(string, ...any)) {
	msDiff := func(d time.Duration) string { return fmt.Sprintf("%+.2f", float64(d)/float64(time.Millisecond)) }
	if xs := floorCosts(r.Small); len(xs) > 0 {
		w("\n### Cost over Caddy's own reverse_proxy (1 KiB GET)\n\n")
		w("Single node minus %s, cell by cell: the CPU our modules and agentk add to what Caddy costs by itself, "+
			"split into Caddy's side (our Caddy's CPU minus the floor Caddy's) and agentk's, and the latency they add.\n\n", floorName)
		w("| client | c | CPU µs/req: single node | %s | added | of which Caddy side | of which agentk | p50 ms: single node | %s | added p50 ms |\n", floorName, floorName)
		w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, x := range xs {
			w("| %s | %d | %d | %d | %+d | %+d | %d | %s | %s | %s |\n",
				protoOf(x.ours), x.ours.conc, x.oursCPU, x.floorCPU, x.added, x.caddySide, x.agentkSide,
				ms(x.ours.res.quantile(0.5)), ms(x.floor.res.quantile(0.5)), msDiff(x.addedP50))
		}
	}
	if xs := gitlabKASComparisons(r.Small); len(xs) > 0 {
		w("\n### Against GitLab's KAS (1 KiB GET)\n\n")
		w("× is single node over %s: above 1 is better for req/s, below 1 for CPU and p50.\n\n", gitlabKASName)
		w("| client | c | req/s: single node | %[1]s | × | CPU µs/req: single node | %[1]s | × | p50 ms: single node | %[1]s | × | ahead |\n", gitlabKASName)
		w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
		for _, x := range xs {
			ahead := "yes"
			if len(x.behind) > 0 {
				ahead = "not on " + strings.Join(x.behind, ", ")
			}
			w("| %s | %d | %.0f | %.0f | %.2f× | %s | %s | %.2f× | %s | %s | %.2f× | %s |\n",
				protoOf(x.ours), x.ours.conc, x.ours.res.perSecond(), x.kas.res.perSecond(), x.rate,
				perOpMicros(x.ours), perOpMicros(x.kas), x.cpu,
				ms(x.ours.res.quantile(0.5)), ms(x.kas.res.quantile(0.5)), x.p50, ahead)
		}
	}
}
