package kubeproxy

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http/httpguts"

	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/internal/httpheader"
)

// credentialHeaders carry the client's credentials for KAS; they must never
// reach the cluster (kas-spec §1.2).
var credentialHeaders = []string{"Authorization", "Cookie", "Gitlab-Agent-Id", "X-Csrf-Token"}

// forwardingHeaders say who the client is and how it reached the proxy.
// The kube-apiserver believes them: X-Forwarded-For, then X-Real-Ip, head
// the sourceIPs of its audit events and pick the addresses its discovery
// answers advertise. Whatever a client puts there is its own claim, so
// none of them passes, and none is added: the cluster's audit source is
// the agent, and the client's address is in this proxy's logs. Every
// X-Forwarded-* name goes, not only the three that Go's reverse proxy
// drops, because GitLab's agentk forwards headers as they come.
var forwardingHeaders = []string{"Forwarded", "X-Real-Ip"}

// forwardingPrefix starts the de facto forwarding headers
// (X-Forwarded-For, -Host, -Proto, -Port, -Prefix, ...).
const forwardingPrefix = "X-Forwarded-"

// credentialQueryParams are the query forms of the same, used by browser
// WebSockets, which cannot set headers.
var credentialQueryParams = []string{"gitlab-agent-id", "gitlab-csrf-token"}

// outboundHeader returns the headers to send to the agent: the client's,
// less credentials, hop-by-hop headers, forwarding headers, and
// impersonation headers unless keepImpersonation. A client's copy of a tunnel protocol's own headers is
// removed by that protocol ([tunnel.Request]).
func outboundHeader(in http.Header, keepImpersonation bool) http.Header {
	out := in.Clone()
	httpheader.RemoveHopByHop(out)
	for _, k := range credentialHeaders {
		out.Del(k)
	}
	for k := range out {
		if isForwardingHeader(k) {
			delete(out, k)
		}
	}
	if !keepImpersonation {
		identity.DeleteImpersonation(out)
	}
	return out
}

// sanitizeQuery removes credential parameters from a raw query and keeps
// everything else byte for byte, in order (re-encoding through url.Values
// would reorder and re-escape what the client sent).
func sanitizeQuery(rawQuery string) string {
	if rawQuery == "" {
		return ""
	}
	parts := strings.Split(rawQuery, "&")
	kept := parts[:0]
	for _, p := range parts {
		key, _, _ := strings.Cut(p, "=")
		if k, err := url.QueryUnescape(key); err == nil && isCredentialParam(k) {
			continue
		}
		kept = append(kept, p)
	}
	return strings.Join(kept, "&")
}

func isCredentialParam(k string) bool {
	for _, c := range credentialQueryParams {
		if k == c {
			return true
		}
	}
	return false
}

// isForwardingHeader reports whether the header named k is one of
// forwardingHeaders or starts with forwardingPrefix, in any case.
func isForwardingHeader(k string) bool {
	if hasPrefixFold(k, forwardingPrefix) {
		return true
	}
	for _, f := range forwardingHeaders {
		if strings.EqualFold(k, f) {
			return true
		}
	}
	return false
}

// hasPrefixFold reports whether s starts with prefix, compared without
// case.
func hasPrefixFold(s, prefix string) bool {
	return len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix)
}

