package kubeproxy

import (
	"net/http"
	"net/url"
	"strings"

	"github.com/caddy-kas/caddy-kas/internal/httpheader"
	"github.com/caddy-kas/caddy-kas/tunnel"
)

// credentialHeaders carry the client's credentials for KAS; they must never
// reach the cluster (kas-spec §1.2).
var credentialHeaders = []string{"Authorization", "Cookie", "Gitlab-Agent-Id", "X-Csrf-Token"}

// credentialQueryParams are the query forms of the same, used by browser
// WebSockets, which cannot set headers.
var credentialQueryParams = []string{"gitlab-agent-id", "gitlab-csrf-token"}

// reservedPrefix starts the headers of the tunnel protocol
// ([tunnel.IdentityHeader], [tunnel.UpgradeHeader], ...).
const reservedPrefix = "Kas-"

// outboundHeader returns the headers to send to the agent: the client's,
// less credentials, hop-by-hop headers, any forged identity header, and
// impersonation headers unless keepImpersonation.
func outboundHeader(in http.Header, keepImpersonation bool) http.Header {
	out := in.Clone()
	httpheader.RemoveHopByHop(out)
	for _, k := range credentialHeaders {
		out.Del(k)
	}
	// Kas-* headers are the tunnel protocol's (the identity, upgrades):
	// only KAS may set them, a client's copy is a forgery.
	for k := range out {
		if len(k) >= len(reservedPrefix) && strings.EqualFold(k[:len(reservedPrefix)], reservedPrefix) {
			delete(out, k)
		}
	}
	if !keepImpersonation {
		tunnel.DeleteImpersonation(out)
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
