// Package kasapp is the "kas" Caddy app: it owns the store of agent tunnels
// and the router over it that the kubernetes_agent and k8s_proxy handlers
// share, across configuration reloads.
package kasapp

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/agentserver"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/redisregistry"
)

func init() {
	caddy.RegisterModule(new(App))
}

// App is the agent server's Caddy app. Handlers get it with
// ctx.App("kas"); Caddy creates it even when the configuration does not
// mention it.
type App struct {
	// GitLab, if set, puts the agent server in GitLab mode: agents and
	// clients are authenticated by GitLab instead of by tokens in the
	// configuration. Default: standalone mode.
	GitLab *GitLab `json:"gitlab,omitempty"`

	// Redis, with PrivateAPI, makes this node one of several that share
	// their agents' tunnels: a request for an agent connected to another
	// node is forwarded there. Default: one node.
	Redis *Redis `json:"redis,omitempty"`

	// PrivateAPI is this node's listener for the requests other nodes
	// forward; required with Redis. Default: none.
	PrivateAPI *PrivateAPI `json:"private_api,omitempty"`

	// ShutdownGracePeriod is how long, when Caddy exits (caddy stop, a
	// signal; not a reload, which keeps the tunnels), requests and
	// watches on the tunnels may go on after their agents were asked to
	// move to another node; then they end with an error their clients
	// see, never a response that looks complete. Default: 1h, as GitLab's
	// KAS shutdown_grace_period. Caddy's own grace_period does not bound
	// it.
	ShutdownGracePeriod caddy.Duration `json:"shutdown_grace_period,omitempty"`

	// MaxConnectionAge is how long an agent's tunnel lives before the
	// agent is asked to open a new one, so that agents rebalance across
	// nodes after a scale-out and authenticate again. The agent is asked
	// after about 35 % of it (less up to 5 % at random), the old tunnel
	// closes once its requests are done and the new one is up, and at the
	// latest at the end of the age; as GitLab's KAS max_connection_age.
	// GitLab's agentk's connections get it from the first configuration
	// of the process on, ours from the configuration that accepted them.
	// Default: 2h; negative: no limit.
	MaxConnectionAge caddy.Duration `json:"max_connection_age,omitempty"`

	tunnels    *pooledTunnels
	router     *tunnel.Router // this config's; it looks on other nodes when they share a registry
	nodes      *sharedNodes   // nil with one node
	modes      *modeTracker
	poolKey    string
	logger     *zap.Logger
	gitlab     *gitlabRuntime // nil in standalone mode
	usageTaken bool           // whether this config holds a reference to the usage counters
	// configsTaken and gitalyPool say whether this config holds a
	// reference to the configuration watcher and which Gitaly pool.
	configsTaken bool
	gitalyPool   *pooledGitaly

	mu        sync.Mutex // guards agentSets, agentIDs and agentRefs
	agentSets []AgentSet // what this config's kubernetes_agent handlers accept
	agentIDs  map[int64]bool
	agentRefs []AgentRef // agents this config's k8s_proxy users may reach
}

// AgentRef is an agent that a part of the configuration names.
type AgentRef struct {
	ID int64
	// By says who names the agent, and where, for an error message: for
	// example `k8s_proxy user "ci", at Caddyfile:31`.
	By string
}

// AgentSet is the set of agents a kubernetes_agent handler accepts.
type AgentSet interface {
	// Declares reports whether the agent with this id may connect with a
	// token of this SHA-256 digest.
	Declares(agentID int64, credential [sha256.Size]byte) bool
}

// tunnelPools holds the tunnel store across configuration reloads. Caddy
// provisions a new config (and a new App) before it cleans up the old one,
// so the reference count never drops to zero on a reload and connected
// agents stay connected; on process exit it does, and Destruct closes
// every tunnel.
var tunnelPools = caddy.NewUsagePool()

// localTunnelsKey names the one store of this process's tunnels. A store
// shared by several nodes (Redis) will sit next to it, keyed by its
// address and prefix.
const localTunnelsKey = "local"

