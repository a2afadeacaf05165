package kubeproxy

import (
	"errors"
	"fmt"
	"net/http"
	"slices"

	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/internal/tokenmatch"
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
	Impersonate *identity.Identity
	// AllowImpersonation lets the client's own Impersonate-* headers
	// (kubectl --as) through. It cannot be combined with Impersonate.
	AllowImpersonation bool
}

// StaticAuthenticator authenticates the tokens of [User]s declared in the
// configuration. It needs no GitLab.
type StaticAuthenticator struct {
	users  []User
	tokens *tokenmatch.Set // tokens.Match gives the index into users
}

// NewStaticAuthenticator checks users and returns their authenticator.
func NewStaticAuthenticator(users []User) (*StaticAuthenticator, error) {
	a := &StaticAuthenticator{}
	seenNames := map[string]bool{}
	var errs []error
	var tokens []string
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
		tokens = append(tokens, u.Token)
	}
	for _, i := range tokenmatch.Duplicates(tokens) {
		errs = append(errs, fmt.Errorf("user %q: same token as another user", a.users[i].Name))
	}
	a.tokens = tokenmatch.New(tokens)
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
	i := a.tokens.Match(cred.Token)
	if i < 0 {
		e := unauthorized("unknown token")
		e.AgentID = cred.AgentID
		return nil, e
	}
	u := &a.users[i]
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

var _ Authenticator = (*StaticAuthenticator)(nil)
