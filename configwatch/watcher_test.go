package configwatch_test

import (
	"context"
	"errors"
	"math"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/caddy-kas/caddy-kas/configwatch"
	"github.com/caddy-kas/caddy-kas/gitaly"
	"github.com/caddy-kas/caddy-kas/integration/fakegitaly"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentcfg"
)

const (
	agentID    = 7
	agentName  = "prod"
	agentToken = "agent-token-7"
	configPath = ".gitlab/agents/prod/config.yaml"
)

// published is a configuration handed to Publish.
type published struct {
	agentID int64
	file    *agentcfg.ConfigurationFile
}

// harness is a watcher over a real git repository served by the Gitaly
// double, with a GitLab whose answers the test controls.
type harness struct {
	t       *testing.T
	gitaly  *fakegitaly.Server
	repo    *fakegitaly.Repo
	watcher *configwatch.Watcher
	logs    *observer.ObservedLogs
	posts   chan published

	seenLogs int // log lines waitLog has looked at

	mu         sync.Mutex // guards publishErr and locateErr
	publishErr error
	locateErr  error
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("git is not installed")
	}
	h := &harness{t: t, posts: make(chan published, 100)}
	h.gitaly = fakegitaly.Start(t, fakegitaly.Options{Token: "gitaly-secret"})
	h.repo = h.gitaly.AddRepository(fakegitaly.RepoOptions{GlRepository: "project-3", GlProjectPath: "group/agents"})
	pool, err := gitaly.NewPool(gitaly.Options{
		GlobalRateLimit:    gitaly.RateLimit{PerSecond: math.Inf(1)},
		PerServerRateLimit: gitaly.RateLimit{PerSecond: math.Inf(1)},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pool.Close() })
	core, logs := observer.New(zapcore.InfoLevel)
	h.logs = logs
	h.watcher = configwatch.New(configwatch.Options{
		Locate:     h.locate,
		Publish:    h.publish,
		Gitaly:     pool,
		PollPeriod: time.Hour, // the tests poke
		Logger:     zap.New(core),
	})
	t.Cleanup(h.watcher.Close)
	return h
}

func (h *harness) locate(_ context.Context, token string) (configwatch.Location, error) {
	h.mu.Lock()
	err := h.locateErr
	h.mu.Unlock()
	if err != nil {
		return configwatch.Location{}, err
	}
	if token != agentToken {
		h.t.Errorf("Locate got token %q", token)
	}
	return configwatch.Location{
		AgentID: agentID, AgentName: agentName, ProjectID: 3, ProjectPath: h.repo.GlProjectPath,
		Gitaly: gitaly.Info{Address: h.gitaly.Address(), Token: h.gitaly.Token()},
		Repository: gitaly.Repository{
			StorageName: h.repo.StorageName, RelativePath: h.repo.RelativePath,
			GlRepository: h.repo.GlRepository, GlProjectPath: h.repo.GlProjectPath,
		},
		DefaultBranch: "main",
	}, nil
}

func (h *harness) publish(_ context.Context, id int64, f *agentcfg.ConfigurationFile) error {
	h.mu.Lock()
	err := h.publishErr
	h.mu.Unlock()
	if err != nil {
		return err
	}
	h.posts <- published{id, f}
	return nil
}

func (h *harness) setPublishErr(err error) {
	h.mu.Lock()
	h.publishErr = err
	h.mu.Unlock()
}

func (h *harness) setLocateErr(err error) {
	h.mu.Lock()
	h.locateErr = err
	h.mu.Unlock()
}

// commit writes the configuration file (nil removes it) and commits.
func (h *harness) commit(content *string) string {
	if content == nil {
		h.repo.Remove(configPath)
	} else {
		h.repo.WriteFile(configPath, *content)
	}
	return h.repo.Commit("config")
}

// nextPost waits for the next configuration sent to GitLab.
func (h *harness) nextPost() published {
	h.t.Helper()
	select {
	case p := <-h.posts:
		return p
	case <-time.After(20 * time.Second):
		h.t.Fatal("no configuration was sent to GitLab")
		return published{}
	}
}

// noPost fails if a configuration is sent to GitLab.
func (h *harness) noPost() {
	h.t.Helper()
	select {
	case p := <-h.posts:
		h.t.Fatalf("configuration sent to GitLab: %v", p.file)
	default:
	}
}

