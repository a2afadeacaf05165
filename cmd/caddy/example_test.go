package main

import (
	"os"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// TestCaddyfileExamplesAdapt keeps the example Caddyfiles valid syntax,
// with our handlers ordered before the site's own terminal handler
// (respond or reverse_proxy), which would otherwise answer every request.
func TestCaddyfileExamplesAdapt(t *testing.T) {
	tests := []struct {
		file     string
		terminal string
		want     []string // more JSON the adapted config must contain
	}{
		{"Caddyfile.example", `"handler":"reverse_proxy"`, []string{`"gitlab":{"url":"http://127.0.0.1:8181"`, `"api_listen":"127.0.0.1:8153"`}},
		{"Caddyfile.standalone.example", `"handler":"static_response"`, []string{`"agents":[`, `"users":[`}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			body, err := os.ReadFile("../../" + tt.file)
			if err != nil {
				t.Fatal(err)
			}
			cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(body, map[string]any{"filename": tt.file})
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range warnings {
				t.Errorf("warning: %s", w.String())
			}
			text := string(cfg)
			proxy := strings.Index(text, `"handler":"k8s_proxy"`)
			agent := strings.Index(text, `"handler":"kubernetes_agent"`)
			terminal := strings.Index(text, tt.terminal)
			if proxy < 0 || agent < 0 || terminal < 0 || proxy > terminal || agent > terminal {
				t.Errorf("handlers missing or ordered after %s:\n%s", tt.terminal, text)
			}
			for _, w := range tt.want {
				if !strings.Contains(text, w) {
					t.Errorf("adapted config lacks %s:\n%s", w, text)
				}
			}
		})
	}
}
