// Package caddymodule registers every caddy-kas module with Caddy. Build a
// Caddy that has them with
//
//	xcaddy build --with github.com/caddy-kas/caddy-kas/caddymodule
//
// or blank-import this package in a main package next to Caddy's standard
// modules, as cmd/caddy does.
package caddymodule

import (
	_ "github.com/caddy-kas/caddy-kas/caddymodule/k8sproxy"
	_ "github.com/caddy-kas/caddy-kas/caddymodule/kasadmin"
	_ "github.com/caddy-kas/caddy-kas/caddymodule/kasapp"
	_ "github.com/caddy-kas/caddy-kas/caddymodule/kasdev"
	_ "github.com/caddy-kas/caddy-kas/caddymodule/kubernetesagent"
)
