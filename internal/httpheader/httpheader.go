// Package httpheader has the header rules every hop of the proxy path
// applies: comma-separated tokens and hop-by-hop headers.
package httpheader

import (
	"net/http"
	"strings"
	"time"
)

// hopByHop belong to one connection, not to the request (RFC 9110
// §7.6.1), so a proxy does not pass them on.
var hopByHop = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
	"Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

// HasToken reports whether the comma-separated header name (all its lines)
// contains token, compared without case (RFC 9110 §5.6.1).
func HasToken(h http.Header, name, token string) bool {
	for _, line := range h.Values(name) {
		for _, t := range strings.Split(line, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// RemoveHopByHop deletes the hop-by-hop headers from h, including those
// its Connection header names.
func RemoveHopByHop(h http.Header) {
	for _, line := range h.Values("Connection") {
		for _, name := range strings.Split(line, ",") {
			if name = strings.TrimSpace(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, k := range hopByHop {
		h.Del(k)
	}
}

// IsHopByHop reports whether the header name is hop-by-hop in h: one of
// RFC 9110 §7.6.1's, or one that h's Connection header names.
func IsHopByHop(h http.Header, name string) bool {
	for _, k := range hopByHop {
		if strings.EqualFold(k, name) {
			return true
		}
	}
	return HasToken(h, "Connection", name)
}

// CopyEndToEnd adds src's headers to dst, less the hop-by-hop ones.
func CopyEndToEnd(dst, src http.Header) {
	end := src.Clone()
	RemoveHopByHop(end)
	for k, vs := range end {
		dst[k] = append(dst[k], vs...)
	}
}

// RetryAfterSeconds is the value of a Retry-After header (RFC 9110
// §10.2.3) that asks a client to wait at least d: whole seconds, rounded
// up, and at least 1 (a Retry-After of 0 invites an immediate retry).
func RetryAfterSeconds(d time.Duration) int {
	return max(int((d+time.Second-1)/time.Second), 1)
}

// Streamed reports whether a response is to be passed on as it arrives,
// each read flushed at once, rather than through a write buffer: its length
// is unknown (contentLength < 0: a watch or `kubectl logs -f`, which the
// apiserver sends chunked), or it is an event stream, which may declare a
// length and still arrive event by event. httputil.ReverseProxy decides the
// same way.
func Streamed(h http.Header, contentLength int64) bool {
	if contentLength < 0 {
		return true
	}
	ct, _, _ := strings.Cut(h.Get("Content-Type"), ";")
	return strings.EqualFold(strings.TrimSpace(ct), "text/event-stream")
}
