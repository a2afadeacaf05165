// Package secret loads tokens that the Caddy configuration names.
package secret

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// Load returns a secret given either inline (value, where global
// placeholders such as {env.AGENT_TOKEN} or {file./run/secrets/token} are
// replaced) or as the path of a file holding it. Surrounding whitespace
// (a trailing newline in a file, say) is not part of the secret. Errors
// name what was configured, never the secret.
func Load(value, file string) (string, error) {
	switch {
	case value != "" && file != "":
		return "", errors.New("give either a token or a token file, not both")
	case file != "":
		b, err := os.ReadFile(file)
		if err != nil {
			return "", fmt.Errorf("reading token file: %w", err)
		}
		s := strings.TrimSpace(string(b))
		if s == "" {
			return "", fmt.Errorf("token file %s is empty", file)
		}
		return s, nil
	case value != "":
		s := strings.TrimSpace(caddy.NewReplacer().ReplaceKnown(value, ""))
		if s == "" {
			return "", fmt.Errorf("token %s is empty once placeholders are replaced (is the environment variable or file there?)", describe(value))
		}
		return s, nil
	default:
		return "", errors.New("no token configured")
	}
}

// describe names an inline token in an error: placeholders are shown, a
// literal secret is not.
func describe(value string) string {
	if strings.HasPrefix(value, "{") && strings.HasSuffix(value, "}") {
		return value
	}
	return "(literal)"
}

// UnmarshalCaddyfile parses the token or token_file subdirective at the
// cursor of d into value or file. Giving both is an error there, with its
// place in the Caddyfile.
func UnmarshalCaddyfile(d *caddyfile.Dispenser, value, file *string) error {
	dst, other := value, *file
	if d.Val() == "token_file" {
		dst, other = file, *value
	}
	if !d.AllArgs(dst) {
		return d.ArgErr()
	}
	if other != "" {
		return d.Err("give either token or token_file, not both")
	}
	return nil
}
