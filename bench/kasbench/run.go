// Package kasbench measures caddy-kas side by side with a direct connection
// to the same upstream, in one run on loopback: requests per second,
// latency, CPU per request, bulk throughput, watch delivery delay, memory,
// idle agents per node and isolation from a stalled reader; and the same
// requests across two Caddy nodes sharing a Redis. See
// docs/benchmarks.md for the results and bench/cmd/kasbench for the
// command.
package kasbench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Config chooses what a run measures and for how long.
type Config struct {
	// Root is the module root, where the binaries are built from.
	Root string
	// Release builds stripped binaries with -trimpath, like a release.
	Release bool
	// Phase is how long one cell of a table is measured; Warmup comes
	// before it and is not measured.
	Phase, Warmup time.Duration
	// MaxOps bounds the requests of one cell.
	MaxOps int64
	// Concurrency are the concurrencies of the 1 KiB GET table;
	// BulkConcurrency those of the 10 MiB tables.
	Concurrency, BulkConcurrency []int
	// WatchStreams are the stream counts of the watch table, each
	// WatchLines lines long (one every 10 ms).
	WatchStreams []int
	WatchLines   int
	// HoldStreams long-open streams and InFlight concurrent requests
	// share one agent in the stalled-reader measurement.
	HoldStreams, InFlight int
	// ScaleAgents are the numbers of idle agents to connect, in
	// increasing order; IdleWindow is how long idle CPU is measured at
	// each step; Sources how many loopback source addresses they dial
	// from.
	ScaleAgents []int
	IdleWindow  time.Duration
	Sources     int
	// ProfileDir, if set, receives CPU profiles of Caddy taken during
	// the 1 KiB GET phase at ProfileConc and the 10 MiB GET phase at the
	// highest bulk concurrency, through Caddy over HTTP/2; of both nodes
	// in the cross-node phases (files ending in -node-a and -node-b).
	ProfileDir  string
	ProfileConc int
	// Skip names measurements to leave out: "small", "bulk", "watch",
	// "stalled", "gitlab" (the rows of GitLab's agentk), "nodes" (the
	// cross-node rows), "floor" (the rows of Caddy's own reverse_proxy),
	// "gitlabkas" (the rows of GitLab's KAS); the scale one is left out
	// with no ScaleAgents.
	Skip map[string]bool
	// Settle is how long the harness waits for things to calm down
	// (after a start, before reading memory).
	Settle time.Duration
	// BaselineRoot, if set, is a second source tree (the code before a
	// change, say) whose binaries are measured in the same run, after
	// the main ones, with their own direct rows; its rows are marked
	// "(baseline)".
	BaselineRoot string
	// CaddyEnv is added to Caddy's environment (GODEBUG or GOGC
	// experiments, say).
	CaddyEnv []string
	// BaselineCaddyEnv is added to the baseline Caddy's environment instead
	// of CaddyEnv, so that a run-time setting can be measured against the
	// same code without it (-baseline at the same tree).
	BaselineCaddyEnv []string
	// AgentkEnv is added to our agentk's environment (GOMAXPROCS, say);
	// BaselineAgentkEnv to the baseline agentk's instead of AgentkEnv.
	AgentkEnv, BaselineAgentkEnv []string
	// GitLabAgentk is GitLab's agentk binary (see GitLabAgentkPath). If
	// it is set and the file exists, GitLab's agentk connects to the
	// Caddy under test as a second agent and every cell of the 1 KiB,
	// 10 MiB and watch tables is also measured through it, right after
	// the same cell through our agentk. Otherwise its rows are left out
	// and the report says why.
	GitLabAgentk string
	// GitLabKAS is GitLab's KAS binary (see GitLabKASPath). If it, GitLab's
	// agentk and redis-server are at hand, GitLab's KAS runs in front of
	// the Rails stand-in with GitLab's agentk connected to it, and every
	// cell of the request tables is also measured through it, right after
	// the same cell through our Caddy. Otherwise its rows are left out and
	// the report says why.
	GitLabKAS string
	// Log receives progress lines.
	Log io.Writer
}

// GitLabAgentkEnv names the environment variable with the path of GitLab's
// agentk, and GitLabAgentkDefault is where it is otherwise, relative to the
// module root: next to the checkout, as for the integration tests.
const (
	GitLabAgentkEnv     = "GITLAB_AGENTK_BIN"
	GitLabAgentkDefault = "../shared/gitlab-agent-v16.5/agentk"
)

// GitLabAgentkPath is the default of Config.GitLabAgentk for the module at
// root: $GITLAB_AGENTK_BIN, else GitLabAgentkDefault relative to root.
func GitLabAgentkPath(root string) string {
	return pathFromEnv(GitLabAgentkEnv, root, GitLabAgentkDefault)
}