// defaultAllowedResponseHeaders are the headers of the cluster's answers
// that reach the client: what a kube-apiserver sends, in any of its
// answers, and what the 101 of exec, attach and port-forward carries, over
// SPDY and WebSocket. Every other header is dropped, as GitLab's KAS
// does since 18.3 (behind a feature flag until 18.7): the answer comes from a cluster that only the agent's
// owner controls, yet the client reads it on GitLab's origin, so a
// Set-Cookie, Strict-Transport-Security or Alt-Svc would act on GitLab,
// Gitlab-Unauthorized would make a cluster's 401 look like a refusal of
// KAS, and a tunnel protocol's Kas-* headers are not the client's
// business. Hop-by-hop headers (Transfer-Encoding, Trailer, ...) never
// pass: net/http frames the body for the client's connection itself.
var defaultAllowedResponseHeaders = []string{
	// The representation and caching (RFC 9110, RFC 9111); Content-Range
	// and Accept-Ranges from the OpenAPI handlers, which serve ranges.
	"Content-Type", "Content-Length", "Content-Encoding", "Content-Range", "Accept-Ranges",
	"Cache-Control", "Expires", "ETag", "Last-Modified", "Vary", "Date",
	"Location", "Retry-After", "Warning", "Via", "X-Content-Type-Options",
	// The apiserver's own: the audit id, API Priority and Fairness.
	"Audit-Id", "X-Kubernetes-Pf-Flowschema-Uid", "X-Kubernetes-Pf-Prioritylevel-Uid",
	// Switching protocols: the SPDY stream protocol negotiation (also on
	// its refusal) and the WebSocket handshake.
	"X-Stream-Protocol-Version", "X-Accepted-Stream-Protocol-Versions",
	"Sec-WebSocket-Accept", "Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions",
}

// DefaultAllowedResponseHeaders returns the names of the response headers
// that reach the client without [Proxy.ExtraAllowedResponseHeaders].
func DefaultAllowedResponseHeaders() []string {
	return slices.Clone(defaultAllowedResponseHeaders)
}

// unallowableResponseHeaders can never be allowed: hop-by-hop headers
// belong to one connection, and Gitlab-Unauthorized is KAS's own signal
// that it refused the credentials. Names starting with Kas- belong to the
// tunnel protocol.
var unallowableResponseHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
	"Te", "Trailer", "Transfer-Encoding", "Upgrade", "Gitlab-Unauthorized",
}

// CheckExtraAllowedResponseHeaders reports whether names can be allowed
// on top of the default allowlist: each must be a valid header name
// (RFC 9110 §5.1), not hop-by-hop, not Gitlab-Unauthorized and not a
// tunnel protocol's Kas-* header.
func CheckExtraAllowedResponseHeaders(names []string) error {
	var errs []error
	for _, name := range names {
		switch {
		case !httpguts.ValidHeaderFieldName(name):
			errs = append(errs, fmt.Errorf("%q is not a valid header name", name))
		case hasPrefixFold(name, "Kas-"):
			errs = append(errs, fmt.Errorf("%s belongs to the tunnel protocol and cannot be allowed", name))
		case slices.ContainsFunc(unallowableResponseHeaders, func(u string) bool { return strings.EqualFold(u, name) }):
			errs = append(errs, fmt.Errorf("%s cannot be allowed: it is hop-by-hop or KAS's own", name))
		}
	}
	return errors.Join(errs...)
}

// responseHeaders decides which of the cluster's response headers reach
// the client.
type responseHeaders struct {
	allowed map[string]bool // canonical names
	blocked *blockedHeaderLog
}

func newResponseHeaders(extra []string, log func(name string, agentID int64, count int)) *responseHeaders {
	r := &responseHeaders{allowed: map[string]bool{}, blocked: newBlockedHeaderLog(log)}
	for _, k := range defaultAllowedResponseHeaders {
		r.allowed[http.CanonicalHeaderKey(k)] = true
	}
	for _, k := range extra {
		if CheckExtraAllowedResponseHeaders([]string{k}) == nil {
			r.allowed[http.CanonicalHeaderKey(k)] = true
		}
	}
	return r
}

// copyAllowed adds to dst the headers of h that may reach the client: its
// end-to-end headers (RFC 9110 §7.6.1) that are allowed, under their
// canonical names, less the cluster's CORS headers when dropCORS (ours are
// set already: not the cluster's to block). Every other end-to-end header
// is counted as blocked for agentID. h is not changed, and nothing is
// copied but what reaches dst: this runs for every proxied response.
func (r *responseHeaders) copyAllowed(dst, h http.Header, agentID int64, dropCORS bool) {
	for k, vs := range h {
		k = http.CanonicalHeaderKey(k)
		switch {
		case httpheader.IsHopByHop(h, k), dropCORS && isCORSHeader(k):
		case r.allowed[k]:
			if dst[k] == nil {
				// The cluster's answer is read once and dropped: its
				// values can be handed on without a copy per header.
				dst[k] = vs
			} else {
				dst[k] = append(dst[k], vs...)
			}
		default:
			r.blocked.add(k, agentID)
		}
	}
}

