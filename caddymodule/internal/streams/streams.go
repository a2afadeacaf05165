// Package streams lifts Caddy's idle timeouts for requests that are
// long-lived streams: proxied Kubernetes requests (watches, logs -f, exec)
// and the gRPC calls of GitLab's agentk.
package streams

import (
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// idleTimeout replaces Caddy's read_body_idle and write_idle (one minute
// by default) for a stream. Caddy re-arms them before every read and
// write, so a silent watch is safe anyway; what they cut is a write that
// stays blocked because the client stopped reading ("kubectl logs -f |
// less" paused, a laptop asleep), a body the client pauses mid-way, or a
// read of a gRPC stream on which the agent has nothing to send (an idle
// tunnel stream, the configuration stream). GitLab's KAS has no write
// timeout for these reasons (its MR !731); a stalled peer only holds its
// own stream, bounded by flow control. Dead peers are still found: by TCP,
// Caddy's and the tunnels' keepalives.
const idleTimeout = 100 * 365 * 24 * time.Hour

// LiftIdleTimeouts lifts Caddy's idle timeouts for the request r; the
// returned function restores them and must be called when the request
// ends.
func LiftIdleTimeouts(r *http.Request) (restore func()) {
	reader, writer := caddyhttp.IdleTimeoutsFromContext(r.Context())
	restoreReader, restoreWriter := func() {}, func() {}
	if reader != nil {
		restoreReader = reader.Override(idleTimeout, 0)
	}
	if writer != nil {
		restoreWriter = writer.Override(idleTimeout, 0, 0)
	}
	return func() {
		restoreWriter()
		restoreReader()
	}
}
