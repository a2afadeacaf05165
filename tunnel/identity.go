package tunnel

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
)

// IdentityHeader is the request header in which KAS tells agentk which
// Kubernetes identity a proxied request must impersonate. The value is the
// base64url (RFC 4648 §5, no padding) encoding of the JSON form of
// [Identity], so that usernames and groups with any characters survive.
//
// KAS removes every client-supplied copy before it sets its own, and only
// KAS can write to a tunnel, so agentk trusts it. agentk removes it before
// forwarding and turns it into Kubernetes impersonation headers, as
// GitLab's agentk does with the identity in its HTTP-over-gRPC header.
const IdentityHeader = "Kas-Impersonate"

// Identity is a Kubernetes user to impersonate
// (https://kubernetes.io/docs/reference/access-authn-authz/authentication/#user-impersonation).
type Identity struct {
	Username string              `json:"username"`
	UID      string              `json:"uid,omitempty"`
	Groups   []string            `json:"groups,omitempty"`
	Extra    map[string][]string `json:"extra,omitempty"`
}

// Kubernetes impersonation request headers.
const (
	ImpersonateUserHeader        = "Impersonate-User"
	ImpersonateUIDHeader         = "Impersonate-Uid"
	ImpersonateGroupHeader       = "Impersonate-Group"
	ImpersonateExtraHeaderPrefix = "Impersonate-Extra-"
)

// ErrBadIdentity is wrapped by errors about a malformed [IdentityHeader].
var ErrBadIdentity = errors.New("malformed identity header")

// Encode returns the value of [IdentityHeader] for id.
func (id *Identity) Encode() string {
	b, err := json.Marshal(id)
	if err != nil {
		// Only strings, slices and maps of strings: cannot fail.
		panic(fmt.Sprintf("encoding identity: %v", err))
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

// DecodeIdentity parses a value of [IdentityHeader].
func DecodeIdentity(v string) (*Identity, error) {
	b, err := base64.RawURLEncoding.DecodeString(v)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadIdentity, err)
	}
	var id Identity
	if err := json.Unmarshal(b, &id); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadIdentity, err)
	}
	if id.Username == "" {
		return nil, fmt.Errorf("%w: empty username", ErrBadIdentity)
	}
	return &id, nil
}

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
