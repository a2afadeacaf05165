package main

import (
	"os"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// TestCaddyfileExampleAdapts keeps Caddyfile.example valid syntax, with our
// handlers ordered before respond (which would otherwise answer every
// request of the site).
func TestCaddyfileExampleAdapts(t *testing.T) {
	body, err := os.ReadFile("../../Caddyfile.example")
	if err != nil {
		t.Fatal(err)
	}
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(body, map[string]any{"filename": "Caddyfile.example"})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range warnings {
		t.Errorf("warning: %s", w.String())
	}
	text := string(cfg)
	proxy := strings.Index(text, `"handler":"k8s_proxy"`)
	agent := strings.Index(text, `"handler":"kubernetes_agent"`)
	respond := strings.Index(text, `"handler":"static_response"`)
	if proxy < 0 || agent < 0 || respond < 0 || proxy > respond || agent > respond {
		t.Errorf("handlers missing or ordered after respond:\n%s", text)
	}
}
