// Package kasadmin is the admin.api.kas Caddy admin module: the agent
// server's admin API on Caddy's admin endpoint. It lists the agents
// connected to this node, shows one, and disconnects one (for a token
// rotation).
//
// Its routes are served by Caddy's admin endpoint like Caddy's own /config/
// and /stop: behind the same Host and Origin checks on the local endpoint,
// and behind the client certificates and per-path permissions of the
// remote one when "admin.remote" is configured. It has no configuration.
package kasadmin

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/agentadmin"
	"github.com/caddy-kas/caddy-kas/caddymodule/kasapp"
	"github.com/caddy-kas/caddy-kas/tunnel"
)

func init() {
	caddy.RegisterModule(new(Admin))
}

// Paths of the API.
const (
	// agentsPath lists the connected agents.
	agentsPath = "/kas/agents"
	// agentPrefix is followed by an agent id, optionally followed by
	// disconnectSuffix.
	agentPrefix      = agentsPath + "/"
	disconnectSuffix = "/disconnect"
)

// Admin serves the admin API. Caddy creates and provisions one for every
// configuration and every admin endpoint (local and remote).
type Admin struct {
	// store returns the tunnel store, or nil while no configuration holds
	// one; it is kasapp.LocalStore outside tests.
	store func() *tunnel.Store
	// node names this node in answers: its host name, empty if it could
	// not be read.
	node   string
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (*Admin) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.kas",
		New: func() caddy.Module { return new(Admin) },
	}
}

// Provision finds the node's name. The tunnel store is looked up per
// request (see [kasapp.LocalStore]): Caddy provisions admin modules before
// the apps of the same configuration.
func (a *Admin) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger(a)
	a.store = kasapp.LocalStore
	// The node's name only labels answers; failing to read it must not
	// keep Caddy from loading its configuration.
	node, err := os.Hostname()
	if err != nil {
		a.logger.Warn("cannot read the host name to name this node in admin API answers", zap.Error(err))
	}
	a.node = node
	return nil
}

// Routes returns the API's routes. Caddy's admin mux sends every path under
// agentPrefix to one handler, which parses the rest itself.
func (a *Admin) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: agentsPath, Handler: caddy.AdminHandlerFunc(a.serveAgents)},
		{Pattern: agentPrefix, Handler: caddy.AdminHandlerFunc(a.serveAgent)},
	}
}

// serveAgents answers GET /kas/agents.
func (a *Admin) serveAgents(w http.ResponseWriter, r *http.Request) error {
	if err := requireMethod(w, r, http.MethodGet); err != nil {
		return err
	}
	if r.URL.Query().Get("scope") == "all" {
		// Every node's agents, from the registry they share.
		reg := kasapp.SharedRegistry()
		if reg == nil {
			return caddy.APIError{HTTPStatus: http.StatusNotFound,
				Err: errors.New("scope=all lists the agents of every node sharing a Redis registry, and this node shares none")}
		}
		conns, err := reg.AllConnections(r.Context())
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: fmt.Errorf("listing every node's agents: %w", err)}
		}
		return writeJSON(w, agentadmin.ListShared(conns, a.node))
	}
	return writeJSON(w, agentadmin.List(a.store(), a.node))
}

// serveAgent answers GET /kas/agents/<id> and
// POST /kas/agents/<id>/disconnect.
func (a *Admin) serveAgent(w http.ResponseWriter, r *http.Request) error {
	rest := strings.TrimPrefix(r.URL.Path, agentPrefix)
	idText, disconnect := strings.CutSuffix(rest, disconnectSuffix)
	id, err := strconv.ParseInt(idText, 10, 64)
	if err != nil || id <= 0 {
		return caddy.APIError{
			HTTPStatus: http.StatusNotFound,
			Err:        fmt.Errorf("no such path %q: want %s<agent id> or %s<agent id>%s with a positive decimal agent id", r.URL.Path, agentPrefix, agentPrefix, disconnectSuffix),
		}
	}
	if disconnect {
		return a.disconnect(w, r, id)
	}
	if err := requireMethod(w, r, http.MethodGet); err != nil {
		return err
	}
	answer, ok := agentadmin.Get(a.store(), a.node, id)
	if !ok {
		return caddy.APIError{
			HTTPStatus: http.StatusNotFound,
			Err:        fmt.Errorf("agent %d: %w to this node", id, tunnel.ErrNoConnection),
		}
	}
	return writeJSON(w, answer)
}

// disconnect closes the agent's tunnels on this node. It is a POST: it
// changes state, and Caddy's admin endpoint refuses cross-origin browser
// requests to it.
func (a *Admin) disconnect(w http.ResponseWriter, r *http.Request, id int64) error {
	if err := requireMethod(w, r, http.MethodPost); err != nil {
		return err
	}
	d := agentadmin.Disconnect(a.store(), a.node, id)
	a.logger.Info("closed agent tunnels on admin request",
		zap.Int64("agent_id", id), zap.Int("closed", d.Closed), zap.Int64s("connection_ids", d.ConnectionIDs))
	return writeJSON(w, d)
}

// writeJSON answers 200 with v in JSON.
func writeJSON(w http.ResponseWriter, v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encoding answer: %w", err)
	}
	w.Header().Set("Content-Type", "application/json")
	// A failed write means the client went away: no one is left to
	// answer, so it is not passed on to Caddy's error handler.
	w.Write(append(body, '\n'))
	return nil
}

// errMethod is wrapped by the refusal of a request with the wrong method.
var errMethod = errors.New("method not allowed")

// requireMethod refuses a request whose method is not method, with 405
// and an Allow header (RFC 9110 §15.5.6).
func requireMethod(w http.ResponseWriter, r *http.Request, method string) error {
	if r.Method == method {
		return nil
	}
	w.Header().Set("Allow", method)
	return caddy.APIError{
		HTTPStatus: http.StatusMethodNotAllowed,
		Err:        fmt.Errorf("%w: %s %s, want %s", errMethod, r.Method, r.URL.Path, method),
	}
}

// Interface guards
var (
	_ caddy.AdminRouter = (*Admin)(nil)
	_ caddy.Provisioner = (*Admin)(nil)
)
