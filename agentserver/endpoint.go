// Package agentserver is the agent-facing endpoint of the agent server.
//
// What every tunnel protocol shares is here, in endpoint.go: the choice of
// protocol by WebSocket subprotocol, checking an agent's token, adding its
// tunnels to the store for as long as they live, re-checking the token of a
// connected agent, logs and metrics. Each protocol's own handshake is a
// file of its own that uses them: h2tunnel.go for ours, grpctunnel.go for
// GitLab's agentk, which offers "ws-tunnel" and sends its token with every
// gRPC call.
//
// It imports no Caddy package.
package agentserver

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/configwatch"
	"github.com/caddy-kas/caddy-kas/internal/logthrottle"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/redisregistry"
	"github.com/caddy-kas/caddy-kas/tunnel/wsconn"
)

// Agent identifies an authenticated agent.
type Agent struct {
	ID   int64
	Name string
	// ProjectID is the agent's configuration project in GitLab; zero for
	// agents declared in the Caddyfile.
	ProjectID int64
}

// Authenticator resolves an agent token to its agent.
type Authenticator interface {
	// AuthenticateAgent returns the agent token belongs to, or an error
	// wrapping [ErrUnknownToken] if it belongs to none. Other errors mean
	// the answer is not known now (a backend is down).
	AuthenticateAgent(ctx context.Context, token string) (Agent, error)
}

// ErrUnknownToken is wrapped by [Authenticator] errors for tokens that
// belong to no agent.
var ErrUnknownToken = errors.New("unknown agent token")

// Endpoint is the http.Handler that agentk connects to.
type Endpoint struct {
	// Auth authenticates agent tokens.
	Auth Authenticator
	// Store receives the tunnels.
	Store *tunnel.Store
	// H2Tunnel tunes the HTTP/2 connections of our own tunnel protocol.
	H2Tunnel h2tunnel.Options
	// GRPC serves the connections of GitLab's agentk. Nil refuses them as
	// an unsupported protocol.
	GRPC *grpctunnel.Server
	// Logger receives connects, disconnects and refusals; never a token.
	Logger *zap.Logger
	// Observer, if set, is told about the same events, for metrics.
	Observer Observer
	// Recheck, if positive, is how often the token of a connected agent
	// is checked again with Auth, with 10 % jitter. A token that no longer
	// belongs to the agent closes the tunnel; a check that cannot be made
	// (GitLab down) leaves it up. In GitLab mode this is also what keeps
	// the agent "connected" in GitLab's UI, which shows an agent as
	// connected while its token was used in the last 8 minutes
	// (kas-spec §7): each check is a use of the token.
	Recheck time.Duration
	// Connections, if set, counts the connections of every agent token,
	// and those beyond ConnectionsPerMinute in a minute are refused
	// (connections_per_token_per_minute, kas-spec §1.1): our agentk's
	// handshakes, with 429 and Retry-After; every gRPC call of GitLab's
	// agentk, as GitLab's KAS counts them, with ResourceExhausted.
	Connections ConnectionCounter
	// ConnectionsPerMinute is the limit of Connections; zero means
	// [DefaultConnectionsPerTokenPerMinute].
	ConnectionsPerMinute uint64

	refusals logthrottle.Limiter // log lines of refusals, per reason
	// Configs, if set, keeps the configuration of every agent with a
	// tunnel here current for as long as it has one (GitLab mode: read
	// from the agent's configuration project and handed to GitLab), and
	// GitLab's agentk gets it through GetConfiguration. Nil: agents have
	// no configuration, and GetConfiguration stays silent.
	Configs *configwatch.Watcher
	// GitLabExternalURL is GitLab's external URL, part of the
	// configuration GitLab's agentk gets; empty if not known.
	GitLabExternalURL string
	// Registry, if set, is the registry several nodes share: every tunnel
	// admitted here is published there for as long as it lives, so that
	// the other nodes forward requests for its agent here.
	Registry *redisregistry.Registry
	// MaxConnectionAge, if positive, is how long a tunnel that can move
	// ([tunnel.Movable], our agentk's) lives: its agent is asked to open
	// a new tunnel after the first part of [tunnel.MaxAgeSchedule], so
	// that agents rebalance across nodes and authenticate again, and the
	// old tunnel closes once its requests are done and the new one is up,
	// at the latest at the end of the age (GitLab's max_connection_age,
	// kas-spec §1.1). GitLab's agentk's connections are limited by the
	// gRPC server ([grpctunnel.WithMaxConnectionAge]).
	MaxConnectionAge time.Duration
}

