// Package configwatch keeps the configuration of every agent with a tunnel
// on this node current, as GitLab's agent server does (kas-spec §3.1): it
// polls the default branch of the agent's configuration project through
// Gitaly, reads .gitlab/agents/<name>/config.yaml at each new commit,
// parses it, and tells GitLab of every valid new configuration
// (POST agent_configuration), which is how Rails learns the ci_access and
// user_access rules it authorizes CI jobs and users with (kas-spec §2.5,
// §2.6). A Git push to a configuration project pokes the poll at once.
//
// The rest of the server reads the current configuration with
// [Watcher.Configuration]: GitLab's agentk gets it through its
// GetConfiguration stream.
//
// It imports no Caddy package.
package configwatch

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/agentconfig"
	"github.com/caddy-kas/caddy-kas/gitaly"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentcfg"
)

// DefaultPollPeriod is how often an agent's configuration project is
// polled when no push is reported: 300 s, GitLab's agent server default
// (agent.configuration.poll_period). GitLab's Linux package sets 20 s, but
// every poll is a call to the project's Gitaly server, whose per-server
// rate limit (15 calls a second by default) 20 s polls of 300 agents
// already fill; at 300 s it takes 4,500. Pushes that Rails reports poke
// the poll at once, so a change is read without waiting either way.
const DefaultPollPeriod = 300 * time.Second

// pollTimeout bounds one poll: locating the agent, reading the branch and
// the file, and telling GitLab. A slow Gitaly delays the next poll by at
// most this much.
const pollTimeout = 30 * time.Second

// minRetry is the first wait after a failed poll; it doubles with each
// failure in a row, up to the poll period.
const minRetry = time.Second

// Location says where an agent's configuration lives: what GitLab's
// agent_info answers for the agent's token (kas-spec §2.1).
type Location struct {
	AgentID   int64
	AgentName string
	// ProjectID and ProjectPath are the agent's configuration project:
	// its id and its full path (gl_project_path), which push
	// notifications name.
	ProjectID   int64
	ProjectPath string
	// Gitaly and Repository locate the project's repository.
	Gitaly     gitaly.Info
	Repository gitaly.Repository
	// DefaultBranch is the project's default branch; empty means the
	// branch HEAD names.
	DefaultBranch string
}

// Options configure a [Watcher].
type Options struct {
	// Locate returns the [Location] of the agent an agent token belongs
	// to; GitLab's agent_info, through the agent server's cache.
	// Required.
	Locate func(ctx context.Context, token string) (Location, error)
	// Publish tells GitLab of a new valid configuration of an agent
	// (POST agent_configuration, kas-spec §3.1). An error is retried with
	// backoff; GitLab's 404, an agent deleted meanwhile, should be
	// reported as success. Required.
	Publish func(ctx context.Context, agentID int64, f *agentcfg.ConfigurationFile) error
	// Gitaly hands out Gitaly clients. Required.
	Gitaly *gitaly.Pool
	// PollPeriod is how often each agent's branch is polled; zero means
	// DefaultPollPeriod.
	PollPeriod time.Duration
	// Logger receives what happens to configurations; nil means no logs.
	Logger *zap.Logger
}

// Config is an agent's current configuration.
type Config struct {
	AgentID     int64
	ProjectID   int64
	ProjectPath string
	// CommitID is the commit of the configuration project it was read at.
	CommitID string
	// File is the parsed configuration file; an agent without a file has
	// an empty one. It is shared: never modify it.
	File *agentcfg.ConfigurationFile
}

// Watcher polls the configuration of every agent that is being watched.
// Its zero value is not usable; see [New].
type Watcher struct {
	wg sync.WaitGroup // the agents' poll loops

	events eventLog // outage lines of every agent

	mu        sync.Mutex // guards opts, closed, agents, published, starts and the fields of every agent marked so
	opts      Options
	closed    bool
	agents    map[int64]*agent
	published map[int64]string // agent id -> commit GitLab last accepted
	// starts holds, for agents that are not watched, a channel closed
	// when a watch begins: GitLab's agentk asks for its configuration
	// before its tunnel is admitted.
	starts map[int64]chan struct{}
}

// agent is the watch of one agent, held by its tunnels on this node.
type agent struct {
	id     int64
	poke   chan struct{} // buffered 1: a poll is due at once
	cancel context.CancelFunc

	// Guarded by Watcher.mu.
	tokens      []string // one per Watch still held, newest last
	projectPath string   // known after the first successful Locate
	cfg         *Config
	changed     chan struct{} // closed when cfg changes or the watch ends
}

