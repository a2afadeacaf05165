package kasbench

import (
	"slices"
	"strings"
	"testing"
	"time"
)

// smallCell is a 1 KiB cell of label at conc: requests in one second, the
// CPU of its processes and of its agent, and one latency, its p50.
func smallCell(label string, conc int, requests int64, cpu, agentCPU, p50 time.Duration) cell {
	c := cell{target: label, conc: conc, cpu: cpu, agent: procCounters{cpu: agentCPU},
		res: loadResult{requests: requests, elapsed: time.Second, latencies: []time.Duration{p50}}}
	if requests > 0 {
		c.cpuPerOp = cpu / time.Duration(requests)
	}
	return c
}

func TestFloorCosts(t *testing.T) {
	tests := []struct {
		name  string
		cells []cell
		want  []floorCost // cells left out of the comparison
	}{
		{
			name: "our CPU over the floor's, split into Caddy's side and agentk's",
			cells: []cell{
				smallCell("direct h1", 16, 9000, 0, 0, 100*time.Microsecond),
				smallCell("single node h1", 16, 1000, 150*time.Millisecond, 60*time.Millisecond, 900*time.Microsecond),
				smallCell(floorName+" h1", 16, 2000, 100*time.Millisecond, 0, 400*time.Microsecond),
			},
			want: []floorCost{{oursCPU: 150, floorCPU: 50, added: 100, caddySide: 40, agentkSide: 60, addedP50: 500 * time.Microsecond}},
		},
		{
			name: "our Caddy cheaper than the floor's: a negative Caddy side",
			cells: []cell{
				smallCell("single node h2", 1, 100, 30*time.Millisecond, 20*time.Millisecond, 300*time.Microsecond),
				smallCell(floorName+" h2", 1, 100, 20*time.Millisecond, 0, 400*time.Microsecond),
			},
			want: []floorCost{{oursCPU: 300, floorCPU: 200, added: 100, caddySide: -100, agentkSide: 200, addedP50: -100 * time.Microsecond}},
		},
		{
			name: "each floor cell against the single node of its protocol and concurrency",
			cells: []cell{
				smallCell("single node h1", 1, 100, 10*time.Millisecond, 5*time.Millisecond, time.Millisecond),
				smallCell("single node h2", 1, 100, 20*time.Millisecond, 5*time.Millisecond, time.Millisecond),
				smallCell("single node h1", 16, 100, 40*time.Millisecond, 5*time.Millisecond, time.Millisecond),
				smallCell(floorName+" h2", 1, 100, 10*time.Millisecond, 0, time.Millisecond),
			},
			want: []floorCost{{oursCPU: 200, floorCPU: 100, added: 100, caddySide: 50, agentkSide: 50}},
		},
		{
			name: "no single node of that load, or no requests: no comparison",
			cells: []cell{
				smallCell("single node h1", 1, 0, 0, 0, 0),
				smallCell(floorName+" h1", 1, 100, 10*time.Millisecond, 0, time.Millisecond),
				smallCell(floorName+" h2", 1, 100, 10*time.Millisecond, 0, time.Millisecond),
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := floorCosts(tt.cells)
			if len(got) != len(tt.want) {
				t.Fatalf("%d comparisons, want %d: %+v", len(got), len(tt.want), got)
			}
			for i, x := range got {
				w := tt.want[i]
				if x.oursCPU != w.oursCPU || x.floorCPU != w.floorCPU || x.added != w.added || x.caddySide != w.caddySide ||
					x.agentkSide != w.agentkSide || x.addedP50 != w.addedP50 {
					t.Errorf("CPU µs/req ours %d, floor %d, added %d = Caddy %d + agentk %d, added p50 %v; want %d, %d, %d = %d + %d, %v",
						x.oursCPU, x.floorCPU, x.added, x.caddySide, x.agentkSide, x.addedP50,
						w.oursCPU, w.floorCPU, w.added, w.caddySide, w.agentkSide, w.addedP50)
				}
				if x.added != x.caddySide+x.agentkSide {
					t.Errorf("added %d is not Caddy side %d plus agentk %d", x.added, x.caddySide, x.agentkSide)
				}
				if protoOf(x.ours) != protoOf(x.floor) || x.ours.conc != x.floor.conc {
					t.Errorf("compared %s c=%d with %s c=%d", x.ours.target, x.ours.conc, x.floor.target, x.floor.conc)
				}
			}
		})
	}
}