// pooledTunnels is what outlives a reload.
type pooledTunnels struct {
	store  *tunnel.Store
	router *tunnel.Router
	// grpc serves the connections of GitLab's agentk, whose calls go on
	// across reloads like our tunnels.
	grpc  *grpctunnel.Server
	modes *modeTracker
	// connections counts each agent token's connections per minute for
	// every kubernetes_agent handler, across reloads as GitLab's KAS
	// counts them across its nodes.
	connections *agentserver.MemoryConnectionCounter

	drainOnce    sync.Once
	drainStarted atomic.Bool   // set by drainOnce, before its goroutine runs
	drained      chan struct{} // closed once the drain that drainOnce started is over
}

// drain starts, once, the drain of a process that exits: every agent is
// asked to move, and the tunnels close as their requests end or grace
// passes. [pooledTunnels.Destruct] waits for it.
func (p *pooledTunnels) drain(grace time.Duration, log *zap.Logger) {
	p.drainOnce.Do(func() {
		p.drainStarted.Store(true)
		go func() {
			defer close(p.drained)
			start := time.Now()
			log.Info("asking agents to move: the server is stopping",
				zap.Int("tunnels", len(p.store.All())), zap.Duration("grace", grace))
			var grpcDrained sync.WaitGroup
			grpcDrained.Go(func() { p.grpc.Drain(grace) })
			p.store.Drain(context.Background(), grace)
			grpcDrained.Wait()
			log.Info("tunnels drained", zap.Duration("took", time.Since(start)))
		}()
	})
}

// draining reports whether drain was started.
func (p *pooledTunnels) draining() bool { return p.drainStarted.Load() }

// modeTracker remembers the authentication mode the store's tunnels
// were accepted under.
type modeTracker struct {
	mu   sync.Mutex // guards mode
	mode string
}

// swap records mode and returns the one before ("" the first time).
func (m *modeTracker) swap(mode string) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	prev := m.mode
	m.mode = mode
	return prev
}

func (p *pooledTunnels) Destruct() error {
	if p.draining() {
		<-p.drained
	}
	err := p.store.Close()
	p.grpc.Close()
	return err
}

// CaddyModule returns the Caddy module information.
func (*App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "kas",
		New: func() caddy.Module { return new(App) },
	}
}

// Provision takes a reference to the tunnel store.
func (a *App) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	if a.logger == nil {
		a.logger = zap.NewNop()
	}
	v, _, err := tunnelPools.LoadOrNew(localTunnelsKey, func() (caddy.Destructor, error) {
		store := tunnel.NewStore()
		return &pooledTunnels{store: store, router: tunnel.NewRouter(store), modes: new(modeTracker),
			grpc:        grpctunnel.NewServer(grpctunnel.WithMaxConnectionAge(a.maxConnectionAge())),
			connections: new(agentserver.MemoryConnectionCounter), drained: make(chan struct{})}, nil
	})
	if err != nil {
		return fmt.Errorf("tunnel store: %w", err)
	}
	a.tunnels = v.(*pooledTunnels)
	a.modes, a.poolKey = a.tunnels.modes, localTunnelsKey
	a.router = a.tunnels.router
	if a.Redis != nil || a.PrivateAPI != nil {
		if err := a.provisionNodes(); err != nil {
			return err
		}
	}
	if ctx.Context != nil { // a real configuration, not a test's zero Context
		if err := a.drainOnExit(ctx); err != nil {
			return err
		}
	}
	if a.GitLab != nil {
		return a.provisionGitLab(ctx)
	}
	return nil
}

// drainOnExit has the tunnels drained when Caddy begins to exit. Caddy
// emits "stopping" before it stops any app, on a reload as on exit; the
// drain must begin before the http app stops, which waits for proxied
// requests (forever without a grace_period) that only end once the
// tunnels under them do. Stop starts it too, should the event not come.
func (a *App) drainOnExit(ctx caddy.Context) error {
	v, err := ctx.App("events")
	if err != nil {
		return fmt.Errorf("loading events app: %w", err)
	}
	events, ok := v.(*caddyevents.App)
	if !ok {
		return fmt.Errorf("events app is a %T", v)
	}
	return events.On("stopping", exitDrain{a})
}

// exitDrain is the handler of Caddy's "stopping" event.
type exitDrain struct{ a *App }

func (d exitDrain) Handle(context.Context, caddy.Event) error {
	if caddy.Exiting() { // not a reload
		d.a.tunnels.drain(d.a.shutdownGrace(), d.a.logger)
	}
	return nil
}