// blockedLogInterval is how often at most one header name is logged as
// blocked.
const blockedLogInterval = time.Minute

// maxBlockedNames bounds the names a blockedHeaderLog remembers: a cluster
// that sends a new header name with every answer must not grow it without
// end. Blocks of further names are counted together under otherBlockedNames
// until remembered names age out.
const maxBlockedNames = 256

// otherBlockedNames stands for the names over maxBlockedNames in a log
// line.
const otherBlockedNames = "(other names)"

// maxBlockedNameLen is how much of a header name is remembered and logged.
const maxBlockedNameLen = 128

// blockedHeaderLog logs the response headers the allowlist dropped. The
// first block of a name is logged at once; after that a name gets at most
// one line per interval, which counts the blocks it stands for, so a
// cluster that sends the header with every answer costs one line a
// minute, not one per request.
type blockedHeaderLog struct {
	interval time.Duration
	write    func(name string, agentID int64, count int)
	now      func() time.Time
	after    func(d time.Duration, f func())

	mu    sync.Mutex // guards names
	names map[string]*blockedName
}

// blockedName is what a blockedHeaderLog knows of one header name.
type blockedName struct {
	logged   time.Time // when the last line about the name was written
	pending  int       // blocks since then, not logged yet
	agentID  int64     // the agent of the latest pending block
	flushing bool      // a line for the pending blocks is scheduled
}

func newBlockedHeaderLog(write func(name string, agentID int64, count int)) *blockedHeaderLog {
	return &blockedHeaderLog{
		interval: blockedLogInterval,
		write:    write,
		now:      time.Now,
		after:    func(d time.Duration, f func()) { time.AfterFunc(d, f) },
		names:    map[string]*blockedName{},
	}
}

// add counts one block of the header name for agentID.
func (b *blockedHeaderLog) add(name string, agentID int64) {
	if len(name) > maxBlockedNameLen {
		name = name[:maxBlockedNameLen]
	}
	now := b.now()
	b.mu.Lock()
	name, e := b.entry(name, now)
	if !e.flushing && now.Sub(e.logged) >= b.interval {
		e.logged = now
		b.mu.Unlock()
		b.write(name, agentID, 1)
		return
	}
	e.pending++
	e.agentID = agentID
	if !e.flushing {
		e.flushing = true
		b.after(e.logged.Add(b.interval).Sub(now), func() { b.flush(name) })
	}
	b.mu.Unlock()
}

// entry returns the name to count a block of name under, and its entry.
// b.mu must be held.
func (b *blockedHeaderLog) entry(name string, now time.Time) (string, *blockedName) {
	if e, ok := b.names[name]; ok {
		return name, e
	}
	if len(b.names) >= maxBlockedNames {
		for k, e := range b.names {
			if !e.flushing && now.Sub(e.logged) >= b.interval {
				delete(b.names, k) // its next block is logged at once anyway
			}
		}
	}
	if len(b.names) >= maxBlockedNames {
		name = otherBlockedNames
		if e, ok := b.names[name]; ok {
			return name, e
		}
	}
	e := &blockedName{}
	b.names[name] = e
	return name, e
}

// flush writes the line for the blocks of name since its last line.
func (b *blockedHeaderLog) flush(name string) {
	b.mu.Lock()
	e := b.names[name]
	count, agentID := e.pending, e.agentID
	e.pending, e.flushing, e.logged = 0, false, b.now()
	b.mu.Unlock()
	if count > 0 {
		b.write(name, agentID, count)
	}
}
