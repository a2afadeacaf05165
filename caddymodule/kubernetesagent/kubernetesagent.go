// Package kubernetesagent is the kubernetes_agent Caddy handler: the
// endpoint agentk connects to.
package kubernetesagent

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/agentserver"
	"github.com/caddy-kas/caddy-kas/caddymodule/internal/directive"
	"github.com/caddy-kas/caddy-kas/caddymodule/internal/metrics"
	"github.com/caddy-kas/caddy-kas/caddymodule/internal/secret"
	"github.com/caddy-kas/caddy-kas/caddymodule/internal/streams"
	"github.com/caddy-kas/caddy-kas/caddymodule/kasapp"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// DefaultPath is where GitLab's Omnibus serves the agent endpoint; agentk's
// --kas-address is wss://<host>/-/kubernetes-agent/ (trailing slash and all).
const DefaultPath = "/-/kubernetes-agent/"

// Handler accepts agentk's tunnels at Path and passes every other request
// on to the next handler, so it can sit in a site block next to anything
// else. A tunnel is a hijacked connection: Caddy's read and write timeouts
// do not apply to it, and it survives configuration reloads.
type Handler struct {
	// Path is the URL path agentk connects to. The same path without its
	// trailing slash is accepted too. Default: "/-/kubernetes-agent/".
	Path string `json:"path,omitempty"`

	// Agents are the agents allowed to connect, with their tokens
	// (standalone mode). Leave it empty in GitLab mode (the kas app's
	// gitlab settings), where GitLab knows the agents and their tokens.
	Agents []Agent `json:"agents,omitempty"`

	// KeepaliveInterval is how long a tunnel may be silent before KAS
	// sends an HTTP/2 PING to check the agent is still there. Default: 10s.
	KeepaliveInterval caddy.Duration `json:"keepalive_interval,omitempty"`

	// KeepaliveTimeout is how long a PING may go unanswered before the
	// tunnel is closed and requests on it fail. Default: 5s.
	KeepaliveTimeout caddy.Duration `json:"keepalive_timeout,omitempty"`

	// ConnectionsPerTokenPerMinute is how many connections one agent
	// token may open in a minute of the clock; more are refused until the
	// next minute: our agentk's handshakes with 429 and Retry-After, and
	// GitLab's agentk, each of whose gRPC calls counts (as GitLab's KAS
	// counts them), with ResourceExhausted. Connections are counted per
	// token across all kubernetes_agent handlers of the process, once the
	// token is known to be valid. Zero means the default, 40000, as
	// GitLab's connections_per_token_per_minute, which cannot be turned
	// off either.
	ConnectionsPerTokenPerMinute uint64 `json:"connections_per_token_per_minute,omitempty"`

	endpoint   *agentserver.Endpoint
	agents     *agentserver.StaticAgents // nil in GitLab mode
	gitlabMode bool
}