// New returns a Watcher. Close it when done.
func New(opts Options) *Watcher {
	return &Watcher{opts: opts, agents: make(map[int64]*agent), published: make(map[int64]string), starts: make(map[int64]chan struct{})}
}

// SetOptions replaces the options, for a new server configuration; the
// poll loops use them from their next poll on.
func (w *Watcher) SetOptions(opts Options) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.opts = opts
	for _, a := range w.agents {
		a.pokeNow() // a new GitLab or Gitaly setting is worth trying at once
	}
}

func (w *Watcher) options() Options {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.opts
}

func (o Options) logger() *zap.Logger {
	if o.Logger == nil {
		return zap.NewNop()
	}
	return o.Logger
}

func (o Options) pollPeriod() time.Duration {
	if o.PollPeriod <= 0 {
		return DefaultPollPeriod
	}
	return o.PollPeriod
}

// Watch keeps agentID's configuration current until release is called,
// polling with token (a token of the agent; the newest one held is used).
// Each tunnel of the agent holds one watch; the first starts the polling,
// which reads the configuration at once, and the last release stops it.
func (w *Watcher) Watch(agentID int64, token string) (release func()) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return func() {}
	}
	a := w.agents[agentID]
	if a == nil {
		ctx, cancel := context.WithCancel(context.Background())
		a = &agent{id: agentID, poke: make(chan struct{}, 1), cancel: cancel, changed: make(chan struct{})}
		w.agents[agentID] = a
		if ch := w.starts[agentID]; ch != nil {
			close(ch)
			delete(w.starts, agentID)
		}
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			w.run(ctx, a)
		}()
	}
	a.tokens = append(a.tokens, token)
	var once sync.Once
	return func() { once.Do(func() { w.release(a, token) }) }
}

func (w *Watcher) release(a *agent, token string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for i := len(a.tokens) - 1; i >= 0; i-- {
		if a.tokens[i] == token {
			a.tokens = append(a.tokens[:i], a.tokens[i+1:]...)
			break
		}
	}
	if len(a.tokens) > 0 || w.agents[a.id] != a {
		return
	}
	delete(w.agents, a.id)
	a.cancel()
	close(a.changed)
}

// token returns the token to poll a with, or "" if its watch ended.
func (w *Watcher) token(a *agent) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(a.tokens) == 0 {
		return ""
	}
	return a.tokens[len(a.tokens)-1]
}

// Poke makes every watched agent whose configuration project is
// projectPath (a full path such as "group/project"; GitLab paths are
// compared without regard to case) poll at once, for a Git push to that
// project (Notifications/GitPushEvent). It returns how many agents it
// poked.
func (w *Watcher) Poke(projectPath string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, a := range w.agents {
		// An agent not located yet is polling right now, and reads the
		// newest commit anyway.
		if a.projectPath == "" || strings.EqualFold(a.projectPath, projectPath) {
			a.pokeNow()
			n++
		}
	}
	return n
}

func (a *agent) pokeNow() {
	select {
	case a.poke <- struct{}{}:
	default: // a poll is due already
	}
}

// Configuration returns the current configuration of agentID, nil if none
// has been read yet or the agent is not watched, and a channel that is
// closed when that changes: when a new configuration is read, the watch
// ends, or, for an agent that is not watched, a watch begins. Once the
// Watcher is closed the channel is nil, and never closes.
func (w *Watcher) Configuration(agentID int64) (*Config, <-chan struct{}) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil, nil
	}
	a := w.agents[agentID]
	if a == nil {
		ch := w.starts[agentID]
		if ch == nil {
			ch = make(chan struct{})
			w.starts[agentID] = ch
		}
		return nil, ch
	}
	return a.cfg, a.changed
}

// Agents returns how many agents are watched.
func (w *Watcher) Agents() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.agents)
}

// Close stops every poll loop and waits for them to end. Watches made
// afterwards do nothing.
func (w *Watcher) Close() {
	w.mu.Lock()
	w.closed = true
	for id, ch := range w.starts {
		close(ch)
		delete(w.starts, id)
	}
	for id, a := range w.agents {
		delete(w.agents, id)
		a.cancel()
		close(a.changed)
	}
	w.mu.Unlock()
	w.wg.Wait()
}