func (a *App) shutdownGrace() time.Duration {
	if a.ShutdownGracePeriod > 0 {
		return time.Duration(a.ShutdownGracePeriod)
	}
	return tunnel.DefaultShutdownGrace
}

// TunnelMaxAge returns the maximum age of our agentk's tunnels, for the
// agent endpoint; zero means no limit.
func (a *App) TunnelMaxAge() time.Duration { return a.maxConnectionAge() }

func (a *App) maxConnectionAge() time.Duration {
	switch {
	case a.MaxConnectionAge < 0:
		return 0
	case a.MaxConnectionAge == 0:
		return tunnel.DefaultMaxConnectionAge
	}
	return time.Duration(a.MaxConnectionAge)
}

// GitLabMode returns what the handlers need in GitLab mode, or nil in
// standalone mode.
func (a *App) GitLabMode() *GitLabMode {
	if a.gitlab == nil {
		return nil
	}
	return a.gitlab.mode
}

// Store returns the store of this node's tunnels, where the agent endpoint
// adds them.
func (a *App) Store() *tunnel.Store { return a.tunnels.store }

// LocalStore returns the store of this process's tunnels while a
// configuration holds it (any configuration whose kas app was provisioned
// and not yet cleaned up), else nil. It takes no reference and creates
// nothing.
//
// It is for the admin API (admin.api.kas). Caddy provisions admin modules
// for every configuration, before any app, and from outside the apps'
// lifecycle: taking the app with ctx.App("kas") there would provision and
// start the kas app even in a configuration that never mentions it. Looking
// the store up when a request comes needs neither, and finds the one store
// the tunnels live in across reloads.
func LocalStore() *tunnel.Store {
	var store *tunnel.Store
	tunnelPools.Range(func(key, value any) bool {
		if key != localTunnelsKey {
			return true
		}
		store = value.(*pooledTunnels).store
		return false
	})
	return store
}

// SharedRegistry returns the registry this process shares with other
// nodes, or nil with one node. Like LocalStore, it is for the admin API,
// which Caddy provisions apart from the apps.
func SharedRegistry() *redisregistry.Registry {
	var r *redisregistry.Registry
	nodePools.Range(func(_, value any) bool {
		r = value.(*sharedNodes).registry
		return false
	})
	return r
}

// Router returns the router that finds a tunnel for a proxied request: on
// this node, or, when several nodes share a registry, on any of them.
func (a *App) Router() *tunnel.Router { return a.router }

// Registry returns the registry several nodes share, or nil with one node.
func (a *App) Registry() *redisregistry.Registry {
	if a.nodes == nil {
		return nil
	}
	return a.nodes.registry
}

// GRPCTunnels returns the server of GitLab's agentk connections.
func (a *App) GRPCTunnels() *grpctunnel.Server { return a.tunnels.grpc }

// ConnectionCounter returns the counter of agent tokens' connections per
// minute. It counts in this process's memory; once several nodes share
// their tunnels through Redis, a counter in Redis takes its place here.
func (a *App) ConnectionCounter() agentserver.ConnectionCounter {
	if a.nodes != nil {
		return a.nodes.registry
	}
	return a.tunnels.connections
}

// DeclareAgents adds the agents a handler accepts. Handlers call it while
// they are provisioned.
func (a *App) DeclareAgents(s AgentSet) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.agentSets = append(a.agentSets, s)
}

// DeclareAgentIDs adds the ids of the agents a handler accepts; handlers
// call it while they are provisioned, with [App.DeclareAgents].
func (a *App) DeclareAgentIDs(ids ...int64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.agentIDs == nil {
		a.agentIDs = make(map[int64]bool)
	}
	for _, id := range ids {
		a.agentIDs[id] = true
	}
}

// ReferAgents adds agents that a handler names and that this
// configuration must declare in standalone mode; handlers call it while
// they are provisioned.
func (a *App) ReferAgents(refs ...AgentRef) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.agentRefs = append(a.agentRefs, refs...)
}

// checkAgentRefs fails for every agent named but not declared. It runs at
// Start because only then are all handlers provisioned, in whatever order
// Caddy took its servers: an agent may be declared in another site than
// the one naming it. Without this a typo in an agent id showed only at
// request time, as an agent that never connects.
func (a *App) checkAgentRefs() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	var errs []error
	for _, ref := range a.agentRefs {
		if !a.agentIDs[ref.ID] {
			errs = append(errs, fmt.Errorf("%s names agent %d, which no kubernetes_agent declares", ref.By, ref.ID))
		}
	}
	return errors.Join(errs...)
}

