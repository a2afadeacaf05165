package kubeproxy

import (
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"net/http"
	"slices"

	"github.com/caddy-kas/caddy-kas/tunnel"
)

// User is a token declared by the admin in standalone mode, and what it
// may reach.
type User struct {
	// Name identifies the user in logs.
	Name string
	// Token is the secret the client presents as
	// "Authorization: Bearer pat:<agent id>:<token>".
	Token string
	// Agents lists the agent ids the token may reach.
	Agents []int64
	// Impersonate, if set, is the identity every request of this user has
	// on the cluster.
	Impersonate *tunnel.Identity
	// AllowImpersonation lets the client's own Impersonate-* headers
	// (kubectl --as) through. It cannot be combined with Impersonate.
	AllowImpersonation bool
}

// StaticAuthenticator authenticates the tokens of [User]s declared in the
// configuration. It needs no GitLab.
type StaticAuthenticator struct {
	users   []User
	digests [][sha256.Size]byte // digests[i] is the SHA-256 of users[i].Token
}

// NewStaticAuthenticator checks users and returns their authenticator.
func NewStaticAuthenticator(users []User) (*StaticAuthenticator, error) {
	a := &StaticAuthenticator{}
	seenNames := map[string]bool{}
	seenTokens := map[[sha256.Size]byte]bool{}
	var errs []error
	for _, u := range users {
		if u.Name == "" {
			errs = append(errs, errors.New("user without a name"))
			continue
		}
		if seenNames[u.Name] {
			errs = append(errs, fmt.Errorf("user %q: declared twice", u.Name))
		}
		seenNames[u.Name] = true
		if u.Token == "" {
			errs = append(errs, fmt.Errorf("user %q: empty token", u.Name))
		}
		d := sha256.Sum256([]byte(u.Token))
		if seenTokens[d] {
			errs = append(errs, fmt.Errorf("user %q: same token as another user", u.Name))
		}
		seenTokens[d] = true
		if len(u.Agents) == 0 {
			errs = append(errs, fmt.Errorf("user %q: no agents listed", u.Name))
		}
		if u.Impersonate != nil && u.Impersonate.Username == "" {
			errs = append(errs, fmt.Errorf("user %q: impersonation without a username", u.Name))
		}
		if u.Impersonate != nil && u.AllowImpersonation {
			errs = append(errs, fmt.Errorf("user %q: impersonate and allow_impersonation together would be nested impersonation", u.Name))
		}
		a.users = append(a.users, u)
		a.digests = append(a.digests, d)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return a, nil
}

// Authenticate implements [Authenticator].
func (a *StaticAuthenticator) Authenticate(r *http.Request) (*Access, error) {
	cred, err := ParseCredential(r.Header)
	if errors.Is(err, errNoAuthorization) {
		return nil, unauthorized("no Authorization header")
	}
	if err != nil {
		return nil, err
	}
	if cred.Kind != KindPAT {
		e := unauthorized("CI job tokens need GitLab mode")
		e.AgentID = cred.AgentID
		return nil, e
	}
	u := a.lookup(cred.Token)
	if u == nil {
		e := unauthorized("unknown token")
		e.AgentID = cred.AgentID
		return nil, e
	}
	if !slices.Contains(u.Agents, cred.AgentID) {
		return nil, &Error{
			Code:    http.StatusForbidden,
			Message: fmt.Sprintf("Forbidden: agent %d is not allowed for this token", cred.AgentID),
			Reason:  fmt.Sprintf("user %q may not use agent %d", u.Name, cred.AgentID),
			AgentID: cred.AgentID,
		}
	}
	return &Access{
		AgentID:                  cred.AgentID,
		Identity:                 u.Impersonate,
		AllowClientImpersonation: u.AllowImpersonation,
		Principal:                "user " + u.Name,
	}, nil
}

// lookup finds the user with token in time that does not depend on the
// token or on which user (if any) it belongs to: it compares fixed-size
// digests, all of them, without stopping at a match.
func (a *StaticAuthenticator) lookup(token string) *User {
	d := sha256.Sum256([]byte(token))
	found := -1
	for i := range a.digests {
		eq := subtle.ConstantTimeCompare(d[:], a.digests[i][:])
		found = subtle.ConstantTimeSelect(eq, i, found)
	}
	if found < 0 {
		return nil
	}
	return &a.users[found]
}

var _ Authenticator = (*StaticAuthenticator)(nil)
