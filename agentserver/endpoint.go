// Package agentserver is the agent-facing endpoint of the agent server:
// it authenticates agentk's WebSocket handshake, turns the connection into
// a tunnel and keeps it in the registry for as long as it lives. It imports
// no Caddy package.
package agentserver

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/tunnel"
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
	// Registry receives the tunnels.
	Registry tunnel.Registry
	// Options tune the tunnels' HTTP/2 connections.
	Options tunnel.Options
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

// ServeHTTP accepts a tunnel, registers it and returns. The connection is
// hijacked: from then on the tunnel owns it, and no goroutine waits for
// it. Its end is handled by a callback ([tunnel.Conn.AfterDone]) and
// re-checks of its token by a timer. Returning at once lets the HTTP
// server drop the handshake's request state and buffers, and waiting
// without a goroutine saves its stack: together about 40 KiB of the 80 KiB
// an idle agent cost (measured with 2,000 agents, docs/benchmarks.md).
func (e *Endpoint) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	log := e.Logger
	if log == nil {
		log = zap.NewNop()
	}
	log = log.With(zap.String("remote_addr", r.RemoteAddr))
	refuse := func(code int, reason, message string, fields ...zap.Field) {
		log.Warn("agent refused", append(fields, zap.String("reason", reason), zap.Int("status", code))...)
		if e.Observer != nil {
			e.Observer.AgentRefused(reason)
		}
		http.Error(w, message, code)
	}

	if !tunnel.IsWebSocketUpgrade(r) {
		// Someone opened the agent URL in a browser, or a proxy in front
		// dropped the Upgrade header (kas-spec §9 item 1).
		refuse(http.StatusBadRequest, "not a websocket upgrade",
			"This is the GitLab agent endpoint: agentk connects here over WebSocket. If agentk sees this, a proxy in front dropped the Upgrade header.")
		return
	}
	if !tunnel.OffersSubprotocol(r) {
		refuse(http.StatusBadRequest, "unsupported tunnel protocol",
			fmt.Sprintf("unsupported tunnel protocol %q: this server speaks %q; upgrade agentk",
				r.Header.Get("Sec-WebSocket-Protocol"), tunnel.Subprotocol),
			zap.String("offered", r.Header.Get("Sec-WebSocket-Protocol")))
		return
	}
	token, ok := bearerToken(r.Header)
	if !ok {
		refuse(http.StatusUnauthorized, "no agent token", "missing agent token")
		return
	}
	agent, err := e.Auth.AuthenticateAgent(r.Context(), token)
	switch {
	case errors.Is(err, ErrUnknownToken):
		refuse(http.StatusUnauthorized, "unknown agent token", "unauthenticated")
		return
	case err != nil:
		log.Error("cannot authenticate agent now", zap.Error(err))
		if e.Observer != nil {
			e.Observer.AgentRefused("authentication unavailable")
		}
		http.Error(w, "cannot authenticate the agent now; retry later", http.StatusServiceUnavailable)
		return
	}
	log = log.With(zap.Int64("agent_id", agent.ID), zap.String("agent_name", agent.Name))
	meta, err := tunnel.MetaFromHeaders(r.Header)
	if err != nil {
		refuse(http.StatusBadRequest, "malformed agent metadata", "malformed agent metadata", zap.Error(err))
		return
	}

	nc, err := tunnel.Accept(w, r)
	if err != nil {
		log.Warn("agent handshake failed", zap.Error(err))
		return
	}
	info := tunnel.AgentInfo{ID: agent.ID, Name: agent.Name, ProjectID: agent.ProjectID, Meta: meta, RemoteAddr: r.RemoteAddr, Credential: sha256.Sum256([]byte(token))}
	conn, err := tunnel.NewConn(nc, info, e.Options)
	if err != nil {
		log.Warn("agent handshake failed", zap.Error(err))
		return
	}
	unregister := e.Registry.Register(conn)
	if e.Observer != nil {
		e.Observer.AgentConnected(info)
	}
	log.Info("agent connected", zap.Int64("connection_id", meta.ConnectionID), zap.Int64("pod_id", meta.PodID),
		zap.String("agent_version", meta.Version), zap.String("pod_namespace", meta.PodNamespace),
		zap.String("pod_name", meta.PodName), zap.String("kubernetes_version", meta.KubernetesVersion))
	var rc *recheck
	if e.Recheck > 0 {
		rc = &recheck{e: e, conn: conn, token: token}
		rc.schedule()
	}
	conn.AfterDone(func() {
		if rc != nil {
			rc.stop()
		}
		unregister()
		if e.Observer != nil {
			e.Observer.AgentDisconnected(info)
		}
		e.tunnelLog(conn).Info("agent disconnected", zap.Duration("connected_for", time.Since(conn.ConnectedAt())), zap.NamedError("reason", conn.Err()))
	})
}

// tunnelLog returns the logger for events of a live tunnel. It is made
// when needed rather than kept: zap encodes a logger's fields when it is
// made, and a kept one would cost each idle agent a buffer.
func (e *Endpoint) tunnelLog(conn *tunnel.Conn) *zap.Logger {
	log := e.Logger
	if log == nil {
		return zap.NewNop()
	}
	info := conn.Agent()
	return log.With(zap.String("remote_addr", info.RemoteAddr), zap.Int64("agent_id", info.ID), zap.String("agent_name", info.Name),
		zap.Int64("connection_id", info.Meta.ConnectionID), zap.Int64("pod_id", info.Meta.PodID))
}

// recheck checks the token of a connected agent again every e.Recheck and
// closes the tunnel if the token has been revoked. It runs on a timer, not
// in a goroutine of its own, and is stopped when the tunnel ends.
type recheck struct {
	e     *Endpoint
	conn  *tunnel.Conn
	token string

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
	case errors.Is(err, ErrUnknownToken), err == nil && agent.ID != r.conn.Agent().ID:
		r.e.tunnelLog(r.conn).Warn("closing tunnel: agent token revoked")
		if r.e.Observer != nil {
			r.e.Observer.AgentRefused("agent token revoked")
		}
		r.conn.Close()
		return
	case err != nil:
		r.e.tunnelLog(r.conn).Warn("cannot re-check agent token now; keeping the tunnel", zap.Error(err))
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
