package nodetunnel

import (
	"errors"
	"fmt"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// The JWT between nodes (kas-spec §2.4): issuer and audience are GitLab's,
// so that admins who know GitLab's private API find what they expect.
const (
	jwtIssuer   = "gitlab-kas"
	jwtAudience = "gitlab-kas"
	// jwtValidity is how long a token is good for, and how far in the
	// past its not-before lies, to allow for clocks apart.
	jwtValidity = 5 * time.Second
)

// SecretSize is the size of the private secret: the secret file is the
// base64 of exactly this many bytes, as GitLab's private_api_secret_key.
const SecretSize = 32

// claims are the JWT's claims.
type claims struct {
	jwt.RegisteredClaims
	AgentID int64 `json:"agent_id"`
}

// signToken returns a token for a request to agentID.
func signToken(secret []byte, agentID int64, now time.Time) (string, error) {
	c := claims{
		RegisteredClaims: jwt.RegisteredClaims{
			Issuer:    jwtIssuer,
			Audience:  jwt.ClaimStrings{jwtAudience},
			IssuedAt:  jwt.NewNumericDate(now),
			NotBefore: jwt.NewNumericDate(now.Add(-jwtValidity)),
			ExpiresAt: jwt.NewNumericDate(now.Add(jwtValidity)),
		},
		AgentID: agentID,
	}
	s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, c).SignedString(secret)
	if err != nil {
		return "", fmt.Errorf("signing the node token: %w", err)
	}
	return s, nil
}

// errBadToken is wrapped by the errors of verifyToken.
var errBadToken = errors.New("invalid node token")

// verifyToken checks a token and returns the agent it names and when the
// token expires. The issued-at time is not checked, as GitLab's KAS does
// not check it (kas-spec §2.4): a token of a node whose clock is ahead
// would be "used before issued" however little ahead, and the not-before
// set jwtValidity in the past is what allows for clocks apart.
func verifyToken(secret []byte, token string, now time.Time) (int64, time.Time, error) {
	var c claims
	_, err := jwt.ParseWithClaims(token, &c, func(*jwt.Token) (any, error) { return secret, nil },
		jwt.WithValidMethods([]string{jwt.SigningMethodHS256.Alg()}),
		jwt.WithIssuer(jwtIssuer),
		jwt.WithAudience(jwtAudience),
		jwt.WithExpirationRequired(),
		jwt.WithTimeFunc(func() time.Time { return now }),
	)
	if err != nil {
		return 0, time.Time{}, fmt.Errorf("%w: %w", errBadToken, err)
	}
	if c.AgentID <= 0 {
		return 0, time.Time{}, fmt.Errorf("%w: no agent", errBadToken)
	}
	return c.AgentID, c.ExpiresAt.Time, nil
}
