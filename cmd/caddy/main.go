// Command caddy is Caddy with the standard modules and the GitLab agent
// server modules (kubernetes_agent, k8s_proxy, the kas app and the
// kas-dev command).
package main

import (
	_ "time/tzdata"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-kas/caddy-kas/caddymodule"
)

func main() {
	caddycmd.Main()
}
