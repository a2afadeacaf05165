// Package k8sproxy is the k8s_proxy Caddy handler: the Kubernetes API
// proxy that kubectl, CI jobs and the GitLab UI talk to.
package k8sproxy

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/caddymodule/internal/directive"
	"github.com/caddy-kas/caddy-kas/caddymodule/internal/metrics"
	"github.com/caddy-kas/caddy-kas/caddymodule/internal/secret"
	"github.com/caddy-kas/caddy-kas/caddymodule/internal/streams"
	"github.com/caddy-kas/caddy-kas/caddymodule/kasapp"
	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/internal/buildinfo"
	"github.com/caddy-kas/caddy-kas/kubeproxy"
	"github.com/caddy-kas/caddy-kas/tunnel"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// DefaultPathPrefix is where GitLab's Omnibus serves the proxy
// (external_k8s_proxy_url); kubeconfigs point their server there.
const DefaultPathPrefix = "/-/kubernetes-agent/k8s-proxy/"

// Handler proxies requests under PathPrefix to the agents' clusters and
// passes every other request on to the next handler.
type Handler struct {
	// PathPrefix is the URL path the proxy serves; it is removed before
	// the request reaches the cluster. A missing trailing slash is added.
	// Default: "/-/kubernetes-agent/k8s-proxy/".
	PathPrefix string `json:"path_prefix,omitempty"`

	// WaitForAgent is how long a request for an agent that has no tunnel
	// waits for one to appear before it fails with 502. Default: 20s, as
	// GitLab's KAS.
	WaitForAgent caddy.Duration `json:"wait_for_agent,omitempty"`

	// ReconnectWindow limits that wait to agents that may be reconnecting:
	// a request waits only until this long after the agent's last tunnel
	// on this server closed, or after the server started for an agent not
	// connected since, and fails with 502 at once for any other agent, so
	// that kubectl does not wait for an agent long gone. A negative window
	// waits for every agent, as GitLab's KAS does. Default: 30s, longer
	// than the reconnect backoff of GitLab's agentk and ours (at most 20 s
	// plus jitter).
	ReconnectWindow caddy.Duration `json:"reconnect_window,omitempty"`

	// AllowedOrigin is the one browser origin allowed to call the proxy
	// with credentials (CORS), as "https://host[:port]"; a request with any
	// other Origin is refused. Default: GitLab's external URL in GitLab
	// mode; none in standalone mode, where Origin is ignored.
	AllowedOrigin string `json:"allowed_origin,omitempty"`

	// ExtraAllowedResponseHeaders names headers of the cluster's answers
	// that reach the client besides the default allowlist, as GitLab's
	// extra_allowed_response_headers does; names are compared without
	// case. The default allowlist holds what a kube-apiserver sends:
	// Content-Type, Content-Length, Content-Encoding, Content-Range,
	// Accept-Ranges, Cache-Control, Expires, ETag, Last-Modified, Vary,
	// Date, Location, Retry-After, Warning, Via, X-Content-Type-Options,
	// Audit-Id, X-Kubernetes-Pf-Flowschema-Uid,
	// X-Kubernetes-Pf-Prioritylevel-Uid, and for exec, attach and
	// port-forward X-Stream-Protocol-Version,
	// X-Accepted-Stream-Protocol-Versions, Sec-WebSocket-Accept,
	// Sec-WebSocket-Protocol and Sec-WebSocket-Extensions. Every other
	// header is dropped and logged as "Blocked Kubernetes API proxy
	// response header" (at most once a minute per name). Hop-by-hop
	// headers, Gitlab-Unauthorized and Kas-* cannot be allowed. Default:
	// none.
	ExtraAllowedResponseHeaders []string `json:"extra_allowed_response_headers,omitempty"`

	// Users are the tokens that may use the proxy (standalone mode). Leave
	// it empty in GitLab mode, where GitLab authenticates CI jobs and
	// users.
	// Clients send "Authorization: Bearer pat:<agent id>:<token>", the
	// same form as GitLab personal access tokens.
	Users []User `json:"users,omitempty"`

	proxy      *kubeproxy.Proxy
	gitlabMode bool
}

