package nodetunnel

import (
	"bytes"
	"testing"
	"time"
)

// TestTokenAcrossClocks: a token is taken by a node whose clock is behind
// or ahead of the signing node's by less than jwtValidity, as the
// not-before in the past promises, and refused beyond that.
func TestTokenAcrossClocks(t *testing.T) {
	secret := bytes.Repeat([]byte("s"), SecretSize)
	signedAt := time.Date(2026, 11, 26, 3, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name string
		// skew is the receiving node's clock minus the signing node's.
		skew time.Duration
		ok   bool
	}{
		{"same clock", 0, true},
		{"receiver 300 ms behind", -300 * time.Millisecond, true},
		{"receiver 4 s behind", -4 * time.Second, true},
		{"receiver 4 s ahead", 4 * time.Second, true},
		{"receiver 6 s behind", -6 * time.Second, false},
		{"receiver 6 s ahead", 6 * time.Second, false},
	} {
		token, err := signToken(secret, 7, signedAt)
		if err != nil {
			t.Fatal(err)
		}
		id, _, err := verifyToken(secret, token, signedAt.Add(tc.skew))
		if tc.ok && (err != nil || id != 7) {
			t.Errorf("%s: verifyToken = %d, %v; want agent 7", tc.name, id, err)
		}
		if !tc.ok && err == nil {
			t.Errorf("%s: a token outside its validity was taken", tc.name)
		}
	}
}
