package fakegitlab

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// The KAS to GitLab JWT (kas-spec §2.2): HS256 over the shared secret,
// iss "gitlab-kas", aud "gitlab", exp now+30s, nbf now-5s, iat now.
const (
	jwtAlgorithm = "HS256"
	jwtIssuer    = "gitlab-kas"
	jwtAudience  = "gitlab"
	// jwtLifetime is how far ahead of now KAS sets exp.
	jwtLifetime = 30 * time.Second
	// jwtSlack absorbs the clock's second granularity and slow test
	// machines when checking exp, nbf and iat against now.
	jwtSlack = 5 * time.Second
)

// verifyKASJWT checks the values of the Gitlab-Kas-Api-Request header
// against the contract and says precisely what is wrong, if anything.
func (s *Server) verifyKASJWT(values []string) error {
	switch len(values) {
	case 0:
		return fmt.Errorf("no %s header (the KAS JWT is required on every internal API call)", kasJWTHeader)
	case 1:
	default:
		return fmt.Errorf("%d %s headers, want exactly one", len(values), kasJWTHeader)
	}
	raw := values[0]
	if raw == "" {
		return fmt.Errorf("empty %s header", kasJWTHeader)
	}

	// Look at the algorithm first, to name it in the message: the generic
	// parser error does not say which one was used.
	var claims jwt.RegisteredClaims
	unverified, _, err := jwt.NewParser().ParseUnverified(raw, &claims)
	if err != nil {
		return fmt.Errorf("%s is not a well-formed JWT: %v", kasJWTHeader, err)
	}
	if alg, _ := unverified.Header["alg"].(string); alg != jwtAlgorithm {
		return fmt.Errorf("KAS JWT uses algorithm %q, want %s", alg, jwtAlgorithm)
	}

	claims = jwt.RegisteredClaims{}
	parser := jwt.NewParser(
		jwt.WithValidMethods([]string{jwtAlgorithm}),
		jwt.WithStrictDecoding(),
		// The claims are checked below, with messages that say more.
		jwt.WithoutClaimsValidation(),
	)
	_, err = parser.ParseWithClaims(raw, &claims, func(*jwt.Token) (any, error) { return s.secret, nil })
	switch {
	case errors.Is(err, jwt.ErrTokenSignatureInvalid):
		return errors.New("the KAS JWT's signature does not verify with the shared secret")
	case err != nil:
		return fmt.Errorf("KAS JWT rejected: %v", err)
	}
	return checkClaims(&claims, time.Now())
}

// checkClaims checks the registered claims of a KAS JWT at time now.
func checkClaims(c *jwt.RegisteredClaims, now time.Time) error {
	var problems []string
	if c.Issuer != jwtIssuer {
		problems = append(problems, fmt.Sprintf("iss is %q, want %q", c.Issuer, jwtIssuer))
	}
	if len(c.Audience) != 1 || c.Audience[0] != jwtAudience {
		problems = append(problems, fmt.Sprintf("aud is %q, want just %q", []string(c.Audience), jwtAudience))
	}
	switch {
	case c.ExpiresAt == nil:
		problems = append(problems, "no exp claim")
	case !c.ExpiresAt.After(now):
		problems = append(problems, fmt.Sprintf("expired: exp is %s ago", now.Sub(c.ExpiresAt.Time).Round(time.Millisecond)))
	case c.ExpiresAt.Sub(now) > jwtLifetime+jwtSlack:
		problems = append(problems, fmt.Sprintf("exp is %s ahead, KAS sets it %s ahead", c.ExpiresAt.Sub(now).Round(time.Millisecond), jwtLifetime))
	}
	for _, p := range []string{notInFuture("nbf", c.NotBefore, now), notInFuture("iat", c.IssuedAt, now)} {
		if p != "" {
			problems = append(problems, p)
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("invalid KAS JWT claims: %s", strings.Join(problems, "; "))
	}
	return nil
}

// notInFuture requires the claim name to be present and not later than
// now, give or take jwtSlack; it returns what is wrong, or "".
func notInFuture(name string, d *jwt.NumericDate, now time.Time) string {
	switch {
	case d == nil:
		return fmt.Sprintf("no %s claim", name)
	case d.Sub(now) > jwtSlack:
		return fmt.Sprintf("%s is %s in the future", name, d.Sub(now).Round(time.Millisecond))
	}
	return ""
}
