package kasbench

import (
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"

	"github.com/caddy-kas/caddy-kas/integration/fakegitlab"
)

// anchors are the rows that put ours in context, measured in the same run
// on the same upstream with the same clients: the floor, Caddy's own
// reverse_proxy, which is what Caddy costs without our modules and an
// agent; and the anchor, GitLab's KAS with GitLab's agentk, the program we
// replace. Either may be missing; the report says why.
type anchors struct {
	rep              *Report
	floor            *caddyServer
	floorH1, floorH2 target
	gitlab           *gitlabKAS
}

// startAnchors starts the floor and the anchor that cfg asks for and that
// can run here. One that cannot start is left out, with the reason in rep;
// the run goes on.
func startAnchors(ctx context.Context, cfg Config, rep *Report, bins binaries, p *pki, up *upstream, dir string, logf func(string, ...any)) *anchors {
	a := &anchors{rep: rep}
	if cfg.Skip["floor"] {
		rep.FloorNote = "rows left out (-skip floor)"
	} else {
		logf("starting caddy with its own reverse_proxy (the floor)")
		floorDir := filepath.Join(dir, "floor")
		if err := a.startFloor(ctx, cfg, bins, p, up, floorDir); err != nil {
			logf("the floor did not start: %v; its log ends:\n%s", err, logTail(floorDir, "caddy", 20))
			rep.FloorNote = "rows left out: it did not start: " + err.Error()
		}
	}
	kasBins, ok := findGitLabKAS(ctx, cfg, rep)
	if !ok {
		logf("GitLab's KAS: %s", rep.GitLabKASNote)
		return a
	}
	logf("starting redis-server %s, GitLab's KAS %s and GitLab's agentk %s", rep.GitLabKASRedis, rep.GitLabKAS, rep.GitLabKASAgentk)
	kasDir := filepath.Join(dir, "gitlab-kas")
	g, err := startGitLabKAS(ctx, kasBins, p, up, kasDir, logf)
	if err != nil {
		logf("the rows of GitLab's KAS are left out: %v; its log ends:\n%s\nGitLab's agentk's log ends:\n%s",
			err, logTail(kasDir, "gitlab-kas", 20), logTail(kasDir, "gitlab-agentk", 20))
		// The paths of the binaries belong to the machine, not to the report.
		unpath := strings.NewReplacer(kasBins.kas, gitlabKASProgram.label, kasBins.agentk, gitlabAgentkProgram.label)
		rep.GitLabKASNote = "rows left out: " + unpath.Replace(err.Error())
		rep.GitLabKAS = ""
		return a
	}
	a.gitlab = g
	return a
}

// startFloor starts the floor's Caddy and checks that a request goes
// through it with each client.
func (a *anchors) startFloor(ctx context.Context, cfg Config, bins binaries, p *pki, up *upstream, dir string) error {
	floor, err := startFloor(ctx, bins.caddy, dir, p, up, cfg.CaddyEnv)
	if err != nil {
		return err
	}
	h1 := target{name: floorName, proto: "h1", client: newClient(p.pool, false), base: floor.proxyURL}
	h2 := target{name: floorName, proto: "h2", client: newClient(p.pool, true), base: floor.proxyURL}
	for _, t := range []target{h1, h2} {
		if err := t.do(ctx, nil, http.MethodGet, "/1k", nil); err != nil {
			closeClients(h1, h2)
			floor.proc.stop()
			return fmt.Errorf("first request through the floor (%s): %w", t.proto, err)
		}
	}
	a.floor, a.floorH1, a.floorH2 = floor, h1, h2
	return nil
}

// routes are the rows of the anchors for proto: the floor (no agent: its
// Caddy's CPU alone counts), then GitLab's KAS.
func (a *anchors) routes(proto string) []route {
	var rs []route
	if a.floor != nil {
		t := a.floorH1
		if proto == "h2" {
			t = a.floorH2
		}
		rs = append(rs, route{caddy: a.floor, t: t, profileSuffix: "-floor"})
	}
	if a.gitlab != nil {
		rs = append(rs, a.gitlab.route(proto))
	}
	return rs
}

// stop stops everything the anchors started and records in the report
// what the Rails stand-in found wrong in GitLab's KAS's calls.
func (a *anchors) stop() {
	if a.floor != nil {
		closeClients(a.floorH1, a.floorH2)
		a.floor.proc.stop()
		a.floor = nil
	}
	if a.gitlab != nil {
		a.rep.StandInViolations = a.gitlab.stop()
		a.rep.StandInAuthCalls = a.gitlab.rails.Calls(fakegitlab.PathAllowedAgents)
		a.gitlab = nil
	}
}
