package tunnel

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/caddy-kas/caddy-kas/identity"
)

// Tunnel is one way to send requests to one agent: a tunnel connection on
// this node in one of the tunnel protocols, and tomorrow a forwarder to the
// node that holds one. It is safe for concurrent use.
type Tunnel interface {
	// RoundTrip sends one request to the agent and returns the answer of
	// its cluster; see [Request] for the form of both. An error means no
	// answer came; the cluster's own refusals are responses.
	RoundTrip(*Request) (*http.Response, error)
	// Agent returns what KAS knows about the agent at the other end.
	Agent() AgentInfo
	// ConnectedAt is when the tunnel was established.
	ConnectedAt() time.Time
	// Load is the number of requests using or waiting for the tunnel;
	// [Router] prefers the tunnel with the lowest.
	Load() int64
	// Done is closed once the tunnel can carry no more requests.
	Done() <-chan struct{}
	// Err reports why the tunnel is done, or nil while it is usable.
	Err() error
	// AfterDone arranges for f to run in a goroutine of its own once the
	// tunnel is done, or at once if it is done already. It lets the owner
	// of a tunnel react to its end without a goroutine that waits for
	// [Tunnel.Done], which would cost a stack per idle agent.
	AfterDone(f func())
	// Close closes the tunnel; requests in flight fail at once.
	Close() error
}

// Request is the one internal form of a proxied request, the same for
// every tunnel protocol. The proxy builds it; each protocol encodes it its
// own way (our HTTP/2 tunnel in request headers, GitLab's gRPC tunnel in
// its HTTP-over-gRPC messages) and its agent decodes it back.
type Request struct {
	// HTTP is the request for the cluster: method, URL path and query,
	// end-to-end headers and body. The URL's scheme and host are ignored,
	// and so is anything KAS-facing: the caller has already removed
	// credentials, hop-by-hop headers and, unless the client may
	// impersonate, Impersonate-* headers. A protocol may add headers of
	// its own to HTTP.Header and removes any copy of them it finds there
	// first, so the caller hands over a header it owns and no client can
	// forge a protocol header.
	HTTP *http.Request
	// Identity is who the request acts as on the cluster; nil means the
	// agent's own identity (GitLab's "access_as: agent"). The agent turns
	// it into Impersonate-* headers and refuses a request that carries
	// both an identity and impersonation headers of its own.
	Identity *identity.Identity
	// Upgrade, if not empty, is the protocol the client asks to switch to
	// (the value of its Upgrade header, RFC 9110 §7.8), for kubectl exec,
	// attach, cp and port-forward. HTTP.Body must then stay open after the
	// request: once the cluster switches, it carries the client's bytes,
	// and its end (EOF) is passed on as a half-close.
	//
	// If the cluster switched, the response's status is 101, its header
	// holds the cluster's 101 headers with Upgrade set to the protocol the
	// cluster chose, and its body carries the cluster's bytes. Any other
	// answer is the cluster's refusal, passed on unchanged, so that a
	// client sees it as from a real apiserver (and kubectl falls back from
	// WebSocket to SPDY).
	Upgrade string
}

// AgentInfo is what KAS knows about the agent at the other end of a
// tunnel.
type AgentInfo struct {
	// ID is the agent's id, the key of the [Store].
	ID int64
	// Name is the agent's name, for logs and the tracker.
	Name string
	// ProjectID is the id of the agent's configuration project in GitLab
	// mode (from agent_info), zero in standalone mode. GitLab's agent
	// tracker reports it with each connection.
	ProjectID int64
	// Meta is what the agent said about itself when it connected.
	Meta AgentMeta
	// RemoteAddr is the network address the tunnel came from, as seen by
	// KAS.
	RemoteAddr string
	// Credential is the SHA-256 digest of the token the agent
	// authenticated with, so that a tunnel can be closed when its token
	// is revoked. Not the token: a digest of a random token reveals
	// nothing.
	Credential [sha256.Size]byte
}

// AbsentError says that an agent has had no tunnel here for longer than
// [Router.FindExpected] waits for it to reconnect.
type AbsentError struct {
	AgentID int64
	// Since is when the agent's last tunnel here was removed, or, if Seen
	// is false, when the store was made.
	Since time.Time
	// Seen reports whether the agent has had a tunnel here since the store
	// was made.
	Seen bool
}

func (e *AbsentError) Error() string {
	if e.Seen {
		return fmt.Sprintf("agent %d has had no tunnel since %s", e.AgentID, e.Since.UTC().Format(time.RFC3339))
	}
	return fmt.Sprintf("agent %d has had no tunnel since the store was made at %s", e.AgentID, e.Since.UTC().Format(time.RFC3339))
}

// Errors of [Router.Find].
var (
	// ErrNoConnection is wrapped when the agent has no live tunnel.
	ErrNoConnection = errors.New("agent is not connected")
	// ErrStoreClosed is wrapped once the store was closed (the process
	// is stopping).
	ErrStoreClosed = errors.New("tunnel store closed")
)