// GitLabKASEnv names the environment variable with the path of GitLab's
// KAS, and GitLabKASDefault is where it is otherwise, relative to the
// module root: beside GitLab's agentk, as for the integration tests.
const (
	GitLabKASEnv     = "GITLAB_KAS_BIN"
	GitLabKASDefault = "../shared/gitlab-agent-v16.5/kas"
)

// GitLabKASPath is the default of Config.GitLabKAS for the module at root:
// $GITLAB_KAS_BIN, else GitLabKASDefault relative to root.
func GitLabKASPath(root string) string {
	return pathFromEnv(GitLabKASEnv, root, GitLabKASDefault)
}

// pathFromEnv is the path in the environment variable env, else def (a
// slash-separated path) relative to root.
func pathFromEnv(env, root, def string) string {
	if p := os.Getenv(env); p != "" {
		return p
	}
	return filepath.Join(root, filepath.FromSlash(def))
}

// DefaultConfig is the full run documented in docs/benchmarks.md.
func DefaultConfig() Config {
	return Config{
		Release:         true,
		Phase:           3 * time.Second,
		Warmup:          500 * time.Millisecond,
		MaxOps:          1_000_000,
		Concurrency:     []int{1, 16, 128},
		BulkConcurrency: []int{1, 8},
		WatchStreams:    []int{100, 1000},
		WatchLines:      300,
		ProfileConc:     16,
		HoldStreams:     1000,
		InFlight:        200,
		ScaleAgents:     []int{1000, 5000, 10000},
		IdleWindow:      20 * time.Second,
		Sources:         10,
		Settle:          2 * time.Second,
	}
}

// QuickConfig is a tiny run for the smoke test: every measurement, a few
// requests each.
func QuickConfig() Config {
	return Config{
		// Long enough for the CPU of a few requests to show in the
		// processes' clock ticks (10 ms) on a loaded machine.
		Phase:           250 * time.Millisecond,
		Warmup:          20 * time.Millisecond,
		Settle:          200 * time.Millisecond,
		MaxOps:          200,
		Concurrency:     []int{1, 4},
		BulkConcurrency: []int{1},
		WatchStreams:    []int{10},
		WatchLines:      10,
		ProfileConc:     4,
		HoldStreams:     20,
		InFlight:        8,
		ScaleAgents:     []int{10},
		IdleWindow:      time.Second,
		Sources:         2,
	}
}

// Run builds the binaries, starts the upstream, Caddy and agentk on
// 127.0.0.1, measures and returns the report. Everything it starts is
// stopped before it returns.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	logw := cfg.Log
	if logw == nil {
		logw = io.Discard
	}
	logf := func(format string, args ...any) { fmt.Fprintf(logw, "kasbench: "+format+"\n", args...) }
	rep := &Report{Config: cfg, Started: time.Now()}
	rep.Machine = describeMachine()

	limit, err := raiseFileLimit()
	if err != nil {
		return nil, err
	}
	rep.FileLimit = limit
	dir, err := os.MkdirTemp("", "kasbench-")
	if err != nil {
		return nil, fmt.Errorf("creating a temp dir: %w", err)
	}
	defer os.RemoveAll(dir)

	logf("building caddy, agentk and agentsim")
	bins, err := build(ctx, cfg.Root, filepath.Join(dir, "bin"), cfg.Release, true, logw)
	if err != nil {
		return nil, err
	}
	if st, err := os.Stat(bins.agentk); err == nil {
		rep.AgentkBinary = st.Size()
	}
	if st, err := os.Stat(bins.caddy); err == nil {
		rep.CaddyBinary = st.Size()
	}
	p, err := newPKI(dir)
	if err != nil {
		return nil, err
	}
	up, err := startUpstream(p)
	if err != nil {
		return nil, err
	}
	defer up.close()

	gitlabBin := findGitLabAgentk(ctx, cfg, rep)
	if gitlabBin != "" {
		logf("GitLab's agentk %s", rep.GitLabAgentk)
	} else {
		logf("GitLab's agentk: %s", rep.GitLabAgentkNote)
	}
	stacks := []binaries{bins}
	if cfg.BaselineRoot != "" {
		logf("building the baseline")
		base, err := build(ctx, cfg.BaselineRoot, filepath.Join(dir, "bin-baseline"), cfg.Release, false, logw)
		if err != nil {
			return rep, err
		}
		stacks = append(stacks, base)
	}
	var nodes *crossNode
	redisBin, redisVersion, note := findRedis(ctx, cfg)
	rep.Redis, rep.CrossNodeNote = redisVersion, note
	anchors := startAnchors(ctx, cfg, rep, bins, p, up, filepath.Join(dir, "anchors"), logf)
	defer anchors.stop()
	if redisBin != "" {
		logf("starting redis-server %s, two caddy nodes and agentk on node B", redisVersion)
		if nodes, err = startCrossNode(ctx, cfg, bins, redisBin, p, up, filepath.Join(dir, "nodes")); err != nil {
			return rep, err
		}
		defer nodes.stop()
	} else {
		logf("cross-node: %s", note)
	}
	if err := runRequests(ctx, cfg, rep, stacks, gitlabBin, anchors, nodes, p, up, dir, logf); err != nil {
		return rep, err
	}
	if len(cfg.ScaleAgents) > 0 {
		if err := runScale(ctx, cfg, rep, bins, p, filepath.Join(dir, "scale"), logf); err != nil {
			return rep, err
		}
	}
	rep.Finished = time.Now()
	return rep, nil
}

