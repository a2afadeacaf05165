package gitaly

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"strconv"
	"time"
)

// tokenCredentials authenticate each call to Gitaly with its v2 token
// (gitlab-wire §D.5): "Bearer v2.<hmac>.<time>" in the authorization
// metadata, where time is the unix time in seconds as a decimal string and
// hmac the lowercase hex HMAC-SHA256 of it keyed with the shared token.
// Gitaly accepts a token only for a short while around the time it names,
// so each call gets a fresh one. No transport security is required: Gitaly
// is commonly reached over plain TCP or a unix socket.
type tokenCredentials struct {
	token []byte
	now   func() time.Time
}

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (c tokenCredentials) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + V2Token(c.token, c.now())}, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials.
func (tokenCredentials) RequireTransportSecurity() bool { return false }

// V2Token is Gitaly's v2 token for the shared secret token at time now,
// without the "Bearer " scheme: "v2.<hex HMAC-SHA256(token, ts)>.<ts>",
// ts being now's unix time in seconds.
func V2Token(token []byte, now time.Time) string {
	ts := strconv.FormatInt(now.Unix(), 10)
	mac := hmac.New(sha256.New, token)
	mac.Write([]byte(ts))
	return "v2." + hex.EncodeToString(mac.Sum(nil)) + "." + ts
}