// waitLog waits for a log line with message msg and returns it.
func (h *harness) waitLog(msg string) observer.LoggedEntry {
	h.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		all := h.logs.All()
		for i := h.seenLogs; i < len(all); i++ {
			if all[i].Message == msg {
				h.seenLogs = i + 1
				return all[i]
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	h.t.Fatalf("no log line %q; logs: %v", msg, h.logs.All())
	return observer.LoggedEntry{}
}

// newLogs counts the log lines with message msg that waitLog has not
// looked at.
func (h *harness) newLogs(msg string) int {
	n := 0
	for _, e := range h.logs.All()[h.seenLogs:] {
		if e.Message == msg {
			n++
		}
	}
	return n
}

// waitConfig waits until the current configuration is at commit.
func (h *harness) waitConfig(commit string) *configwatch.Config {
	h.t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		cfg, changed := h.watcher.Configuration(agentID)
		if cfg != nil && cfg.CommitID == commit {
			return cfg
		}
		if changed == nil {
			h.t.Fatal("agent not watched")
		}
		select {
		case <-changed:
		case <-deadline:
			h.t.Fatalf("configuration is not at commit %s: %+v", commit, cfg)
		}
	}
}

func ptr(s string) *string { return &s }

func field(e observer.LoggedEntry, key string) string {
	for _, f := range e.Context {
		if f.Key == key {
			if f.String != "" {
				return f.String
			}
			if f.Interface != nil {
				if err, ok := f.Interface.(error); ok {
					return err.Error()
				}
			}
		}
	}
	return ""
}

func TestReadsAndPublishesEachNewCommit(t *testing.T) {
	h := newHarness(t)
	c1 := h.commit(ptr("user_access:\n  access_as: {agent: {}}\n  projects: [{id: group/app}]\n"))
	release := h.watcher.Watch(agentID, agentToken)
	defer release()

	p := h.nextPost()
	if p.agentID != agentID || p.file.GetUserAccess().GetProjects()[0].GetId() != "group/app" {
		t.Fatalf("published %d %v", p.agentID, p.file)
	}
	cfg := h.waitConfig(c1)
	if cfg.ProjectID != 3 || cfg.ProjectPath != "group/agents" {
		t.Errorf("config %+v", cfg)
	}

	// Nothing new, nothing sent.
	h.pokeAndWait(t)
	h.noPost()

	c2 := h.commit(ptr("ci_access:\n  groups: [{id: group}]\n"))
	if n := h.watcher.Poke("GROUP/Agents"); n != 1 {
		t.Fatalf("Poke poked %d agents", n)
	}
	p = h.nextPost()
	if p.file.GetCiAccess().GetGroups()[0].GetId() != "group" || p.file.GetUserAccess() != nil {
		t.Fatalf("published %v", p.file)
	}
	h.waitConfig(c2)
	if n := h.watcher.Poke("other/project"); n != 0 {
		t.Fatalf("Poke of another project poked %d agents", n)
	}
}

// pokeAndWait pokes the watcher and waits until Gitaly has answered one
// more ref advertisement, that is, until the poke was acted on.
func (h *harness) pokeAndWait(t *testing.T) {
	t.Helper()
	count := func() int {
		n := 0
		for _, c := range h.gitaly.Calls() {
			if c.Method == fakegitaly.MethodInfoRefsUploadPack {
				n++
			}
		}
		return n
	}
	before := count()
	h.watcher.Poke("group/agents")
	deadline := time.Now().Add(20 * time.Second)
	for count() == before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if count() == before {
		t.Fatal("the poke did not make a poll")
	}
	// The poll's TreeEntry (if any) and Publish follow the advertisement;
	// give them a moment to show up.
	time.Sleep(200 * time.Millisecond)
}

func TestInvalidConfigurationKeepsTheLastValidOne(t *testing.T) {
	h := newHarness(t)
	good := h.commit(ptr("ci_access:\n  projects: [{id: group/app}]\n"))
	release := h.watcher.Watch(agentID, agentToken)
	defer release()
	h.nextPost()
	h.waitConfig(good)

	big := "# " + strings.Repeat("x", gitaly.MaxConfigFileSize) + "\n"
	for _, tc := range []struct {
		name, content, wantErr string
	}{
		{"invalid YAML", "ci_access: [\n", "invalid YAML"},
		{"wrong type", "ci_access:\n  projects: yes\n", "ci_access.projects"},
		{"unknown field", "ci_acess: {}\n", "ci_acess"},
		{"oversize", big, "128 KiB"},
	} {
		bad := h.commit(ptr(tc.content))
		h.watcher.Poke("group/agents")
		e := h.waitLog("invalid agent configuration: keeping the last valid one; GitLab is not told of it")
		if e.Level != zapcore.WarnLevel || field(e, "commit_id") != bad || !strings.Contains(field(e, "error"), tc.wantErr) {
			t.Errorf("%s: log %v %v, want commit %s and an error naming %q", tc.name, e.Message, e.Context, bad, tc.wantErr)
		}
		for _, f := range e.Context {
			if f.Key == "agent_id" && f.Integer != agentID {
				t.Errorf("agent_id %d", f.Integer)
			}
		}
		h.noPost()
		if cfg, _ := h.watcher.Configuration(agentID); cfg.CommitID != good {
			t.Errorf("configuration at %s, want the last valid one at %s", cfg.CommitID, good)
		}
		// The same bad commit is not logged again at the next poll.
		h.pokeAndWait(t)
		if n := h.newLogs(e.Message); n != 0 {
			t.Errorf("invalid commit logged %d more times", n)
		}
	}

	// Deleting the file empties the configuration, and GitLab is told.
	gone := h.commit(nil)
	h.watcher.Poke("group/agents")
	p := h.nextPost()
	if p.file.GetCiAccess() != nil {
		t.Fatalf("published %v after the file was deleted", p.file)
	}
	h.waitConfig(gone)
}

func TestGitalyAndGitLabOutages(t *testing.T) {
	h := newHarness(t)
	c1 := h.commit(ptr("ci_access:\n  projects: [{id: group/app}]\n"))
	release := h.watcher.Watch(agentID, agentToken)
	defer release()
	h.nextPost()
	h.waitConfig(c1)

	// Gitaly down: the configuration stays; polling resumes by itself.
	h.gitaly.SetFailure(fakegitaly.MethodInfoRefsUploadPack, status.Error(codes.Unavailable, "gitaly is down"))
	c2 := h.commit(ptr("ci_access:\n  groups: [{id: group}]\n"))
	h.watcher.Poke("group/agents")
	e := h.waitLog("agent configuration poll failed: keeping the last configuration, retrying")
	if !strings.Contains(field(e, "error"), "gitaly is down") {
		t.Errorf("log %v", e.Context)
	}
	if cfg, _ := h.watcher.Configuration(agentID); cfg.CommitID != c1 {
		t.Errorf("configuration at %s during the outage", cfg.CommitID)
	}
	h.gitaly.SetFailure(fakegitaly.MethodInfoRefsUploadPack, nil)
	p := h.nextPost() // retried after a second or two, without a poke
	if p.file.GetCiAccess().GetGroups() == nil {
		t.Fatalf("published %v", p.file)
	}
	h.waitConfig(c2)
	h.waitLog("agent configuration poll works again")

	// GitLab refusing the configuration: retried until it takes it.
	h.setPublishErr(errors.New("gitlab: status 500"))
	c3 := h.commit(ptr("ci_access:\n  projects: [{id: group/other}]\n"))
	h.watcher.Poke("group/agents")
	h.waitLog("agent configuration poll failed: keeping the last configuration, retrying")
	h.waitConfig(c3) // read and in force, although GitLab has not taken it
	h.setPublishErr(nil)
	if p := h.nextPost(); p.file.GetCiAccess().GetProjects()[0].GetId() != "group/other" {
		t.Fatalf("published %v", p.file)
	}

	// GitLab unreachable for agent_info: same.
	h.setLocateErr(errors.New("gitlab unreachable"))
	h.watcher.Poke("group/agents")
	h.waitLog("agent configuration poll failed: keeping the last configuration, retrying")
	h.setLocateErr(nil)
	h.waitLog("agent configuration poll works again")
}

func TestWatchLifetime(t *testing.T) {
	h := newHarness(t)
	c1 := h.commit(ptr("ci_access:\n  projects: [{id: group/app}]\n"))

	release1 := h.watcher.Watch(agentID, agentToken)
	release2 := h.watcher.Watch(agentID, agentToken)
	h.nextPost()
	h.waitConfig(c1)
	if n := h.watcher.Agents(); n != 1 {
		t.Fatalf("%d agents watched, want 1 for two tunnels", n)
	}
	_, changed := h.watcher.Configuration(agentID)
	release1()
	release1() // twice is once
	if h.watcher.Agents() != 1 {
		t.Fatal("watch ended while a tunnel holds it")
	}
	release2()
	select {
	case <-changed:
	case <-time.After(10 * time.Second):
		t.Fatal("the end of the watch did not close the changed channel")
	}
	cfg, started := h.watcher.Configuration(agentID)
	if cfg != nil || h.watcher.Agents() != 0 {
		t.Fatal("the agent is still watched after its last tunnel went")
	}

	// The agent comes back: its configuration is read again, but GitLab,
	// which has this commit, is not told again.
	release3 := h.watcher.Watch(agentID, agentToken)
	defer release3()
	select {
	case <-started:
	default:
		t.Fatal("a new watch did not close the channel Configuration gave while the agent was not watched")
	}
	h.waitConfig(c1)
	h.noPost()

	h.watcher.Close()
	if release := h.watcher.Watch(agentID, agentToken); h.watcher.Agents() != 0 {
		t.Fatal("a closed watcher watches")
	} else {
		release()
	}
}

func TestEmptyRepository(t *testing.T) {
	h := newHarness(t)
	release := h.watcher.Watch(agentID, agentToken)
	defer release()
	h.waitLog("agent configuration project has no default branch yet")
	h.noPost()
	if cfg, _ := h.watcher.Configuration(agentID); cfg != nil {
		t.Fatalf("configuration %+v from an empty repository", cfg)
	}
	c1 := h.commit(ptr(""))
	h.watcher.Poke("group/agents")
	h.nextPost()
	h.waitConfig(c1)
}
