package k8sproxy

import (
	"testing"

	"github.com/caddy-kas/caddy-kas/caddymodule/internal/caddyfiletest"
)

// FuzzUnmarshalCaddyfile checks that parsing the k8s_proxy directive
// never panics, and that whatever it accepts is what Caddy runs: encoded
// as the JSON config (what "caddy adapt" writes) and decoded again, it is
// the same handler.
func FuzzUnmarshalCaddyfile(f *testing.F) {
	for _, s := range []string{
		"k8s_proxy",
		"k8s_proxy /k8s/",
		"k8s_proxy /a/ /b/",
		"k8s_proxy {\npath_prefix /p/\n}",
		"k8s_proxy /k8s/ {\n\twait_for_agent 5s\n\tallowed_origin https://gitlab.example.com\n\textra_allowed_response_headers X-Custom x-other\n" +
			"\tuser dev {\n\t\ttoken_file /etc/kas/dev.token\n\t\tagents 1 2\n\t\timpersonate alice dev viewers\n\t\timpersonate_uid 1001\n" +
			"\t\timpersonate_extra team platform sre\n\t}\n\tuser ops {\n\t\ttoken {env.OPS_TOKEN}\n\t\tagents 3\n\t\tallow_impersonation\n\t}\n}",
		"k8s_proxy {\nuser a {\nagents 1 x\n}\n}",
		"k8s_proxy {\nuser a {\nagents\n}\n}",
		"k8s_proxy {\nuser a {\nimpersonate\n}\n}",
		"k8s_proxy {\nuser a {\nimpersonate_extra k\n}\n}",
		"k8s_proxy {\nuser a {\nimpersonate_uid 1\nimpersonate_extra k v\nimpersonate_extra k w\n}\n}",
		"k8s_proxy {\nuser a {\nimpersonate u\nimpersonate v g\n}\n}",
		"k8s_proxy {\nuser {\n}\n}",
		"k8s_proxy {\nuser a {\nallow_impersonation yes\n}\n}",
		"k8s_proxy {\nwait_for_agent 0\n}",
		"k8s_proxy {\nextra_allowed_response_headers\n}",
		"k8s_proxy {\nuser \"\" {\ntoken \"\"\n}\n}",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		caddyfiletest.CheckRoundTrip[Handler](t, input)
	})
}