// recheckTimeout bounds one re-check of a connected agent's token.
const recheckTimeout = 30 * time.Second

// Observer is told about tunnels as they come and go.
type Observer interface {
	// AgentConnected and AgentDisconnected bracket the life of a tunnel.
	AgentConnected(tunnel.AgentInfo)
	AgentDisconnected(tunnel.AgentInfo)
	// AgentRefused counts a refused handshake; reason is one of a few
	// fixed strings (the "reason" of the log line).
	AgentRefused(reason string)
}

// ServeHTTP serves an agent's WebSocket handshake with the tunnel protocol
// its subprotocol names.
func (e *Endpoint) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	hs := &handshake{e: e, w: w, r: r, log: e.logger().With(zap.String("remote_addr", r.RemoteAddr))}
	if e.Store.Draining() {
		// This node stops and has asked its agents to move: a tunnel
		// opened now would have to move again at once.
		hs.w.Header().Set("Retry-After", "1")
		hs.refuse(http.StatusServiceUnavailable, "server stopping", "the agent server is stopping; connect to another node")
		return
	}
	if !wsconn.IsUpgrade(r) {
		// Someone opened the agent URL in a browser, or a proxy in front
		// dropped the Upgrade header (kas-spec §9 item 1).
		hs.refuse(http.StatusBadRequest, "not a websocket upgrade",
			"This is the GitLab agent endpoint: agentk connects here over WebSocket. If agentk sees this, a proxy in front dropped the Upgrade header.")
		return
	}
	switch {
	case wsconn.Offers(r, h2tunnel.Subprotocol):
		e.serveH2Tunnel(hs)
	case e.GRPC != nil && wsconn.Offers(r, grpctunnel.Subprotocol):
		e.serveGRPCTunnel(hs)
	default:
		hs.refuse(http.StatusBadRequest, "unsupported tunnel protocol",
			fmt.Sprintf("unsupported tunnel protocol %q: this server speaks %q and GitLab's %q",
				r.Header.Get("Sec-WebSocket-Protocol"), h2tunnel.Subprotocol, grpctunnel.Subprotocol),
			zap.String("offered", r.Header.Get("Sec-WebSocket-Protocol")))
	}
}

// logRefusal logs a refused agent: the first of each reason at once, then
// at most one line per reason a minute, which counts the refusals left out
// since the line before ("suppressed"). A fleet of agents with a revoked
// token, or a client trying tokens, would otherwise write a line for every
// handshake; the metrics count each one.
func (e *Endpoint) logRefusal(log *zap.Logger, reason string, fields ...zap.Field) {
	e.logRefusalOf(log, reason, "", fields...)
}

// logRefusalOf is logRefusal counting the refusals of each protocol
// apart, so that one agent protocol's refusals do not hide another's.
func (e *Endpoint) logRefusalOf(log *zap.Logger, reason, protocol string, fields ...zap.Field) {
	ok, suppressed := e.refusals.Allow(reason + " " + protocol)
	if !ok {
		return
	}
	log.Warn("agent refused", append(fields, zap.String("reason", reason), zap.Int("suppressed", suppressed))...)
}

// logFailure is logRefusal for a check that could not be made.
func (e *Endpoint) logFailure(log *zap.Logger, msg string, err error) {
	ok, suppressed := e.refusals.Allow(msg)
	if !ok {
		return
	}
	log.Error(msg, zap.Error(err), zap.Int("suppressed", suppressed))
}