// findGitLabAgentk returns the absolute path of GitLab's agentk and puts
// its version into rep, or returns "" and puts into rep why its rows are
// left out. Its absence never fails a run.
func findGitLabAgentk(ctx context.Context, cfg Config, rep *Report) string {
	switch {
	case cfg.Skip["gitlab"]:
		rep.GitLabAgentkNote = "rows left out (-skip gitlab)"
		return ""
	case cfg.GitLabAgentk == "":
		rep.GitLabAgentkNote = "rows left out: no binary given"
		return ""
	}
	bin, err := filepath.Abs(cfg.GitLabAgentk)
	if err == nil {
		_, err = os.Stat(bin)
	}
	if err != nil {
		rep.GitLabAgentkNote = fmt.Sprintf("rows left out: no binary (give it with -gitlab-agentk or %s, or put it at %s relative to the module root)",
			GitLabAgentkEnv, GitLabAgentkDefault)
		return ""
	}
	v, err := gitlabVersion(ctx, bin, "agentk")
	if err != nil {
		rep.GitLabAgentkNote = "rows left out: its --version failed: " + withoutPath(err, bin, "<GitLab's agentk>")
		return ""
	}
	rep.GitLabAgentk = v
	if st, err := os.Stat(bin); err == nil {
		rep.GitLabAgentkBinary = st.Size()
	}
	return bin
}

// gitlabVersion runs GitLab's program bin (agentk or kas, named name) with
// --version and returns its version and commit, as in "v16.5.0-stock,
// commit: 8daa08cc" of "agentk version v16.5.0-stock, commit: 8daa08cc,
// built: ...".
func gitlabVersion(ctx context.Context, bin, name string) (string, error) {
	vctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(vctx, bin, "--version").Output()
	if err != nil {
		return "", err
	}
	v, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	v = strings.TrimPrefix(v, name+" version ")
	v, _, _ = strings.Cut(v, ", built")
	return v, nil
}

// withoutPath is err's text with the binary's path, which belongs to the
// machine and not to the report, replaced by label.
func withoutPath(err error, bin, label string) string {
	return strings.ReplaceAll(err.Error(), bin, label)
}

// stack is one Caddy and agentk under test, with its clients; the stack
// of the binaries under test may also have GitLab's agentk, connected to
// the same Caddy as a second agent.
type stack struct {
	variant string // "" for the binaries under test, " (baseline)"
	caddy   *caddyServer
	agent   *agentkProcess
	h1, h2  target
	// gitlab is GitLab's agentk, reached through gh1 and gh2; nil when
	// it is not measured.
	gitlab   *agentkProcess
	gh1, gh2 target
}

func (s *stack) stop() {
	closeClients(s.h1, s.h2, s.gh1, s.gh2)
	if s.gitlab != nil {
		s.gitlab.proc.stop()
	}
	if s.agent != nil {
		s.agent.proc.stop()
	}
	s.caddy.proc.stop()
}

// route is how one proxied row reaches the upstream: the Caddy the
// clients send to, the Caddy that holds the agent's tunnel if that is
// another node, and the agent process, whose CPU a cell counts; and what
// its profiles are named.
type route struct {
	// caddy is the server the clients send to. In the row of GitLab's
	// KAS it is that KAS: only proc is set, and without an admin API it
	// is not profiled.
	caddy *caddyServer
	// holder is the node that the agent is connected to, which caddy
	// forwards each request to; nil when it is caddy itself.
	holder *caddyServer
	// agent is nil in the row of Caddy's own reverse_proxy, which
	// reaches the upstream without one.
	agent         *agentkProcess
	t             target
	profileSuffix string
}