func TestGitLabKASJudgement(t *testing.T) {
	ours := func(proto string, conc int) cell {
		return smallCell("single node "+proto, conc, 2000, 200*time.Millisecond, 80*time.Millisecond, 500*time.Microsecond)
	}
	kas := func(proto string, conc int, requests int64, cpu, p50 time.Duration) cell {
		return smallCell(gitlabKASName+" "+proto, conc, requests, cpu, cpu/2, p50)
	}
	const slower, costlier, later = 1000, 400 * time.Millisecond, time.Millisecond // than ours
	tests := []struct {
		name        string
		cells       []cell
		note        string
		wantBehind  [][]string // per comparison, what ours is not ahead in
		wantRate    float64    // of the first comparison
		wantMet     bool
		wantKnown   bool
		wantMeasure string // in the target row
	}{
		{
			name:        "ahead on every row",
			cells:       []cell{ours("h1", 1), kas("h1", 1, slower, costlier, later), ours("h2", 1), kas("h2", 1, slower, costlier, later)},
			wantBehind:  [][]string{nil, nil},
			wantRate:    2,
			wantMet:     true,
			wantKnown:   true,
			wantMeasure: "ahead on 2 of 2 rows",
		},
		{
			name: "behind on CPU on one row",
			cells: []cell{ours("h1", 16), kas("h1", 16, slower, costlier, later),
				ours("h2", 16), kas("h2", 16, slower, 100*time.Millisecond, later)},
			wantBehind:  [][]string{nil, {"CPU"}},
			wantRate:    2,
			wantKnown:   true,
			wantMeasure: "ahead on 1 of 2 rows; not ahead at c=16 h2: CPU",
		},
		{
			name:        "a tie is not ahead",
			cells:       []cell{ours("h1", 1), kas("h1", 1, 2000, 200*time.Millisecond, 500*time.Microsecond)},
			wantBehind:  [][]string{{"req/s", "CPU", "p50"}},
			wantRate:    1,
			wantKnown:   true,
			wantMeasure: "ahead on 0 of 1 rows; not ahead at c=1 h1: req/s, CPU, p50",
		},
		{
			name:        "no rows of GitLab's KAS: not known, with the reason",
			cells:       []cell{ours("h1", 1), smallCell(floorName+" h1", 1, 3000, 90*time.Millisecond, 0, 200*time.Microsecond)},
			note:        "rows left out (-skip gitlabkas)",
			wantMeasure: "rows left out (-skip gitlabkas)",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			xs := gitlabKASComparisons(tt.cells)
			if len(xs) != len(tt.wantBehind) {
				t.Fatalf("%d comparisons, want %d", len(xs), len(tt.wantBehind))
			}
			for i, x := range xs {
				if !slices.Equal(x.behind, tt.wantBehind[i]) {
					t.Errorf("%s c=%d: behind on %q, want %q", x.kas.target, x.kas.conc, x.behind, tt.wantBehind[i])
				}
			}
			if len(xs) > 0 && xs[0].rate != tt.wantRate {
				t.Errorf("req/s ratio %v, want %v", xs[0].rate, tt.wantRate)
			}
			r := &Report{Small: tt.cells, GitLabKASNote: tt.note}
			row := r.gitlabKASTarget()
			if row.met != tt.wantMet || row.known != tt.wantKnown || row.measured != tt.wantMeasure {
				t.Errorf("target row met %t, known %t, measured %q; want %t, %t, %q", row.met, row.known, row.measured,
					tt.wantMet, tt.wantKnown, tt.wantMeasure)
			}
		})
	}
}

// TestAnchorTables checks that the comparison tables appear only with the
// rows they compare, and that the floor's agent column stays empty.
func TestAnchorTables(t *testing.T) {
	cells := []cell{
		smallCell("direct h1", 1, 9000, 0, 0, 100*time.Microsecond),
		smallCell("single node h1", 1, 2000, 200*time.Millisecond, 80*time.Millisecond, 500*time.Microsecond),
		smallCell(floorName+" h1", 1, 3000, 90*time.Millisecond, 0, 200*time.Microsecond),
		smallCell(gitlabKASName+" h1", 1, 700, 700*time.Millisecond, 300*time.Millisecond, 1300*time.Microsecond),
	}
	tests := []struct {
		name      string
		cells     []cell
		want, not []string
	}{
		{name: "both", cells: cells,
			want: []string{"| " + floorName + " h1 | 1 | 3000 | 0.33× | 0.20 | 0.20 | +0.10 | 30 |  |\n",
				"### Cost over Caddy's own reverse_proxy", "| h1 | 1 | 100 | 30 | +70 | +30 | 40 | 0.50 | 0.20 | +0.30 |\n",
				"### Against GitLab's KAS", "| h1 | 1 | 2000 | 700 | 2.86× | 100 | 1000 | 0.10× | 0.50 | 1.30 | 0.38× | yes |\n"}},
		{name: "neither", cells: cells[:2], not: []string{"### Cost over", "### Against GitLab's KAS"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := (&Report{Small: tt.cells}).Tables()
			for _, s := range tt.want {
				if !strings.Contains(out, s) {
					t.Errorf("no %q in\n%s", s, out)
				}
			}
			for _, s := range tt.not {
				if strings.Contains(out, s) {
					t.Errorf("%q in\n%s", s, out)
				}
			}
		})
	}
}