// Agent is an agent allowed to connect.
type Agent struct {
	// ID is the agent's id, a positive integer; k8s_proxy clients name
	// it in their tokens ("pat:<id>:<token>").
	ID int64 `json:"id"`

	// Name is the agent's name, for logs.
	Name string `json:"name"`

	// Token is the agent's secret, as agentk sends it. Global placeholders
	// such as {env.AGENT_TOKEN} or {file./run/secrets/agent} are replaced
	// once, when the configuration loads. Give Token or TokenFile.
	Token string `json:"token,omitempty"`

	// TokenFile is the path of a file holding the agent's secret,
	// read when the configuration loads. Give Token or TokenFile.
	TokenFile string `json:"token_file,omitempty"`

	// Location is where the agent is declared, as "file:line", so that
	// errors found when the configuration loads (a token file that cannot
	// be read) point there. The Caddyfile adapter sets it. Default: none.
	Location string `json:"location,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.kubernetes_agent",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision loads the agents' tokens and connects to the tunnel store.
func (h *Handler) Provision(ctx caddy.Context) error {
	app, err := kasapp.FromContext(ctx)
	if err != nil {
		return err
	}
	if err := h.setup(app.Store(), app.GRPCTunnels(), app.ConnectionCounter(), app.GitLabMode(), ctx.Logger()); err != nil {
		return err
	}
	if h.agents != nil {
		app.DeclareAgents(h.agents)
		for _, a := range h.Agents {
			app.DeclareAgentIDs(a.ID)
		}
	}
	h.endpoint.MaxConnectionAge = app.TunnelMaxAge()
	h.endpoint.Observer = metrics.Agents{}
	h.endpoint.Registry = app.Registry()
	return metrics.Register(ctx)
}

// setup is Provision once the app is found; gitlab is nil in standalone
// mode.
func (h *Handler) setup(store *tunnel.Store, grpcTunnels *grpctunnel.Server, conns agentserver.ConnectionCounter, gitlab *kasapp.GitLabMode, logger *zap.Logger) error {
	if h.Path == "" {
		h.Path = DefaultPath
	}
	options := h2tunnel.Options{
		KeepaliveInterval: time.Duration(h.KeepaliveInterval),
		KeepaliveTimeout:  time.Duration(h.KeepaliveTimeout),
	}
	if gitlab != nil {
		if len(h.Agents) > 0 {
			return errors.New("kubernetes_agent: agents are declared in GitLab mode; GitLab knows the agents: remove them, or the gitlab settings of the kas global option")
		}
		h.gitlabMode = true
		h.endpoint = &agentserver.Endpoint{
			Auth:                 gitlab.Agents,
			Store:                store,
			H2Tunnel:             options,
			GRPC:                 grpcTunnels,
			Logger:               logger,
			Recheck:              gitlab.AgentRecheck,
			Connections:          conns,
			ConnectionsPerMinute: h.ConnectionsPerTokenPerMinute,
			Configs:              gitlab.Configs,
			GitLabExternalURL:    gitlab.ExternalURL,
		}
		return nil
	}
	agents := make([]agentserver.StaticAgent, 0, len(h.Agents))
	var errs []error
	for _, a := range h.Agents {
		token, err := secret.Load(a.Token, a.TokenFile)
		if err != nil {
			errs = append(errs, directive.At(fmt.Errorf("agent %d (%s): %w", a.ID, a.Name, err), a.Location))
			continue
		}
		agents = append(agents, agentserver.StaticAgent{ID: a.ID, Name: a.Name, Token: token})
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	auth, err := agentserver.NewStaticAgents(agents)
	if err != nil {
		return fmt.Errorf("kubernetes_agent: %w", err)
	}
	h.agents = auth
	h.endpoint = &agentserver.Endpoint{
		Auth:                 auth,
		Store:                store,
		H2Tunnel:             options,
		GRPC:                 grpcTunnels,
		Logger:               logger,
		Connections:          conns,
		ConnectionsPerMinute: h.ConnectionsPerTokenPerMinute,
	}
	return nil
}

// Validate checks the configuration.
func (h *Handler) Validate() error {
	if !strings.HasPrefix(h.Path, "/") {
		return fmt.Errorf("kubernetes_agent: path %q must start with /", h.Path)
	}
	if len(h.Agents) == 0 && !h.gitlabMode {
		return errors.New("kubernetes_agent: no agents declared; declare agents, or put the server in GitLab mode (kas global option, gitlab block)")
	}
	if h.KeepaliveInterval < 0 || h.KeepaliveTimeout < 0 {
		return errors.New("kubernetes_agent: keepalive durations must not be negative")
	}
	return nil
}

// ServeHTTP serves agent connections at Path, and the gRPC calls GitLab's
// agentk makes on the site's own HTTP/2 connections when it is configured
// with a grpc:// or grpcs:// address (they come at the site's root, under
// the service names); it passes everything else on.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	switch {
	case grpctunnel.IsGRPC(r):
		defer streams.LiftIdleTimeouts(r)()
		h.endpoint.ServeGRPC(w, r)
	case r.URL.Path == h.Path || r.URL.Path == strings.TrimSuffix(h.Path, "/"):
		h.endpoint.ServeHTTP(w, r)
	default:
		return next.ServeHTTP(w, r)
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