// routes are the proxied rows of s for proto, ours first.
func (s *stack) routes(proto string) []route {
	t, g := s.h1, s.gh1
	if proto == "h2" {
		t, g = s.h2, s.gh2
	}
	rs := []route{{caddy: s.caddy, agent: s.agent, t: t, profileSuffix: fileSuffix(s.variant)}}
	if s.gitlab != nil {
		rs = append(rs, route{caddy: s.caddy, agent: s.gitlab, t: g, profileSuffix: fileSuffix(s.variant) + "-gitlab-agentk"})
	}
	return rs
}

// startStack starts Caddy and agentk from bins, and GitLab's agentk
// gitlabBin (if not empty) next to it. GitLab's agentk failing to start
// leaves its rows out (with the reason in *gitlabNote) but the stack up.
func startStack(ctx context.Context, cfg Config, bins binaries, gitlabBin string, gitlabNote *string, p *pki, up *upstream, dir, variant string, logf func(string, ...any)) (*stack, error) {
	env, agentEnv := cfg.CaddyEnv, cfg.AgentkEnv
	if variant != "" {
		env, agentEnv = cfg.BaselineCaddyEnv, cfg.BaselineAgentkEnv
	}
	caddy, err := startCaddy(ctx, bins.caddy, dir, p, 0, gitlabBin != "", env, nil)
	if err != nil {
		return nil, err
	}
	s := &stack{variant: variant, caddy: caddy}
	auth := "Bearer pat:1:" + caddy.userTok
	s.h1 = target{name: "single node", variant: variant, proto: "h1", client: newClient(p.pool, false), base: caddy.proxyURL, auth: auth}
	s.h2 = target{name: "single node", variant: variant, proto: "h2", client: newClient(p.pool, true), base: caddy.proxyURL, auth: auth}
	kubeconfig, err := writeKubeconfig(dir, p, up)
	if err != nil {
		s.stop()
		return nil, err
	}
	if s.agent, err = startAgentk(ctx, bins.agentk, dir, p, caddy, kubeconfig, agentEnv); err != nil {
		s.stop()
		return nil, err
	}
	for _, t := range []target{s.h1, s.h2} { // the path works before anything is measured
		if err := t.do(ctx, nil, http.MethodGet, "/1k", nil); err != nil {
			s.stop()
			return nil, fmt.Errorf("first request through caddy%s (%s): %w", variant, t.proto, err)
		}
	}
	if gitlabBin == "" {
		return s, nil
	}
	name := "single node, GitLab agentk"
	gauth := fmt.Sprintf("Bearer pat:%d:%s", gitlabAgentID, caddy.userTok)
	gh1 := target{name: name, variant: variant, proto: "h1", client: newClient(p.pool, false), base: caddy.proxyURL, auth: gauth}
	gh2 := target{name: name, variant: variant, proto: "h2", client: newClient(p.pool, true), base: caddy.proxyURL, auth: gauth}
	g, err := startGitLabAgentk(ctx, gitlabBin, dir, p, caddy.agentURL, filepath.Join(caddy.dir, "gitlab-agent.token"), kubeconfig, gh2)
	if err == nil {
		if err = gh1.do(ctx, nil, http.MethodGet, "/1k", nil); err != nil {
			g.proc.stop()
			err = fmt.Errorf("first HTTP/1.1 request through GitLab's agentk: %w", err)
		}
	}
	if err != nil {
		gh1.client.CloseIdleConnections()
		gh2.client.CloseIdleConnections()
		if ctx.Err() != nil {
			s.stop()
			return nil, ctx.Err()
		}
		logf("GitLab's agentk did not start: %v; its log ends:\n%s", err, logTail(dir, "gitlab-agentk", 20))
		*gitlabNote = "rows left out: it did not start: " + withoutPath(err, gitlabBin, "<GitLab's agentk>")
		return s, nil
	}
	s.gitlab, s.gh1, s.gh2 = g, gh1, gh2
	return s, nil
}

