// Package caddyfiletest holds what the fuzz targets of our directives'
// Caddyfile parsing share.
package caddyfiletest

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// Unmarshaler is a pointer to a directive's handler, which parses its
// Caddyfile tokens.
type Unmarshaler[T any] interface {
	*T
	UnmarshalCaddyfile(*caddyfile.Dispenser) error
}

// CheckRoundTrip parses input as the directive of handler type T. Parsing
// must not panic, and whatever it accepts must be what Caddy runs: encoded
// as the JSON config (what "caddy adapt" writes) and decoded again, it is
// the same handler. Inputs the Caddyfile lexer refuses are skipped.
func CheckRoundTrip[T any, P Unmarshaler[T]](t *testing.T, input string) {
	t.Helper()
	if !tokenizes(input) {
		return
	}
	var h T
	if err := P(&h).UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err != nil {
		return
	}
	b, err := json.Marshal(h)
	if err != nil {
		t.Fatalf("accepted %q, but its JSON config cannot be written: %v", input, err)
	}
	var again T
	if err := json.Unmarshal(b, &again); err != nil {
		t.Fatalf("accepted %q, but its JSON config %s cannot be read: %v", input, b, err)
	}
	if !reflect.DeepEqual(h, again) {
		t.Fatalf("accepted %q as\n%+v\nbut its JSON config %s reads as\n%+v", input, h, b, again)
	}
}

// tokenizes reports whether NewTestDispenser can read input: it exits the
// process on a Caddyfile that does not tokenize (an open quote, say), and
// it first substitutes {$ENV} placeholders, whose values depend on the
// machine.
func tokenizes(input string) bool {
	if strings.Contains(input, "{$") {
		return false
	}
	_, err := caddyfile.Tokenize([]byte(input), "Testfile")
	return err == nil
}
