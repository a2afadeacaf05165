package kubeproxy

import (
	"net/http"
	"strings"

	"go.uber.org/zap"
)

// CORS for the GitLab UI (kas-spec §1.2): the browser pages of GitLab call
// the proxy from GitLab's own origin with the _gitlab_kas cookie, so that
// origin, and only that one, is allowed to send credentials.

// preflightMethods is what a preflight answer allows: every method, as
// GitLab's KAS does; authorization happens on the real request.
const preflightMethods = "GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH"

// preflightMaxAge lets a browser cache a preflight answer for a day, in
// seconds.
const preflightMaxAge = "86400"

// handleCORS applies the proxy's CORS policy. It reports whether the
// request has been answered: a request from another origin gets 403 with
// no body, and a preflight from the allowed origin gets its answer here,
// before authentication (browsers send preflights without credentials).
func (p *Proxy) handleCORS(w http.ResponseWriter, r *http.Request) (answered bool) {
	if p.AllowedOrigin == "" {
		return false
	}
	origins := r.Header.Values("Origin")
	if len(origins) == 0 {
		return false // not a browser's cross-origin request
	}
	if len(origins) > 1 || origins[0] != p.AllowedOrigin {
		p.logRefusal(http.StatusForbidden, "origin not allowed", zap.Strings("origin", origins),
			zap.String("remote_addr", r.RemoteAddr))
		if p.Observer != nil {
			p.Observer.Refused(http.StatusForbidden)
		}
		w.WriteHeader(http.StatusForbidden)
		return true
	}
	h := w.Header()
	h.Set("Access-Control-Allow-Origin", p.AllowedOrigin)
	h.Set("Access-Control-Allow-Credentials", "true")
	h.Add("Vary", "Origin")
	if r.Method != http.MethodOptions {
		return false
	}
	if reqHeaders := r.Header.Values("Access-Control-Request-Headers"); len(reqHeaders) > 0 {
		h.Set("Access-Control-Allow-Headers", strings.Join(reqHeaders, ", "))
	}
	h.Set("Access-Control-Allow-Methods", preflightMethods)
	h.Set("Access-Control-Max-Age", preflightMaxAge)
	w.WriteHeader(http.StatusOK)
	return true
}

// isCORSHeader reports whether k is a CORS response header
// (Access-Control-*).
func isCORSHeader(k string) bool {
	return len(k) >= len("Access-Control-") && strings.EqualFold(k[:len("Access-Control-")], "Access-Control-")
}