// Start runs once this configuration is in force. In standalone mode it
// first fails for an agent that a k8s_proxy user names but no
// kubernetes_agent declares. Tunnels outlive reloads, so a tunnel
// authenticated with a token the new configuration no longer has (an
// agent removed, a token rotated) would keep its access until the agent
// reconnected; Start closes such tunnels at once.
func (a *App) Start() error {
	if a.gitlab == nil {
		// Before anything changes, so that a reload that fails here
		// leaves the running configuration as it was.
		if err := a.checkAgentRefs(); err != nil {
			return err
		}
	}
	mode := a.modeKey()
	if prev := a.modes.swap(mode); prev != "" && prev != mode {
		// Tunnels accepted under another mode (standalone tokens, or
		// another GitLab) were not authenticated by this one: agents
		// reconnect and authenticate again.
		for _, c := range a.tunnels.store.All() {
			info := c.Agent()
			a.logger.Warn("closing tunnel: the authentication mode changed",
				zap.Int64("agent_id", info.ID), zap.Int64("connection_id", info.Meta.ConnectionID))
			c.Close()
		}
	}
	if a.gitlab != nil {
		// Revoked tokens are found by the periodic re-check of every
		// tunnel (kubernetes_agent's GitLab mode).
		return a.gitlab.start(a.logger)
	}
	a.mu.Lock()
	sets := a.agentSets
	a.mu.Unlock()
	for _, c := range a.tunnels.store.All() {
		info := c.Agent()
		if declared(sets, info) {
			continue
		}
		a.logger.Warn("closing tunnel: its agent token is no longer configured",
			zap.Int64("agent_id", info.ID), zap.String("agent_name", info.Name),
			zap.Int64("connection_id", info.Meta.ConnectionID), zap.String("remote_addr", info.RemoteAddr))
		c.Close()
	}
	return nil
}

func declared(sets []AgentSet, info tunnel.AgentInfo) bool {
	for _, s := range sets {
		if s.Declares(info.ID, info.Credential) {
			return true
		}
	}
	return false
}

// Stop implements caddy.App. Tunnels are not closed here: on a reload the
// next config keeps using them; on exit their drain starts, if the
// "stopping" event has not started it, and Destruct waits for it. GitLab
// mode's gRPC API and usage reporter of this config stop.
func (a *App) Stop() error {
	if a.gitlab != nil {
		a.gitlab.stopRuntime()
	}
	if caddy.Exiting() && a.tunnels != nil {
		a.tunnels.drain(a.shutdownGrace(), a.logger)
	}
	return nil
}

// Cleanup drops this config's references to the tunnel store, the usage
// counters, the configuration watcher and the Gitaly connections.
func (a *App) Cleanup() error {
	if a.tunnels != nil && a.tunnels.draining() {
		// Caddy exits: requests that other nodes forward here run on
		// the draining tunnels too, so the private API and this node's
		// place in the registry stay until the drain is over.
		<-a.tunnels.drained
	}
	var errs []error
	if a.usageTaken {
		if _, err := usages.Delete(usageKey); err != nil {
			errs = append(errs, err)
		}
	}
	if a.configsTaken {
		if _, err := configWatchers.Delete(configWatcherKey); err != nil {
			errs = append(errs, err)
		}
	}
	if a.nodes != nil {
		if _, err := nodePools.Delete(a.nodes.key); err != nil {
			errs = append(errs, err)
		}
	}
	if a.gitalyPool != nil {
		if _, err := gitalyPools.Delete(a.gitalyPool.key); err != nil {
			errs = append(errs, err)
		}
	}
	if a.poolKey != "" { // else provisioning failed before taking a reference
		if _, err := tunnelPools.Delete(a.poolKey); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// FromContext returns the provisioned kas app of ctx's configuration.
func FromContext(ctx caddy.Context) (*App, error) {
	v, err := ctx.App("kas")
	if err != nil {
		return nil, fmt.Errorf("loading kas app: %w", err)
	}
	return v.(*App), nil
}

// Interface guards
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
)
