package kubernetesagent

import (
	"fmt"
	"strconv"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-kas/caddy-kas/caddymodule/internal/directive"
	"github.com/caddy-kas/caddy-kas/caddymodule/internal/secret"
)

func init() {
	directive.Register("kubernetes_agent", parseCaddyfile)
	// Early in the chain, so that a site's respond, reverse_proxy or
	// encode never see agent traffic; requests for other paths pass on.
	httpcaddyfile.RegisterDirectiveOrder("kubernetes_agent", httpcaddyfile.Before, "basic_auth")
}

func parseCaddyfile(d *caddyfile.Dispenser) (caddyhttp.MiddlewareHandler, error) {
	var handler Handler
	err := handler.UnmarshalCaddyfile(d)
	return &handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	kubernetes_agent [<path>] {
//	    path               <path>
//	    keepalive_interval <duration>
//	    keepalive_timeout  <duration>
//	    connections_per_token_per_minute <n>
//	    agent <id> <name> {
//	        token      <token or placeholder>
//	        token_file <path>
//	    }
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		h.Path = d.Val()
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "path":
			if !d.AllArgs(&h.Path) {
				return d.ArgErr()
			}
		case "keepalive_interval":
			if err := directive.ParseDuration(d, &h.KeepaliveInterval); err != nil {
				return err
			}
		case "keepalive_timeout":
			if err := directive.ParseDuration(d, &h.KeepaliveTimeout); err != nil {
				return err
			}
		case "connections_per_token_per_minute":
			var v string
			if !d.AllArgs(&v) {
				return d.ArgErr()
			}
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				return d.Errf("connections_per_token_per_minute: %q is not a whole number of connections (0: the default, 40000)", v)
			}
			h.ConnectionsPerTokenPerMinute = n
		case "agent":
			a, err := parseAgent(d)
			if err != nil {
				return err
			}
			h.Agents = append(h.Agents, a)
		default:
			return d.Errf("unrecognized subdirective %q", d.Val())
		}
	}
	return nil
}

func parseAgent(d *caddyfile.Dispenser) (Agent, error) {
	var a Agent
	var id string
	if !d.Args(&id, &a.Name) {
		return a, d.Err("agent needs an id and a name: agent <id> <name> { token ... }")
	}
	n, err := strconv.ParseInt(id, 10, 64)
	if err != nil || n <= 0 {
		return a, d.Errf("agent id %q is not a positive integer", id)
	}
	a.ID = n
	a.Location = directive.Location(d)
	if d.NextArg() {
		return a, d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "token", "token_file":
			if err := secret.UnmarshalCaddyfile(d, &a.Token, &a.TokenFile); err != nil {
				return a, err
			}
		default:
			return a, d.Errf("unrecognized agent subdirective %q", d.Val())
		}
	}
	if a.Token == "" && a.TokenFile == "" {
		return a, directive.At(fmt.Errorf("agent %d (%s) needs a token or token_file", a.ID, a.Name), a.Location)
	}
	return a, nil
}

// Interface guard
var _ caddyfile.Unmarshaler = (*Handler)(nil)
