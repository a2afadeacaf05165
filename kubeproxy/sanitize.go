package kubeproxy

import (
	"net/http"
	"net/url"
	"strings"

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