// runRequests measures client → Caddy → agentk → upstream against the
// upstream reached directly. With a baseline, its stack runs at the same
// time and each of its cells is measured right after the same cell of
// the main stack (and of GitLab's agentk), so that all are compared with
// the same direct cell.
//
// gitlabBin, if not empty, is GitLab's agentk: it connects to the Caddy of
// the binaries under test (not the baseline's) as a second agent, and each
// of its cells is measured right after the same cell through our agentk.
//
// anchors are Caddy's own reverse_proxy and GitLab's KAS (each may be
// missing): each of their cells is measured right after the same cell of
// the binaries under test (and of GitLab's agentk behind our Caddy).
//
// nodes, if not nil, are two nodes of the binaries under test: each cell
// is also measured through node A to the agent on node B, last, and
// compared with the same direct and single-node cells.
func runRequests(ctx context.Context, cfg Config, rep *Report, bins []binaries, gitlabBin string, anchors *anchors, nodes *crossNode, p *pki, up *upstream, dir string, logf func(string, ...any)) error {
	var stacks []*stack
	defer func() {
		for _, s := range stacks {
			s.stop()
		}
	}()
	for i, b := range bins {
		variant, gitlab := "", gitlabBin
		if i > 0 {
			variant, gitlab = " (baseline)", ""
		}
		what := ""
		if gitlab != "" {
			what = " and GitLab's agentk"
		}
		logf("starting caddy and agentk%s%s", variant, what)
		s, err := startStack(ctx, cfg, b, gitlab, &rep.GitLabAgentkNote, p, up, filepath.Join(dir, fmt.Sprintf("stack%d", i)), variant, logf)
		if err != nil {
			return err
		}
		stacks = append(stacks, s)
	}
	if stacks[0].gitlab == nil {
		rep.GitLabAgentk = ""
	}
	main := stacks[0]
	sleep(ctx, cfg.Settle)
	admin := &http.Client{Timeout: time.Minute}
	var err error
	if rep.CaddyIdle, err = readMemory(main.caddy.proc.pid()); err != nil {
		return err
	}
	if rep.AgentkIdle, err = readMemory(main.agent.proc.pid()); err != nil {
		return err
	}
	if main.gitlab != nil {
		if rep.GitLabAgentkIdle, err = readMemory(main.gitlab.proc.pid()); err != nil {
			return err
		}
	}

	direct := map[string]target{
		"h1": {name: "direct", proto: "h1", client: newClient(p.pool, false), base: up.url},
		"h2": {name: "direct", proto: "h2", client: newClient(p.pool, true), base: up.url},
	}
	defer func() {
		for _, t := range direct {
			t.client.CloseIdleConnections()
		}
	}()

	// routeCounters are the counters so far of rt's Caddy, of its holder
	// and of its agent; zero for a route without a holder or an agent (the
	// floor has no agent).
	routeCounters := func(rt *route) (server, holder, agent procCounters) {
		server = readCounters(rt.caddy.proc.pid())
		if rt.holder != nil {
			holder = readCounters(rt.holder.proc.pid())
		}
		if rt.agent != nil {
			agent = readCounters(rt.agent.proc.pid())
		}
		return server, holder, agent
	}
	// profiles are the admin URLs of the Caddys of rt to profile, by file
	// name: with a holder, both nodes, as <profile>-node-a and -node-b.
	profiles := func(rt *route, profile string) map[string]string {
		if rt.caddy.adminURL == "" {
			return nil // GitLab's KAS
		}
		if rt.holder == nil {
			return map[string]string{profile: rt.caddy.adminURL}
		}
		base := strings.TrimSuffix(profile, ".pprof")
		return map[string]string{base + "-node-a.pprof": rt.caddy.adminURL, base + "-node-b.pprof": rt.holder.adminURL}
	}
	// measure runs one cell against t, which goes through rt (nil:
	// direct); the CPU counted is that of rt's Caddy, its holder if any
	// and its agent.
	measure := func(rt *route, t target, conc int, op func(context.Context, *meter) error, profile string) cell {
		var server0, server1, agent0, agent1, holder0, holder1 procCounters
		var prof sync.WaitGroup
		mark := func(start bool) {
			if rt == nil {
				return
			}
			if start {
				server0, holder0, agent0 = routeCounters(rt)
				if profile != "" && cfg.ProfileDir != "" {
					for name, adminURL := range profiles(rt, profile) {
						prof.Add(1)
						go func() { // owned by measure: waited for below
							defer prof.Done()
							saveProfile(admin, adminURL, cfg.Phase, filepath.Join(cfg.ProfileDir, name))
						}()
					}
				}
			} else {
				server1, holder1, agent1 = routeCounters(rt)
			}
		}
		r := runLoad(ctx, conc, cfg.Warmup, cfg.Phase, cfg.MaxOps, mark, op)
		prof.Wait()
		c := cell{target: t.label(), conc: conc, res: r}
		if rt != nil && r.requests > 0 {
			c.server, c.holder, c.agent = server1.sub(server0), holder1.sub(holder0), agent1.sub(agent0)
			c.cpu = c.server.cpu + c.holder.cpu + c.agent.cpu
			c.cpuPerOp = c.cpu / time.Duration(r.requests)
		}
		return c
	}
	// each runs one cell directly, then through every route of every
	// stack: ours, GitLab's agentk, Caddy's own reverse_proxy, GitLab's
	// KAS, the baseline; then across nodes.
	each := func(proto string, f func(r *route, t target)) {
		f(nil, direct[proto])
		for i, s := range stacks {
			routes := s.routes(proto)
			if i == 0 {
				routes = append(routes, anchors.routes(proto)...)
			}
			for _, r := range routes {
				f(&r, r.t)
			}
		}
		if nodes != nil {
			r := nodes.route(proto)
			f(&r, r.t)
		}
	}

	for _, conc := range cfg.Concurrency {
		if cfg.Skip["small"] {
			break
		}
		for _, proto := range []string{"h1", "h2"} {
			each(proto, func(r *route, t target) {
				logf("1 KiB GET, %s, c=%d", t.label(), conc)
				profile := ""
				if r != nil && conc == cfg.ProfileConc && proto == "h2" {
					profile = fmt.Sprintf("caddy-1k-c%d-h2%s.pprof", conc, r.profileSuffix)
				}
				op := func(ctx context.Context, m *meter) error { return t.do(ctx, m, http.MethodGet, "/1k", nil) }
				rep.Small = append(rep.Small, measure(r, t, conc, op, profile))
			})
		}
	}
	large := make([]byte, largeSize)
	for _, op := range []string{"GET", "PUT"} {
		if cfg.Skip["bulk"] {
			break
		}
		for _, conc := range cfg.BulkConcurrency {
			for _, proto := range []string{"h1", "h2"} {
				each(proto, func(r *route, t target) {
					logf("10 MiB %s, %s, c=%d", op, t.label(), conc)
					f := func(ctx context.Context, m *meter) error { return t.do(ctx, m, http.MethodGet, "/10m", nil) }
					if op == "PUT" {
						f = func(ctx context.Context, m *meter) error { return t.do(ctx, m, http.MethodPut, "/sink", large) }
					}
					profile := ""
					if r != nil && op == "GET" && conc == cfg.BulkConcurrency[len(cfg.BulkConcurrency)-1] && proto == "h2" {
						profile = fmt.Sprintf("caddy-10m-get-c%d-h2%s.pprof", conc, r.profileSuffix)
					}
					c := measure(r, t, conc, f, profile)
					c.op = op
					rep.Bulk = append(rep.Bulk, c)
				})
			}
		}
	}
	for _, n := range cfg.WatchStreams {
		if cfg.Skip["watch"] {
			break
		}
		each("h2", func(r *route, t target) {
			logf("%d watch streams, %s", n, t.label())
			var server0, holder0, agent0 procCounters
			if r != nil {
				server0, holder0, agent0 = routeCounters(r)
			}
			w := runWatches(ctx, t, up, n, cfg.WatchLines)
			wc := watchCell{target: t.label(), watchResult: w}
			if r != nil {
				server1, holder1, agent1 := routeCounters(r)
				wc.cpu = server1.sub(server0).cpu + holder1.sub(holder0).cpu + agent1.sub(agent0).cpu
			}
			rep.Watches = append(rep.Watches, wc)
		})
	}
	if cfg.HoldStreams > 0 && !cfg.Skip["stalled"] {
		for _, s := range stacks {
			logf("stalled reader%s: %d open streams, %d in flight", s.variant, cfg.HoldStreams, cfg.InFlight)
			res, err := runStalled(ctx, cfg, s.h2)
			if err != nil {
				return err
			}
			if s == main {
				rep.Stalled = res
			} else {
				rep.StalledBaseline = res
			}
		}
	}

	if rep.CaddyEnd, err = readMemory(main.caddy.proc.pid()); err != nil {
		return err
	}
	if rep.AgentkEnd, err = readMemory(main.agent.proc.pid()); err != nil {
		return err
	}
	if main.gitlab != nil {
		if rep.GitLabAgentkEnd, err = readMemory(main.gitlab.proc.pid()); err != nil {
			return err
		}
	}
	return nil
}