// User is a token allowed to use the proxy, and what it may reach.
type User struct {
	// Name identifies the user in logs.
	Name string `json:"name"`

	// Token is the user's secret. Global placeholders such as
	// {env.KAS_USER_TOKEN} or {file./run/secrets/token} are replaced once,
	// when the configuration loads. Give Token or TokenFile.
	Token string `json:"token,omitempty"`

	// TokenFile is the path of a file holding the user's secret, read
	// when the configuration loads. Give Token or TokenFile.
	TokenFile string `json:"token_file,omitempty"`

	// Agents are the ids of the agents this token may reach.
	Agents []int64 `json:"agents,omitempty"`

	// Impersonate, if set, is the Kubernetes identity every request of
	// this user has on the cluster. Without it, requests have the agent's
	// own identity (its service account).
	Impersonate *identity.Identity `json:"impersonate,omitempty"`

	// AllowImpersonation lets the client's own Impersonate-* headers
	// (kubectl --as, --as-group) reach the cluster, where RBAC decides.
	// Without it such requests are refused with 403. It cannot be combined
	// with Impersonate (that would be nested impersonation). Default: false.
	AllowImpersonation bool `json:"allow_impersonation,omitempty"`

	// Location is where the user is declared, as "file:line", so that
	// errors found when the configuration loads (a token file that cannot
	// be read, an agent that no kubernetes_agent declares) point there.
	// The Caddyfile adapter sets it. Default: none.
	Location string `json:"location,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.k8s_proxy",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision loads the users' tokens and connects to the tunnel router.
func (h *Handler) Provision(ctx caddy.Context) error {
	app, err := kasapp.FromContext(ctx)
	if err != nil {
		return err
	}
	if err := h.setup(app.Router(), app.GitLabMode(), ctx.Logger()); err != nil {
		return err
	}
	app.ReferAgents(h.agentRefs()...)
	h.proxy.Observer = metrics.Proxy{}
	return metrics.Register(ctx)
}

// setup is Provision once the app is found; gitlab is nil in standalone
// mode.
func (h *Handler) setup(router *tunnel.Router, gitlab *kasapp.GitLabMode, logger *zap.Logger) error {
	if h.PathPrefix == "" {
		h.PathPrefix = DefaultPathPrefix
	}
	if !strings.HasSuffix(h.PathPrefix, "/") {
		h.PathPrefix += "/"
	}
	if gitlab != nil {
		if len(h.Users) > 0 {
			return errors.New("k8s_proxy: users are declared in GitLab mode; GitLab authenticates CI jobs and users: remove them, or the gitlab settings of the kas global option")
		}
		h.gitlabMode = true
		origin := h.AllowedOrigin
		if origin == "" {
			origin = gitlab.AllowedOrigin
		}
		h.proxy = &kubeproxy.Proxy{
			Prefix:        h.PathPrefix,
			Auth:          gitlab.Proxy,
			Router:        router,
			WaitForAgent:  time.Duration(h.WaitForAgent),
			Logger:        logger,
			AllowedOrigin: origin,
			Via:           via(),

			ReconnectWindow:             time.Duration(h.ReconnectWindow),
			ExtraAllowedResponseHeaders: h.ExtraAllowedResponseHeaders,
		}
		return nil
	}
	if h.WaitForAgent == 0 {
		h.WaitForAgent = caddy.Duration(kubeproxy.DefaultWaitForAgent)
	}
	users := make([]kubeproxy.User, 0, len(h.Users))
	var errs []error
	for _, u := range h.Users {
		token, err := secret.Load(u.Token, u.TokenFile)
		if err != nil {
			errs = append(errs, directive.At(fmt.Errorf("user %q: %w", u.Name, err), u.Location))
			continue
		}
		ku := kubeproxy.User{Name: u.Name, Token: token, Agents: u.Agents, AllowImpersonation: u.AllowImpersonation}
		ku.Impersonate = u.Impersonate
		users = append(users, ku)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("k8s_proxy: %w", err)
	}
	auth, err := kubeproxy.NewStaticAuthenticator(users)
	if err != nil {
		return fmt.Errorf("k8s_proxy: %w", err)
	}
	h.proxy = &kubeproxy.Proxy{
		Prefix:        h.PathPrefix,
		Auth:          auth,
		Router:        router,
		WaitForAgent:  time.Duration(h.WaitForAgent),
		Logger:        logger,
		AllowedOrigin: h.AllowedOrigin,
		Via:           via(),

		ReconnectWindow:             time.Duration(h.ReconnectWindow),
		ExtraAllowedResponseHeaders: h.ExtraAllowedResponseHeaders,
	}
	return nil
}

// agentRefs returns the agents the users may reach, for the kas app to
// check that each is declared.
func (h *Handler) agentRefs() []kasapp.AgentRef {
	var refs []kasapp.AgentRef
	for _, u := range h.Users {
		by := fmt.Sprintf("k8s_proxy user %q", u.Name)
		if u.Location != "" {
			by += ", at " + u.Location + ","
		}
		for _, id := range u.Agents {
			refs = append(refs, kasapp.AgentRef{ID: id, By: by})
		}
	}
	return refs
}

// via is how the proxy names itself in Via headers.
func via() string { return "caddy-kas/" + buildinfo.Version() }

// Validate checks the configuration.
func (h *Handler) Validate() error {
	if !strings.HasPrefix(h.PathPrefix, "/") {
		return fmt.Errorf("k8s_proxy: path_prefix %q must start with /", h.PathPrefix)
	}
	if h.WaitForAgent < 0 {
		return errors.New("k8s_proxy: wait_for_agent must not be negative")
	}
	if err := kubeproxy.CheckExtraAllowedResponseHeaders(h.ExtraAllowedResponseHeaders); err != nil {
		return fmt.Errorf("k8s_proxy: extra_allowed_response_headers: %w", err)
	}
	if len(h.Users) == 0 && !h.gitlabMode {
		return errors.New("k8s_proxy: no users declared; declare users, or put the server in GitLab mode (kas global option, gitlab block)")
	}
	return nil
}

// ServeHTTP proxies requests under PathPrefix and passes everything else on.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if !strings.HasPrefix(r.URL.Path, h.PathPrefix) && r.URL.Path != strings.TrimSuffix(h.PathPrefix, "/") {
		return next.ServeHTTP(w, r)
	}
	defer streams.LiftIdleTimeouts(r)()
	h.proxy.ServeHTTP(w, r)
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
