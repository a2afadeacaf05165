package gitlab

import (
	"errors"
	"fmt"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// JWTRequestHeader carries the agent server's JWT on its calls to GitLab's
// internal API; Rails' Gitlab::Kas.verify_api_request checks it
// (kas-spec §2.2).
const JWTRequestHeader = "Gitlab-Kas-Api-Request"

// Claims of the JWT the agent server sends to GitLab (kas-spec §2.2).
const (
	jwtIssuer    = "gitlab-kas"
	jwtAudience  = "gitlab"
	jwtValidFor  = 30 * time.Second
	jwtNotBefore = 5 * time.Second // nbf lies this far in the past, for clock skew
)

// kasClaims are the claims Rails checks. The audience is a plain string,
// the form Rails' own JWT library writes; Rails accepts it as well as a
// one-element array.
type kasClaims struct {
	Issuer    string           `json:"iss"`
	Audience  string           `json:"aud"`
	IssuedAt  *jwt.NumericDate `json:"iat"`
	NotBefore *jwt.NumericDate `json:"nbf"`
	ExpiresAt *jwt.NumericDate `json:"exp"`
}

func (c kasClaims) GetExpirationTime() (*jwt.NumericDate, error) { return c.ExpiresAt, nil }
func (c kasClaims) GetIssuedAt() (*jwt.NumericDate, error)       { return c.IssuedAt, nil }
func (c kasClaims) GetNotBefore() (*jwt.NumericDate, error)      { return c.NotBefore, nil }
func (c kasClaims) GetIssuer() (string, error)                   { return c.Issuer, nil }
func (c kasClaims) GetSubject() (string, error)                  { return "", nil }
func (c kasClaims) GetAudience() (jwt.ClaimStrings, error)       { return jwt.ClaimStrings{c.Audience}, nil }

// KASRequestToken returns the value of the [JWTRequestHeader] header: an
// HS256 JWT signed with GitLab's shared secret, issued by "gitlab-kas" for
// "gitlab", issued at now, valid from five seconds before now (for clock
// skew) until thirty seconds after (kas-spec §2.2).
func KASRequestToken(secret []byte, now time.Time) (string, error) {
	if len(secret) == 0 {
		return "", errors.New("signing the GitLab API request token: no shared secret")
	}
	claims := kasClaims{
		Issuer:    jwtIssuer,
		Audience:  jwtAudience,
		IssuedAt:  jwt.NewNumericDate(now),
		NotBefore: jwt.NewNumericDate(now.Add(-jwtNotBefore)),
		ExpiresAt: jwt.NewNumericDate(now.Add(jwtValidFor)),
	}
	signed, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString(secret)
	if err != nil {
		return "", fmt.Errorf("signing the GitLab API request token: %w", err)
	}
	return signed, nil
}