func (e *Endpoint) logger() *zap.Logger {
	if e.Logger == nil {
		return nopLogger
	}
	return e.Logger
}

var nopLogger = zap.NewNop()

// handshake is one agent's handshake request while a protocol serves it.
type handshake struct {
	e   *Endpoint
	w   http.ResponseWriter
	r   *http.Request
	log *zap.Logger // with the remote address, and the agent once known
}

// refuse answers the handshake with code and message, and logs and counts
// the refusal under reason, one of a few fixed strings.
func (hs *handshake) refuse(code int, reason, message string, fields ...zap.Field) {
	hs.e.logRefusal(hs.log, reason, append(fields, zap.Int("status", code))...)
	if hs.e.Observer != nil {
		hs.e.Observer.AgentRefused(reason)
	}
	http.Error(hs.w, message, code)
}

// authenticate checks an agent token with the endpoint's Authenticator.
// If it gives no agent, the handshake is answered (401; 429 when a rate
// limit kept the token from being checked; 503 when it cannot be checked
// now) and ok is false.
func (hs *handshake) authenticate(token string) (agent Agent, ok bool) {
	agent, err := hs.e.Auth.AuthenticateAgent(hs.r.Context(), token)
	var limited *RateLimitedError
	switch {
	case errors.Is(err, ErrUnknownToken):
		hs.refuse(http.StatusUnauthorized, "unknown agent token", "unauthenticated")
		return Agent{}, false
	case errors.As(err, &limited):
		hs.refuseRetryLater("authentication rate limited", limited)
		return Agent{}, false
	case err != nil:
		hs.e.logFailure(hs.log, "cannot authenticate agent now", err)
		if hs.e.Observer != nil {
			hs.e.Observer.AgentRefused("authentication unavailable")
		}
		http.Error(hs.w, "cannot authenticate the agent now; retry later", http.StatusServiceUnavailable)
		return Agent{}, false
	}
	hs.log = hs.log.With(zap.Int64("agent_id", agent.ID), zap.String("agent_name", agent.Name))
	return agent, true
}

// admit adds a tunnel of an authenticated agent to the store and keeps it
// there until it ends, re-checking token every e.Recheck meanwhile. No
// goroutine waits for the tunnel: its end is handled by a callback
// ([tunnel.Tunnel.AfterDone]) and re-checks by a timer, which together
// with the handshake handler returning at once saves about 40 KiB of the
// 80 KiB an idle agent cost (measured with 2,000 agents,
// docs/benchmarks.md).
func (e *Endpoint) admit(t tunnel.Tunnel, token string, log *zap.Logger) {
	info := t.Agent()
	// Logged and counted before the tunnel is routable, so that whoever
	// finds it finds it announced.
	if e.Observer != nil {
		e.Observer.AgentConnected(info)
	}
	meta := info.Meta
	log.Info("agent connected", zap.Int64("connection_id", meta.ConnectionID), zap.Int64("pod_id", meta.PodID),
		zap.String("agent_version", meta.Version), zap.String("pod_namespace", meta.PodNamespace),
		zap.String("pod_name", meta.PodName), zap.String("kubernetes_version", meta.KubernetesVersion))
	remove := e.Store.Add(t)
	unwatch := func() {}
	if e.Configs != nil {
		unwatch = e.Configs.Watch(info.ID, token)
	}
	unpublish := func() {}
	if e.Registry != nil {
		unpublish = e.Registry.Publish(t)
	}
	var rc *recheck
	if e.Recheck > 0 {
		rc = &recheck{e: e, tunnel: t, token: token}
		rc.schedule()
	}
	stopAging := e.limitAge(t)
	t.AfterDone(func() {
		stopAging()
		if rc != nil {
			rc.stop()
		}
		remove()
		unpublish()
		unwatch()
		if e.Observer != nil {
			e.Observer.AgentDisconnected(info)
		}
		e.tunnelLog(t).Info("agent disconnected", zap.Duration("connected_for", time.Since(t.ConnectedAt())), zap.NamedError("reason", t.Err()))
	})
}