// fileSuffix turns a variant label into part of a file name.
func fileSuffix(variant string) string {
	if variant == "" {
		return ""
	}
	return "-" + strings.Trim(strings.TrimSpace(variant), "()")
}

// saveProfile fetches a CPU profile of d from Caddy's admin API.
func saveProfile(client *http.Client, adminURL string, d time.Duration, path string) {
	secs := max(int(d.Seconds()), 1)
	saveURL(client, adminURL+"/debug/pprof/profile?seconds="+strconv.Itoa(secs), path)
}

// saveURL saves what url answers to path; profiles are best effort.
func saveURL(client *http.Client, url, path string) {
	resp, err := client.Get(url)
	if err != nil {
		return
	}
	defer resp.Body.Close()
	f, err := os.Create(path)
	if err != nil {
		return
	}
	defer f.Close()
	io.Copy(f, resp.Body)
}

// runStalled measures InFlight concurrent 1 KiB requests on an agent that
// also carries HoldStreams open streams, first alone, then next to one
// reader that has stopped reading a large response.
func runStalled(ctx context.Context, cfg Config, t target) (*stalledResult, error) {
	holdCtx, cancelHolds := context.WithCancel(ctx)
	defer cancelHolds()
	var (
		wg     sync.WaitGroup
		opened sync.WaitGroup
		broken atomic.Int64 // streams that ended before the measurement did
		failed atomic.Int64 // streams that did not open
	)
	holdFor := 4*(cfg.Phase+cfg.Warmup) + 30*time.Second
	for range cfg.HoldStreams {
		wg.Add(1)
		opened.Add(1)
		go func() { // owned by runStalled: ends when holdCtx is cancelled
			defer wg.Done()
			req, _ := t.request(holdCtx, http.MethodGet, "/hold?for="+holdFor.String(), nil, 0)
			resp, err := t.client.Do(req)
			if err != nil {
				failed.Add(1)
				opened.Done()
				return
			}
			defer resp.Body.Close()
			br := bufio.NewReader(resp.Body)
			_, err = br.ReadString('\n')
			opened.Done()
			if err != nil {
				failed.Add(1)
				return
			}
			_, err = br.ReadByte()
			if holdCtx.Err() == nil {
				broken.Add(1)
			}
		}()
	}
	opened.Wait()
	op := func(ctx context.Context, m *meter) error { return t.do(ctx, m, http.MethodGet, "/1k", nil) }
	res := &stalledResult{holds: cfg.HoldStreams, inFlight: cfg.InFlight}
	res.alone = runLoad(ctx, cfg.InFlight, cfg.Warmup, cfg.Phase, cfg.MaxOps, nil, op)

	// One reader asks for an endless body, reads a little and stops.
	stallCtx, cancelStall := context.WithCancel(ctx)
	defer cancelStall()
	req, _ := t.request(stallCtx, http.MethodGet, "/endless", nil, 0)
	resp, err := t.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("stalled reader: %w", err)
	}
	if _, err := io.CopyN(io.Discard, resp.Body, 64<<10); err != nil {
		resp.Body.Close()
		return nil, fmt.Errorf("stalled reader: %w", err)
	}
	sleep(ctx, cfg.Settle) // every buffer on the way fills up
	res.stalled = runLoad(ctx, cfg.InFlight, cfg.Warmup, cfg.Phase, cfg.MaxOps, nil, op)
	// The stalled stream is still there, and still gives data when read.
	if _, err := io.CopyN(io.Discard, resp.Body, 1<<20); err != nil {
		res.stallErr = err
	}
	resp.Body.Close()
	cancelStall()

	res.broken = broken.Load()
	res.failed = failed.Load()
	cancelHolds()
	wg.Wait()
	return res, nil
}

