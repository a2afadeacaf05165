// Package directive holds what the Caddyfile directives of the kas
// handlers share: registering a directive whose first argument is a path
// of its own, the place of a declaration for errors found later, and
// duration arguments.
package directive

import (
	"fmt"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Register registers a handler directive like
// httpcaddyfile.RegisterHandlerDirective, except that a first argument
// starting with "/" is left to unmarshal as the handler's own path rather
// than taken as a path matcher. With Caddy's usual parsing,
// "k8s_proxy /kas/k8s-proxy/" would match only that exact path and keep
// the default prefix: every request below it would pass the handler by.
// A named matcher ("@name") still works as for any directive.
func Register(name string, unmarshal func(d *caddyfile.Dispenser) (caddyhttp.MiddlewareHandler, error)) {
	httpcaddyfile.RegisterDirective(name, func(h httpcaddyfile.Helper) ([]httpcaddyfile.ConfigValue, error) {
		if !h.Next() {
			return nil, h.ArgErr()
		}
		var matcherSet caddy.ModuleMap
		if h.NextArg() && strings.HasPrefix(h.Val(), "@") {
			h.Prev()
			var err error
			if matcherSet, err = h.ExtractMatcherSet(); err != nil {
				return nil, err
			}
		}
		h.Reset()
		handler, err := unmarshal(h.Dispenser)
		if err != nil {
			return nil, err
		}
		return h.NewRoute(matcherSet, handler), nil
	})
}

// Location returns where the current token of d is, as "file:line", for
// errors that are found after parsing (a token file that cannot be read,
// an agent that no handler declares) and should point into the Caddyfile
// as parsing errors do.
func Location(d *caddyfile.Dispenser) string {
	return fmt.Sprintf("%s:%d", d.File(), d.Line())
}

// At adds location (from [Location]; none if empty) to err the way Caddy's
// own Caddyfile errors carry theirs.
func At(err error, location string) error {
	if location == "" {
		return err
	}
	return fmt.Errorf("%w, at %s", err, location)
}

// ParseDuration parses the one argument of the subdirective at the cursor
// of d, a duration in Caddy's syntax, into dst.
func ParseDuration(d *caddyfile.Dispenser, dst *caddy.Duration) error {
	name := d.Val()
	var v string
	if !d.AllArgs(&v) {
		return d.ArgErr()
	}
	dur, err := caddy.ParseDuration(v)
	if err != nil {
		return d.Errf("%s: %v", name, err)
	}
	*dst = caddy.Duration(dur)
	return nil
}