// limitAge arranges for a tunnel that can move to be drained once it
// reaches e.MaxConnectionAge, on a timer rather than in a goroutine of its
// own; the returned function cancels that for a tunnel that ended first.
func (e *Endpoint) limitAge(t tunnel.Tunnel) (stop func()) {
	m, ok := t.(tunnel.Movable)
	if !ok || e.MaxConnectionAge <= 0 {
		return func() {}
	}
	moveAfter, grace := tunnel.MaxAgeSchedule(e.MaxConnectionAge)
	timer := time.AfterFunc(moveAfter, func() {
		e.tunnelLog(m).Info("asking agent to move: the tunnel reached its maximum age",
			zap.Duration("connected_for", time.Since(m.ConnectedAt())), zap.Duration("grace", grace))
		tunnel.Drain(context.Background(), m, tunnel.DrainOptions{Grace: grace, Replaced: func() bool { return e.Store.Replaced(m) }})
	})
	return func() { timer.Stop() }
}

// tunnelLog returns the logger for events of a live tunnel. It is made
// when needed rather than kept: zap encodes a logger's fields when it is
// made, and a kept one would cost each idle agent a buffer.
func (e *Endpoint) tunnelLog(t tunnel.Tunnel) *zap.Logger {
	log := e.Logger
	if log == nil {
		return nopLogger
	}
	info := t.Agent()
	return log.With(zap.String("remote_addr", info.RemoteAddr), zap.Int64("agent_id", info.ID), zap.String("agent_name", info.Name),
		zap.Int64("connection_id", info.Meta.ConnectionID), zap.Int64("pod_id", info.Meta.PodID))
}

// recheck checks the token of a connected agent again every e.Recheck and
// closes the tunnel if the token has been revoked. It runs on a timer, not
// in a goroutine of its own, and is stopped when the tunnel ends.
type recheck struct {
	e      *Endpoint
	tunnel tunnel.Tunnel
	token  string

	mu      sync.Mutex  // guards timer and stopped
	timer   *time.Timer // the next check
	stopped bool
}

// schedule arms the next check, unless the tunnel has ended.
func (r *recheck) schedule() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.stopped {
		return
	}
	r.timer = time.AfterFunc(jitter(r.e.Recheck), r.run)
}

// stop cancels the next check.
func (r *recheck) stop() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stopped = true
	if r.timer != nil {
		r.timer.Stop()
	}
}

// run makes one check, in the timer's goroutine.
func (r *recheck) run() {
	ctx, cancel := context.WithTimeout(context.Background(), recheckTimeout)
	agent, err := r.e.Auth.AuthenticateAgent(ctx, r.token)
	cancel()
	switch {
	case errors.Is(err, ErrUnknownToken), err == nil && agent.ID != r.tunnel.Agent().ID:
		r.e.tunnelLog(r.tunnel).Warn("closing tunnel: agent token revoked")
		if r.e.Observer != nil {
			r.e.Observer.AgentRefused("agent token revoked")
		}
		r.tunnel.Close()
		return
	case err != nil:
		r.e.tunnelLog(r.tunnel).Warn("cannot re-check agent token now; keeping the tunnel", zap.Error(err))
	}
	r.schedule()
}

// jitter spreads d by ±10 %, so that agents that connected together (after
// a restart) do not all re-check at once.
func jitter(d time.Duration) time.Duration {
	return d - d/10 + rand.N(d/5+1)
}

// bearerToken returns the token of the one "Authorization: Bearer" header.
func bearerToken(h http.Header) (string, bool) {
	values := h.Values("Authorization")
	if len(values) != 1 {
		return "", false
	}
	const prefix = "Bearer "
	v := values[0]
	if len(v) <= len(prefix) || !strings.EqualFold(v[:len(prefix)], prefix) {
		return "", false
	}
	return v[len(prefix):], true
}