// runScale connects ScaleAgents simulated agents to a fresh Caddy step by
// step and measures what each costs.
func runScale(ctx context.Context, cfg Config, rep *Report, bins binaries, p *pki, dir string, logf func(string, ...any)) error {
	maxAgents := cfg.ScaleAgents[len(cfg.ScaleAgents)-1]
	logf("starting caddy with %d declared agents", maxAgents)
	caddy, err := startCaddy(ctx, bins.caddy, dir, p, maxAgents, false, cfg.CaddyEnv, nil)
	if err != nil {
		return err
	}
	defer caddy.proc.stop()
	admin := &http.Client{Timeout: time.Minute}
	metricsURL, gcURL := caddy.adminURL+"/metrics", caddy.adminURL+"/debug/pprof/heap?gc=1"

	sleep(ctx, cfg.Settle)
	base := scaleStep{}
	if base.caddy, err = readMemory(caddy.proc.pid()); err != nil {
		return err
	}
	if base.goStats, err = readGoStats(admin, metricsURL, gcURL); err != nil {
		return err
	}
	rep.ScaleBase = base

	sources := make([]string, max(cfg.Sources, 1))
	for i := range sources {
		sources[i] = net.IPv4(127, 0, 0, byte(2+i)).String()
	}
	var sims []*simProcess
	defer func() {
		for _, s := range sims {
			s.stop()
		}
	}()
	connected := 0
	for _, n := range cfg.ScaleAgents {
		add := n - connected
		if add <= 0 {
			continue
		}
		logf("connecting %d more idle agents (%d in all)", add, n)
		start := time.Now()
		s, err := startSim(ctx, bins.agentsim, dir, caddy, p, caddy.simFirstID+connected, add, sources, len(sims))
		if s != nil {
			sims = append(sims, s)
		}
		if err != nil {
			return err
		}
		connected = n
		step := scaleStep{agents: n, connectTime: time.Since(start)}
		for _, s := range sims {
			step.connected += s.connected
			step.failed += s.failed
		}
		sleep(ctx, cfg.Settle) // handshakes' garbage, first PINGs
		if step.goStats, err = readGoStats(admin, metricsURL, gcURL); err != nil {
			return err
		}
		if step.caddy, err = readMemory(caddy.proc.pid()); err != nil {
			return err
		}
		if cfg.ProfileDir != "" {
			saveURL(admin, caddy.adminURL+"/debug/pprof/heap", filepath.Join(cfg.ProfileDir, fmt.Sprintf("caddy-heap-%d-agents.pprof", n)))
			saveURL(admin, caddy.adminURL+"/debug/pprof/goroutine", filepath.Join(cfg.ProfileDir, fmt.Sprintf("caddy-goroutines-%d-agents.pprof", n)))
		}
		c0, _ := cpuTime(caddy.proc.pid())
		var s0 time.Duration
		for _, s := range sims {
			d, _ := cpuTime(s.proc.pid())
			s0 += d
		}
		sleep(ctx, cfg.IdleWindow)
		c1, _ := cpuTime(caddy.proc.pid())
		var s1 time.Duration
		for _, s := range sims {
			d, _ := cpuTime(s.proc.pid())
			s1 += d
		}
		step.window = cfg.IdleWindow
		step.caddyCPU, step.simCPU = c1-c0, s1-s0
		for _, s := range sims {
			m, _ := readMemory(s.proc.pid())
			step.simRSS += m.rss
		}
		rep.Scale = append(rep.Scale, step)
	}
	for _, s := range sims {
		s.stop()
		rep.ScaleLost += s.lost
	}
	sims = nil
	return nil
}

