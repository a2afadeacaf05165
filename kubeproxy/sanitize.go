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

// credentialQueryParams are the query forms of the same, used by browser
// WebSockets, which cannot set headers.
var credentialQueryParams = []string{"gitlab-agent-id", "gitlab-csrf-token"}

// outboundHeader returns the headers to send to the agent: the client's,
// less credentials, hop-by-hop headers, and impersonation headers unless
// keepImpersonation. A client's copy of a tunnel protocol's own headers is
// removed by that protocol ([tunnel.Request]).
func outboundHeader(in http.Header, keepImpersonation bool) http.Header {
	out := in.Clone()
	httpheader.RemoveHopByHop(out)
	for _, k := range credentialHeaders {
		out.Del(k)
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
