// Command kasbench measures caddy-kas next to a direct connection to the
// same upstream, in one run on 127.0.0.1, and prints the tables of
// docs/benchmarks.md:
//
//	go run ./bench/cmd/kasbench                          # full run, about 6–7 minutes
//	go run ./bench/cmd/kasbench -write docs/benchmarks.md
//	go run ./bench/cmd/kasbench -quick                   # a few requests of everything
//
// It builds cmd/caddy and cmd/agentk like a release, starts an upstream
// (HTTPS, HTTP/1.1 and HTTP/2), Caddy with a throwaway certificate and
// agentk, and measures each load directly and through Caddy and agentk.
// If GitLab's agentk is at hand (-gitlab-agentk), it connects to the same
// Caddy as a second agent and each load is measured through it too. If
// redis-server is on PATH, two more Caddy nodes share their tunnels through
// it, a second agentk connects to node B, and each load is also measured
// sent to node A, which forwards it to node B (-skip nodes leaves this out).
// Two more rows put ours in context: a Caddy of its own proxying with its
// stock reverse_proxy straight to the upstream, the floor (-skip floor);
// and GitLab's KAS (-gitlab-kas) with GitLab's agentk, in front of a Rails
// stand-in and a redis-server, the anchor (-skip gitlabkas).
// Every load is bounded in time and count and aimed at 127.0.0.x only.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/caddy-kas/caddy-kas/bench/kasbench"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "kasbench: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	quick := flag.Bool("quick", false, "a tiny run: a few requests of every measurement, 10 idle agents")
	write := flag.String("write", "", "write the results into this markdown file (the part between the kasbench markers)")
	phase := flag.Duration("phase", 0, "measured time of one table cell (default 3s)")
	agents := flag.String("agents", "", "comma-separated idle agent counts, increasing (default 1000,5000,10000; \"none\" skips)")
	idle := flag.Duration("idle-window", 0, "how long idle CPU is measured at each agent count (default 20s)")
	profiles := flag.String("pprof", "", "directory for CPU profiles of Caddy (of both nodes across nodes) during the 1 KiB c=16 and 10 MiB GET c=8 HTTP/2 phases")
	root := flag.String("root", ".", "module root to build from")
	baseline := flag.String("baseline", "", "a second source tree (the code before a change) measured in the same run, rows marked (baseline)")
	var caddyEnv stringsFlag
	flag.Var(&caddyEnv, "caddy-env", "`KEY=VALUE` added to Caddy's environment (repeatable)")
	var baselineCaddyEnv stringsFlag
	flag.Var(&baselineCaddyEnv, "baseline-caddy-env", "`KEY=VALUE` added to the baseline Caddy's environment instead of -caddy-env (repeatable)")
	var agentkEnv stringsFlag
	flag.Var(&agentkEnv, "agentk-env", "`KEY=VALUE` added to agentk's environment (repeatable)")
	var baselineAgentkEnv stringsFlag
	flag.Var(&baselineAgentkEnv, "baseline-agentk-env", "`KEY=VALUE` added to the baseline agentk's environment instead of -agentk-env (repeatable)")
	skip := flag.String("skip", "", "comma-separated measurements to leave out: small, bulk, watch, stalled, gitlab (GitLab's agentk's rows), nodes (the cross-node rows), floor (Caddy's own reverse_proxy's rows), gitlabkas (GitLab's KAS's rows)")
	gitlabAgentk := flag.String("gitlab-agentk", os.Getenv(kasbench.GitLabAgentkEnv),
		"GitLab's agentk binary, measured behind the same Caddy next to ours (default $"+kasbench.GitLabAgentkEnv+", else "+kasbench.GitLabAgentkDefault+" relative to -root); if absent, its rows are left out")
	gitlabKAS := flag.String("gitlab-kas", os.Getenv(kasbench.GitLabKASEnv),
		"GitLab's KAS binary, measured with GitLab's agentk as the anchor row (default $"+kasbench.GitLabKASEnv+", else "+kasbench.GitLabKASDefault+" relative to -root); if absent, its rows are left out")
	release := flag.Bool("release", true, "build stripped binaries with -trimpath, like a release (false keeps symbols for perf)")
	flag.Parse()

	cfg := kasbench.DefaultConfig()
	if *quick {
		cfg = kasbench.QuickConfig()
	}
	cfg.Release = *release
	cfg.Skip = map[string]bool{}
	for _, s := range strings.Split(*skip, ",") {
		if s != "" {
			cfg.Skip[s] = true
		}
	}
	if *phase > 0 {
		cfg.Phase = *phase
	}
	if *idle > 0 {
		cfg.IdleWindow = *idle
	}
	if *agents != "" {
		cfg.ScaleAgents = nil
		if *agents != "none" {
			for _, s := range strings.Split(*agents, ",") {
				var n int
				if _, err := fmt.Sscan(s, &n); err != nil || n <= 0 {
					return fmt.Errorf("-agents: %q is not a positive number", s)
				}
				cfg.ScaleAgents = append(cfg.ScaleAgents, n)
			}
		}
	}
	if *profiles != "" {
		if err := os.MkdirAll(*profiles, 0o755); err != nil {
			return err
		}
	}
	cfg.ProfileDir = *profiles
	cfg.Root = *root
	cfg.BaselineRoot = *baseline
	cfg.GitLabAgentk = *gitlabAgentk
	if cfg.GitLabAgentk == "" {
		cfg.GitLabAgentk = kasbench.GitLabAgentkPath(*root)
	}
	cfg.GitLabKAS = *gitlabKAS
	if cfg.GitLabKAS == "" {
		cfg.GitLabKAS = kasbench.GitLabKASPath(*root)
	}
	cfg.CaddyEnv = caddyEnv
	cfg.BaselineCaddyEnv = baselineCaddyEnv
	cfg.AgentkEnv = agentkEnv
	cfg.BaselineAgentkEnv = baselineAgentkEnv
	cfg.Log = os.Stderr

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	rep, err := kasbench.Run(ctx, cfg)
	if err != nil {
		return err
	}
	command := "go run ./bench/cmd/kasbench"
	flag.Visit(func(f *flag.Flag) {
		v := f.Value.String()
		// Absolute paths are of this machine and say nothing to a
		// reader of the results.
		placeholders := map[string]string{"baseline": "<tree before the change>", "pprof": "<profile dir>", "write": "<file>", "root": "<module root>", "gitlab-agentk": "<GitLab's agentk>", "gitlab-kas": "<GitLab's KAS>"}
		if p, ok := placeholders[f.Name]; ok && filepath.IsAbs(v) {
			v = p
		}
		command += " -" + f.Name + "=" + v
	})
	fmt.Println(rep.Header(command))
	fmt.Println(rep.Targets())
	fmt.Println(rep.Tables())
	if *write != "" {
		if err := rep.WriteDoc(*write, command); err != nil {
			return err
		}
	}
	return rep.Sane()
}

// stringsFlag collects a repeated flag.
type stringsFlag []string

func (f *stringsFlag) String() string { return strings.Join(*f, " ") }

func (f *stringsFlag) Set(s string) error {
	*f = append(*f, s)
	return nil
}
