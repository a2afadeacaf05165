package kubernetesagent

import (
	"testing"

	"github.com/caddy-kas/caddy-kas/caddymodule/internal/caddyfiletest"
)

// FuzzUnmarshalCaddyfile checks that parsing the kubernetes_agent
// directive never panics, and that whatever it accepts is what Caddy runs:
// encoded as the JSON config (what "caddy adapt" writes) and decoded
// again, it is the same handler.
func FuzzUnmarshalCaddyfile(f *testing.F) {
	for _, s := range []string{
		"kubernetes_agent",
		"kubernetes_agent /agents/",
		"kubernetes_agent /a/ /b/",
		"kubernetes_agent {\npath /x/\n}",
		"kubernetes_agent /agents/ {\n\tkeepalive_interval 30s\n\tkeepalive_timeout 10s\n\tagent 1 prod {\n\t\ttoken_file /etc/kas/prod.token\n\t}\n\tagent 2 staging {\n\t\ttoken {env.STAGING_TOKEN}\n\t}\n}",
		"kubernetes_agent {\nagent 1 \"two words\" {\ntoken `back tick`\n}\n}",
		"kubernetes_agent {\nagent one x {\n}\n}",
		"kubernetes_agent {\nagent 0 x\n}",
		"kubernetes_agent {\nagent 1\n}",
		"kubernetes_agent {\nkeepalive_interval soon\n}",
		"kubernetes_agent {\nkeepalive_timeout -1s\n}",
		"kubernetes_agent {\nagent 1 a {\nagent 2 b\n}\n}",
		"kubernetes_agent {\n}\n}",
		"kubernetes_agent {\n{\n}\n}",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		caddyfiletest.CheckRoundTrip[Handler](t, input)
	})
}
