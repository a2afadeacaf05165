package nodetunnel

import (
	"bytes"
	"testing"
	"time"
)

// TestTokensReusedWhileGood: the forwarding node signs a token per agent
// every tokenReuse, and the receiving node checks each token once until it
// expires, but never takes an expired one.
func TestTokensReusedWhileGood(t *testing.T) {
	secret := bytes.Repeat([]byte("s"), SecretSize)
	now := time.Date(2026, 11, 26, 3, 0, 0, 0, time.UTC)
	c := &Client{Secret: secret, Now: func() time.Time { return now }}
	first, _ := c.token(7)
	if again, _ := c.token(7); again != first {
		t.Error("a token was signed again within tokenReuse")
	}
	if other, _ := c.token(8); other == first {
		t.Error("two agents share a token")
	}
	now = now.Add(tokenReuse)
	if later, _ := c.token(7); later == first {
		t.Error("a token was reused past tokenReuse")
	}

	s := &Server{Secret: secret, Now: func() time.Time { return now }}
	token, _ := signToken(secret, 7, now)
	for range 2 {
		if id, err := s.verify(token); err != nil || id != 7 {
			t.Fatalf("verify = %d, %v", id, err)
		}
	}
	if len(s.verified) != 1 {
		t.Errorf("%d tokens kept", len(s.verified))
	}
	now = now.Add(jwtValidity)
	if _, err := s.verify(token); err == nil {
		t.Error("an expired token was taken from the cache")
	}
}
