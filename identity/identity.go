// Package identity is the Kubernetes identity a proxied request acts as,
// and the impersonation headers that carry it to the kube-apiserver
// (https://kubernetes.io/docs/reference/access-authn-authz/authentication/#user-impersonation).
//
// KAS decides the identity (from GitLab's answer or the Caddyfile); the
// agent asks the apiserver to impersonate it with its own credentials. How
// the identity crosses the tunnel between them is each tunnel protocol's
// business (see package tunnel).
package identity

import (
	"fmt"
	"net/http"
	"strings"
)

// Identity is a Kubernetes user to impersonate
// (https://kubernetes.io/docs/reference/access-authn-authz/authentication/#user-impersonation).
//
// It is also the JSON form of an impersonation rule in the Caddy
// configuration (k8s_proxy's impersonate), so its fields document it.
type Identity struct {
	// Username is the user name the request acts as; required.
	Username string `json:"username"`
	// UID is the user's uid (Impersonate-Uid); optional, default none.
	UID string `json:"uid,omitempty"`
	// Groups are the user's groups (Impersonate-Group), in order;
	// optional, default none.
	Groups []string `json:"groups,omitempty"`
	// Extra is extra user information (Impersonate-Extra-<key>), by key;
	// optional, default none.
	Extra map[string][]string `json:"extra,omitempty"`
}

// Kubernetes impersonation request headers.
const (
	ImpersonateUserHeader        = "Impersonate-User"
	ImpersonateUIDHeader         = "Impersonate-Uid"
	ImpersonateGroupHeader       = "Impersonate-Group"
	ImpersonateExtraHeaderPrefix = "Impersonate-Extra-"
)

// HasImpersonation reports whether h carries any Kubernetes impersonation
// header.
func HasImpersonation(h http.Header) bool {
	for k := range h {
		if isImpersonationHeader(k) {
			return true
		}
	}
	return false
}

// DeleteImpersonation removes every Kubernetes impersonation header from h.
func DeleteImpersonation(h http.Header) {
	for k := range h {
		if isImpersonationHeader(k) {
			delete(h, k)
		}
	}
}

func isImpersonationHeader(k string) bool {
	// http.Header keys are canonical when they come from net/http; compare
	// without case anyway, in case a caller built the map by hand.
	return len(k) >= len("Impersonate-") && strings.EqualFold(k[:len("Impersonate-")], "Impersonate-")
}

// SetImpersonation writes the Kubernetes impersonation headers for id into
// h, replacing any that were there. Extra keys are percent-encoded as the
// Kubernetes API requires for header names
// (https://kubernetes.io/docs/reference/access-authn-authz/authentication/#user-impersonation).
func (id *Identity) SetImpersonation(h http.Header) {
	DeleteImpersonation(h)
	h.Set(ImpersonateUserHeader, id.Username)
	if id.UID != "" {
		h.Set(ImpersonateUIDHeader, id.UID)
	}
	for _, g := range id.Groups {
		h.Add(ImpersonateGroupHeader, g)
	}
	for k, vs := range id.Extra {
		name := ImpersonateExtraHeaderPrefix + escapeExtraKey(k)
		for _, v := range vs {
			h.Add(name, v)
		}
	}
}

// escapeExtraKey percent-encodes what may not appear in a header name, as
// client-go does for Impersonate-Extra- keys (legal: RFC 7230 token
// characters except '%').
func escapeExtraKey(k string) string {
	var b strings.Builder
	for i := 0; i < len(k); i++ {
		c := k[i]
		if isTokenChar(c) && c != '%' {
			b.WriteByte(c)
			continue
		}
		fmt.Fprintf(&b, "%%%02X", c)
	}
	return b.String()
}

func isTokenChar(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}