// pollState is what one agent's poll loop remembers between polls.
type pollState struct {
	// commit is the last commit whose file was dealt with: read and
	// found valid, or found invalid and logged.
	commit string
	// pending is a valid configuration GitLab has not accepted yet.
	pending *Config
	// failures counts the polls that failed in a row, and failure the
	// kind of the first of them, so that a Gitaly or GitLab outage is
	// logged when it starts and when it ends, not at every poll.
	failures int
	failure  string
	// noBranch is set while the project has no default branch, which is
	// logged once.
	noBranch bool
	// events bounds the log lines of outages, shared by every agent, and
	// base is the logger without the agent's fields, for their counts.
	events *eventLog
	base   *zap.Logger
}

// run is the poll loop of a, until ctx ends.
func (w *Watcher) run(ctx context.Context, a *agent) {
	st := pollState{events: &w.events}
	for {
		wait := w.poll(ctx, a, &st)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-a.poke:
			t.Stop()
		case <-t.C:
		}
	}
}

// poll runs one poll of a and returns how long to wait for the next.
func (w *Watcher) poll(ctx context.Context, a *agent, st *pollState) time.Duration {
	opts := w.options()
	st.base = opts.logger()
	log := st.base.With(zap.Int64("agent_id", a.id))
	period := opts.pollPeriod()
	token := w.token(a)
	if token == "" {
		return period // released; the loop is being stopped
	}
	if opts.Locate == nil || opts.Publish == nil {
		// Not configured yet: SetOptions pokes every agent.
		return period
	}
	ctx, cancel := context.WithTimeout(ctx, pollTimeout)
	defer cancel()

	loc, err := opts.Locate(ctx, token)
	if err != nil {
		return st.failed(ctx, log, "locating the agent's configuration project with GitLab", err, period)
	}
	if loc.AgentID != a.id {
		return st.failed(ctx, log, "locating the agent's configuration project with GitLab",
			fmt.Errorf("the token belongs to agent %d now", loc.AgentID), period)
	}
	w.mu.Lock()
	a.projectPath = loc.ProjectPath
	w.mu.Unlock()
	log = log.With(zap.String("project_path", loc.ProjectPath))

	// While GitLab has not taken the last configuration, the branch is
	// read anyway: a newer commit replaces it.
	if wait, done := w.read(ctx, log, a, loc, st, opts, period); done {
		return wait
	}
	if st.pending == nil {
		return st.succeeded(log, period)
	}
	cfg := st.pending
	if err := opts.Publish(ctx, a.id, cfg.File); err != nil {
		return st.failed(ctx, log, "telling GitLab of the agent's configuration", err, period)
	}
	st.pending = nil
	w.mu.Lock()
	w.published[a.id] = cfg.CommitID
	w.mu.Unlock()
	log.Info("agent configuration sent to GitLab", zap.String("commit_id", cfg.CommitID))
	return st.succeeded(log, period)
}

// read reads the branch and, at a new commit, the file. done reports that
// the poll ends here, to be retried after wait.
func (w *Watcher) read(ctx context.Context, log *zap.Logger, a *agent, loc Location, st *pollState, opts Options, period time.Duration) (wait time.Duration, done bool) {
	if opts.Gitaly == nil {
		return st.failed(ctx, log, "reading the agent's configuration", errors.New("no Gitaly client"), period), true
	}
	client, err := opts.Gitaly.Client(loc.Gitaly)
	if err != nil {
		return st.failed(ctx, log, "reading the agent's configuration from Gitaly", err, period), true
	}
	defer client.Release()

	commit, err := client.BranchHead(ctx, loc.Repository, loc.DefaultBranch)
	switch {
	case errors.Is(err, gitaly.ErrEmptyRepository), errors.Is(err, gitaly.ErrNotFound):
		// No branch, so no file: nothing to configure yet. GitLab's
		// agent server does not post a configuration either.
		if !st.noBranch {
			log.Info("agent configuration project has no default branch yet", zap.String("branch", loc.DefaultBranch))
		}
		st.noBranch = true
		st.succeeded(log, period)
		return period, true
	case err != nil:
		return st.failed(ctx, log, "reading the agent's configuration branch from Gitaly", err, period), true
	case commit == st.commit:
		st.noBranch = false
		return 0, false
	}
	st.noBranch = false

	path := gitaly.AgentConfigPath(loc.AgentName)
	log = log.With(zap.String("commit_id", commit), zap.String("path", path))
	var f *agentcfg.ConfigurationFile
	data, err := client.ReadFile(ctx, loc.Repository, commit, path, gitaly.MaxConfigFileSize)
	switch {
	case errors.Is(err, gitaly.ErrNotFound):
		// No file is an empty configuration (kas-spec §3.1).
		f = &agentcfg.ConfigurationFile{}
	case errors.Is(err, gitaly.ErrFileTooLarge):
		st.commit = commit
		log.Warn("invalid agent configuration: keeping the last valid one; GitLab is not told of it",
			zap.String("error", fmt.Sprintf("the file is larger than %d bytes (128 KiB), the limit of GitLab's agent server", gitaly.MaxConfigFileSize)))
		return period, true
	case err != nil:
		return st.failed(ctx, log, "reading the agent's configuration file from Gitaly", err, period), true
	default:
		f, err = agentconfig.Parse(data)
		if err != nil {
			st.commit = commit
			log.Warn("invalid agent configuration: keeping the last valid one; GitLab is not told of it", zap.Error(err))
			return period, true
		}
	}
	st.commit = commit
	cfg := &Config{AgentID: a.id, ProjectID: loc.ProjectID, ProjectPath: loc.ProjectPath, CommitID: commit, File: f}
	w.mu.Lock()
	if w.agents[a.id] == a {
		a.cfg = cfg
		close(a.changed)
		a.changed = make(chan struct{})
	}
	alreadyPublished := w.published[a.id] == commit
	w.mu.Unlock()
	log.Info("agent configuration read")
	if alreadyPublished {
		// A tunnel of the agent came back; GitLab has this one.
		st.pending = nil
	} else {
		st.pending = cfg
	}
	return 0, false
}

