package kubeproxy

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-kas/caddy-kas/identity"
)

// Access is what an authenticated request may do.
type Access struct {
	// AgentID is the agent whose cluster the request goes to.
	AgentID int64
	// Identity is who the request acts as on the cluster; nil means the
	// agent's own identity (GitLab's "access_as: agent").
	Identity *identity.Identity
	// AllowClientImpersonation lets the client's own Impersonate-* headers
	// through to the cluster. Only meaningful without Identity: the two
	// together would be nested impersonation.
	AllowClientImpersonation bool
	// Principal names who made the request, for logs. Never a secret.
	Principal string
}

// Authenticator decides who a request comes from and what it may reach.
type Authenticator interface {
	// Authenticate returns the access the request's credentials give, or
	// an [*Error] saying why there is none.
	Authenticate(r *http.Request) (*Access, error)
}

// Error is a refusal with the HTTP status the client gets.
type Error struct {
	// Code is the HTTP status, such as 400, 401, 403, or 429 when the
	// request could not be checked now (see RetryAfter).
	Code int
	// Message is shown to the client. It must not help an attacker tell
	// a wrong token from an unknown agent.
	Message string
	// Reason is for the admin's log and may say more than Message; it
	// still never contains a secret.
	Reason string
	// AgentID is the agent the request named, if it got that far.
	AgentID int64
	// RetryAfter, if positive, is how long the client should wait before
	// it tries again; it is sent as Retry-After and the Status's
	// retryAfterSeconds, in whole seconds rounded up. client-go waits
	// that long and retries a 429 by itself.
	RetryAfter time.Duration
}

func (e *Error) Error() string { return fmt.Sprintf("%d %s: %s", e.Code, e.Message, e.Reason) }

func unauthorized(reason string) *Error {
	return &Error{Code: http.StatusUnauthorized, Message: "Unauthorized: no valid credentials provided", Reason: reason}
}

// CredentialKind is the type prefix of a bearer token, as GitLab's KAS
// parses it (kas-spec §2.5): "ci" for CI job tokens, "pat" for personal
// access tokens.
type CredentialKind string

// Credential kinds.
const (
	KindCIJob CredentialKind = "ci"
	KindPAT   CredentialKind = "pat"
)

// Credential is a parsed "Authorization: Bearer <kind>:<agent id>:<token>".
type Credential struct {
	Kind    CredentialKind
	AgentID int64
	// Token is the secret. Never log it.
	Token string
}

// errNoAuthorization means the request has no Authorization header; GitLab
// mode then looks for its session cookie.
var errNoAuthorization = errors.New("no authorization header")

// ParseCredential reads the Authorization header the way GitLab's KAS does:
// exactly one header, "Bearer ", then a kind, an agent id and the token,
// separated by the first two colons; the agent id in decimal without sign
// or leading zeros, so that a credential has one spelling. Anything malformed is an [*Error] with
// code 401 (GitLab's design doc said 400; its code answers 401). A request
// without the header gets an error matching errNoAuthorization.
func ParseCredential(h http.Header) (Credential, error) {
	values := h.Values("Authorization")
	switch len(values) {
	case 0:
		return Credential{}, errNoAuthorization
	case 1:
	default:
		return Credential{}, unauthorized("more than one Authorization header")
	}
	const prefix = "Bearer "
	v := values[0]
	if len(v) < len(prefix) || !strings.EqualFold(v[:len(prefix)], prefix) {
		return Credential{}, unauthorized("authorization is not a bearer token")
	}
	kind, rest, ok1 := strings.Cut(v[len(prefix):], ":")
	idText, token, ok2 := strings.Cut(rest, ":")
	if !ok1 || !ok2 {
		return Credential{}, unauthorized("bearer token is not of the form <kind>:<agent id>:<token>")
	}
	k := CredentialKind(kind)
	if k != KindCIJob && k != KindPAT {
		return Credential{}, unauthorized("unknown token kind (want ci or pat)")
	}
	id, err := strconv.ParseInt(idText, 10, 64)
	if err != nil || id <= 0 || strconv.FormatInt(id, 10) != idText {
		// Digits only, no sign, no leading zero: one agent, one spelling.
		return Credential{}, unauthorized("agent id in bearer token is not a positive integer")
	}
	if token == "" {
		return Credential{}, unauthorized("empty token")
	}
	return Credential{Kind: k, AgentID: id, Token: token}, nil
}
