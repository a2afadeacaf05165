package main

import (
	"encoding/json"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// TestDirectivePathArgument: the first argument of kubernetes_agent and
// k8s_proxy is their own path, not a path matcher (which would match only
// that exact path); named matchers work as for any directive.
func TestDirectivePathArgument(t *testing.T) {
	tests := []struct {
		name      string
		site      string
		wantRoute string // the site's routes as JSON
	}{
		{
			name: "path arguments",
			site: "k8s_proxy /kas/k8s-proxy/ {\n\t\tuser a {\n\t\t\ttoken x\n\t\t\tagents 1\n\t\t}\n\t}\n\tkubernetes_agent /kas/ {\n\t\tagent 1 one {\n\t\t\ttoken y\n\t\t}\n\t}",
			wantRoute: `[{"handle":[{"handler":"k8s_proxy","path_prefix":"/kas/k8s-proxy/","users":[{"agents":[1],"location":"Caddyfile:3","name":"a","token":"x"}]},` +
				`{"agents":[{"id":1,"location":"Caddyfile:9","name":"one","token":"y"}],"handler":"kubernetes_agent","path":"/kas/"}]}]`,
		},
		{
			name: "named matcher and path argument",
			site: "@internal remote_ip 10.0.0.0/8\n\tk8s_proxy @internal /kas/k8s-proxy/ {\n\t\tuser a {\n\t\t\ttoken x\n\t\t\tagents 1\n\t\t}\n\t}",
			wantRoute: `[{"handle":[{"handler":"k8s_proxy","path_prefix":"/kas/k8s-proxy/","users":[{"agents":[1],"location":"Caddyfile:4","name":"a","token":"x"}]}],` +
				`"match":[{"remote_ip":{"ranges":["10.0.0.0/8"]}}]}]`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			caddyfile := "http://127.0.0.1:8080 {\n\t" + tt.site + "\n}\n"
			out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
			if err != nil {
				t.Fatal(err)
			}
			var cfg struct {
				Apps struct {
					HTTP struct {
						Servers map[string]struct {
							Routes []struct {
								Handle []struct {
									Routes json.RawMessage `json:"routes"`
								} `json:"handle"`
							} `json:"routes"`
						} `json:"servers"`
					} `json:"http"`
				} `json:"apps"`
			}
			if err := json.Unmarshal(out, &cfg); err != nil {
				t.Fatal(err)
			}
			got := string(cfg.Apps.HTTP.Servers["srv0"].Routes[0].Handle[0].Routes)
			if got != tt.wantRoute {
				t.Errorf("routes:\n got %s\nwant %s", got, tt.wantRoute)
			}
		})
	}
}
