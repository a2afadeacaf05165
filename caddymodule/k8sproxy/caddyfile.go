package k8sproxy

import (
	"fmt"
	"strconv"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-kas/caddy-kas/caddymodule/internal/directive"
	"github.com/caddy-kas/caddy-kas/caddymodule/internal/secret"
	"github.com/caddy-kas/caddy-kas/identity"
)

func init() {
	directive.Register("k8s_proxy", parseCaddyfile)
	// Early in the chain, so that a site's respond, reverse_proxy or
	// encode (which would buffer watches) never see proxied requests;
	// requests outside the prefix pass on.
	httpcaddyfile.RegisterDirectiveOrder("k8s_proxy", httpcaddyfile.Before, "basic_auth")
}

func parseCaddyfile(d *caddyfile.Dispenser) (caddyhttp.MiddlewareHandler, error) {
	var handler Handler
	err := handler.UnmarshalCaddyfile(d)
	return &handler, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	k8s_proxy [<path_prefix>] {
//	    path_prefix    <path>
//	    wait_for_agent <duration>
//	    reconnect_window <duration>
//	    allowed_origin <origin>
//	    extra_allowed_response_headers <name>...
//	    user <name> {
//	        token       <token or placeholder>
//	        token_file  <path>
//	        agents      <id>...
//	        impersonate <username> [<group>...]
//	        impersonate_uid   <uid>
//	        impersonate_extra <key> <value>...
//	        allow_impersonation
//	    }
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		h.PathPrefix = d.Val()
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "path_prefix":
			if !d.AllArgs(&h.PathPrefix) {
				return d.ArgErr()
			}
		case "wait_for_agent":
			if err := directive.ParseDuration(d, &h.WaitForAgent); err != nil {
				return err
			}
		case "reconnect_window":
			if err := directive.ParseDuration(d, &h.ReconnectWindow); err != nil {
				return err
			}
		case "allowed_origin":
			if !d.AllArgs(&h.AllowedOrigin) {
				return d.ArgErr()
			}
		case "extra_allowed_response_headers":
			names := d.RemainingArgs()
			if len(names) == 0 {
				return d.ArgErr()
			}
			h.ExtraAllowedResponseHeaders = append(h.ExtraAllowedResponseHeaders, names...)
		case "user":
			u, err := parseUser(d)
			if err != nil {
				return err
			}
			h.Users = append(h.Users, u)
		default:
			return d.Errf("unrecognized subdirective %q", d.Val())
		}
	}
	return nil
}

func parseUser(d *caddyfile.Dispenser) (User, error) {
	var u User
	if !d.AllArgs(&u.Name) {
		return u, d.Err("user needs a name: user <name> { token ... }")
	}
	u.Location = directive.Location(d)
	impersonate := func() *identity.Identity {
		if u.Impersonate == nil {
			u.Impersonate = &identity.Identity{}
		}
		return u.Impersonate
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "token", "token_file":
			if err := secret.UnmarshalCaddyfile(d, &u.Token, &u.TokenFile); err != nil {
				return u, err
			}
		case "agents":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return u, d.ArgErr()
			}
			for _, a := range args {
				id, err := strconv.ParseInt(a, 10, 64)
				if err != nil || id <= 0 {
					return u, d.Errf("agent id %q is not a positive integer", a)
				}
				u.Agents = append(u.Agents, id)
			}
		case "impersonate":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return u, d.Err("impersonate needs a username, then optional groups")
			}
			id := impersonate()
			id.Username, id.Groups = args[0], append(id.Groups, args[1:]...)
		case "impersonate_uid":
			if !d.AllArgs(&impersonate().UID) {
				return u, d.ArgErr()
			}
		case "impersonate_extra":
			args := d.RemainingArgs()
			if len(args) < 2 {
				return u, d.Err("impersonate_extra needs a key and at least one value")
			}
			id := impersonate()
			if id.Extra == nil {
				id.Extra = map[string][]string{}
			}
			id.Extra[args[0]] = append(id.Extra[args[0]], args[1:]...)
		case "allow_impersonation":
			if d.NextArg() {
				return u, d.ArgErr()
			}
			u.AllowImpersonation = true
		default:
			return u, d.Errf("unrecognized user subdirective %q", d.Val())
		}
	}
	if u.Token == "" && u.TokenFile == "" {
		return u, directive.At(fmt.Errorf("user %q needs a token or token_file", u.Name), u.Location)
	}
	return u, nil
}

// Interface guard
var _ caddyfile.Unmarshaler = (*Handler)(nil)