// simProcess is one running agentsim.
type simProcess struct {
	proc              *process
	stdin             io.WriteCloser
	lines             *bufio.Scanner
	connected, failed int
	lost              int
}

// startSim starts agentsim for count agents from firstID and waits until
// every handshake is done.
func startSim(ctx context.Context, bin, dir string, c *caddyServer, p *pki, firstID, count int, sources []string, n int) (*simProcess, error) {
	cmd := exec.Command(bin,
		"-url", c.agentURL, "-ca", p.caFile,
		"-first-id", strconv.Itoa(firstID), "-count", strconv.Itoa(count),
		"-token-prefix", c.simTokenPrefix, "-sources", strings.Join(sources, ","))
	cmd.Dir = dir
	stderr, err := os.Create(filepath.Join(dir, fmt.Sprintf("agentsim-%d.log", n)))
	if err != nil {
		return nil, fmt.Errorf("creating the agentsim log: %w", err)
	}
	cmd.Stderr = stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("agentsim stdout: %w", err)
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("agentsim stdin: %w", err)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		stderr.Close()
		return nil, fmt.Errorf("starting agentsim: %w", err)
	}
	s := &simProcess{proc: &process{name: "agentsim", cmd: cmd, done: make(chan struct{})}, stdin: stdin, lines: bufio.NewScanner(stdout)}
	ready := make(chan error, 1)
	go func() { // owned by s: reads stdout until agentsim exits
		var readyErr error = errors.New("agentsim exited before it was ready")
		for s.lines.Scan() {
			f := strings.Fields(s.lines.Text())
			if len(f) == 3 && f[0] == "ready" {
				s.connected, _ = strconv.Atoi(f[1])
				s.failed, _ = strconv.Atoi(f[2])
				ready <- nil
				readyErr = nil
			}
			if len(f) == 3 && f[0] == "done" {
				s.lost, _ = strconv.Atoi(f[2])
			}
		}
		if readyErr != nil {
			ready <- readyErr
		}
		s.proc.err = cmd.Wait()
		stderr.Close()
		close(s.proc.done)
	}()
	select {
	case err := <-ready:
		if err != nil {
			s.stop()
			return nil, fmt.Errorf("%w (see agentsim-%d.log)", err, n)
		}
		return s, nil
	case <-ctx.Done():
		s.stop()
		return nil, ctx.Err()
	}
}

// stop closes agentsim's stdin, which makes it close its tunnels and exit.
func (s *simProcess) stop() {
	s.stdin.Close()
	select {
	case <-s.proc.done:
	case <-time.After(30 * time.Second):
		s.proc.cmd.Process.Kill()
		<-s.proc.done
	}
}