// failed records a failed poll and returns the wait before the next: it
// doubles from minRetry with each failure in a row, up to period, with
// 10 % jitter. The first failure of a streak is logged at once; the
// following ones are counted and reported when the poll succeeds again.
func (st *pollState) failed(ctx context.Context, log *zap.Logger, what string, err error, period time.Duration) time.Duration {
	if ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return period // the watch ended
	}
	st.failures++
	if st.failures == 1 {
		st.failure = what
		st.events.note(st.base, eventFailed, func() {
			log.Warn("agent configuration poll failed: keeping the last configuration, retrying", zap.String("step", what), zap.Error(err))
		})
	}
	wait := minRetry << min(st.failures-1, 20)
	if wait > period || wait <= 0 {
		wait = period
	}
	return wait - time.Duration(rand.Int64N(int64(wait)/10+1))
}

// succeeded records a successful poll and returns period.
func (st *pollState) succeeded(log *zap.Logger, period time.Duration) time.Duration {
	if st.failures > 0 {
		failure, failures := st.failure, st.failures
		st.events.note(st.base, eventRecovered, func() {
			log.Info("agent configuration poll works again", zap.String("failed_step", failure), zap.Int("failed_polls", failures))
		})
	}
	st.failures, st.failure = 0, ""
	return period
}

// Kinds of outage log lines.
const (
	eventFailed    = "failed"
	eventRecovered = "recovered"
)

// eventBurst is how many outage lines of one kind are logged per
// eventWindow; the rest are counted and reported in one line. A Gitaly or
// GitLab outage hits every connected agent at once: a thousand agents must
// not make a thousand lines, and the first ones, which say what broke, are
// never dropped.
const (
	eventBurst  = 5
	eventWindow = time.Minute
)

// eventLog limits the outage lines of all the agents of a Watcher.
type eventLog struct {
	mu         sync.Mutex // guards the fields below
	start      time.Time  // of the current window
	logged     map[string]int
	suppressed map[string]int
}

// note logs with emit, unless eventBurst lines of kind were logged in this
// window already; then it counts the line. The counts of the window before
// are logged when a new one starts.
func (l *eventLog) note(base *zap.Logger, kind string, emit func()) {
	l.mu.Lock()
	now := time.Now()
	var report map[string]int
	if l.start.IsZero() || now.Sub(l.start) >= eventWindow {
		report = l.suppressed
		l.start, l.logged, l.suppressed = now, map[string]int{}, map[string]int{}
	}
	ok := l.logged[kind] < eventBurst
	if ok {
		l.logged[kind]++
	} else {
		l.suppressed[kind]++
	}
	l.mu.Unlock()
	for k, n := range report {
		if n > 0 {
			base.Warn("more agent configuration poll events", zap.String("kind", k), zap.Int("count", n), zap.Duration("within", eventWindow))
		}
	}
	if ok {
		emit()
	}
}
