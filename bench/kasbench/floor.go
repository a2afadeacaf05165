package kasbench

import (
	"context"
	"fmt"
	"strings"
	"text/template"
)

// floorName labels the rows of client → Caddy's own reverse_proxy →
// upstream: what Caddy costs by itself, the floor under ours.
const floorName = "Caddy reverse_proxy"

// floorCaddyfile proxies the k8s proxy's path with Caddy's stock
// reverse_proxy straight to the upstream: the same global options, TLS
// certificate and log level as the Caddy under test, the path prefix
// stripped as k8s_proxy strips it, and HTTPS to the upstream with the
// harness's CA, HTTP/1.1 or HTTP/2 as ALPN decides (HTTP/2 with the
// upstream, as agentk's client-go speaks to the apiserver).
var floorCaddyfile = template.Must(template.Must(caddyfile.Clone()).New("floor").Parse(`{{template "options" .}}
https://127.0.0.1:{{.HTTPSPort}} {
	tls {{.CertFile}} {{.KeyFile}}
	handle_path {{.ProxyPath}}* {
		reverse_proxy {{.Upstream}} {
			transport http {
				tls_trust_pool file {{.CAFile}}
				versions 1.1 2
			}
		}
	}
	handle {
		respond "not kas" 404
	}
}
`))

// floorProxyPath is where the floor serves the upstream: the k8s proxy's
// path in our Caddyfile, so that clients send the same URLs.
const floorProxyPath = "/-/kubernetes-agent/k8s-proxy/"

// startFloor starts a Caddy of its own (the binary under test, with
// extraEnv) that serves floorCaddyfile in front of up. Being a process of
// its own, its CPU is that of this path alone.
func startFloor(ctx context.Context, bin, dir string, p *pki, up *upstream, extraEnv []string) (*caddyServer, error) {
	c, ports, err := newCaddyServer(dir)
	if err != nil {
		return nil, err
	}
	c.proxyURL = c.siteURL + strings.TrimSuffix(floorProxyPath, "/")
	var b strings.Builder
	err = floorCaddyfile.Execute(&b, map[string]any{
		"AdminPort": ports[0], "HTTPPort": ports[1], "HTTPSPort": ports[2], "Dir": dir,
		"CertFile": p.certFile, "KeyFile": p.keyFile, "CAFile": p.caFile,
		"ProxyPath": floorProxyPath, "Upstream": up.url,
	})
	if err != nil {
		return nil, fmt.Errorf("rendering the floor's Caddyfile: %w", err)
	}
	if err := c.launch(ctx, bin, b.String(), p, extraEnv); err != nil {
		return nil, err
	}
	return c, nil
}
