package gitlab

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestKASRequestToken(t *testing.T) {
	secret := bytes.Repeat([]byte{7}, SecretLength)
	now := time.Unix(1_800_000_000, 0)
	token, err := KASRequestToken(secret, now)
	if err != nil {
		t.Fatal(err)
	}
	if msg := verifyKASJWT(token, secret, now); msg != "" {
		t.Fatal(msg)
	}
	// The exact claims and header, as Rails decodes them.
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("token has %d parts", len(parts))
	}
	decode := func(s string) map[string]any {
		b, err := base64.RawURLEncoding.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		m := map[string]any{}
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	header, claims := decode(parts[0]), decode(parts[1])
	if header["alg"] != "HS256" || header["typ"] != "JWT" {
		t.Errorf("header %v", header)
	}
	want := map[string]any{
		"iss": "gitlab-kas", "aud": "gitlab",
		"iat": float64(now.Unix()), "nbf": float64(now.Unix() - 5), "exp": float64(now.Unix() + 30),
	}
	if len(claims) != len(want) {
		t.Errorf("claims %v, want %v", claims, want)
	}
	for k, v := range want {
		if claims[k] != v {
			t.Errorf("claim %s = %v, want %v", k, claims[k], v)
		}
	}

	// Rails refuses it with another secret, and after it expired.
	if verifyKASJWT(token, bytes.Repeat([]byte{8}, SecretLength), now) == "" {
		t.Error("token verified with the wrong secret")
	}
	if verifyKASJWT(token, secret, now.Add(31*time.Second)) == "" {
		t.Error("token verified after it expired")
	}
	if verifyKASJWT(token, secret, now.Add(-6*time.Second)) == "" {
		t.Error("token verified before nbf")
	}
}

func TestKASRequestTokenNoSecret(t *testing.T) {
	if _, err := KASRequestToken(nil, time.Now()); err == nil {
		t.Error("signed without a secret")
	}
}
