package gitlab

import (
	"encoding/base64"
	"fmt"
	"os"
	"strings"
)

// SecretLength is the length of GitLab's KAS shared secret once decoded
// (kas-spec §2.2): Rails and the agent server both refuse any other.
const SecretLength = 32

// LoadSecretFile reads GitLab's KAS shared secret, the file Rails knows as
// gitlab_kas.secret_file (kas-spec §2.2). The file holds the standard base64
// encoding of exactly [SecretLength] bytes; whitespace around it, such as a
// final newline, is ignored. Errors name the file and the rule it breaks
// but never include its contents.
func LoadSecretFile(path string) ([]byte, error) {
	return LoadBase64SecretFile(path, "GitLab shared secret", SecretLength)
}

// LoadBase64SecretFile reads a secret file in the form of GitLab's secrets:
// the standard base64 encoding of exactly size bytes, whitespace around it
// ignored. what names the secret in errors, which name the file and the
// rule it breaks but never include its contents.
func LoadBase64SecretFile(path, what string, size int) ([]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the %s: %w", what, err)
	}
	text := strings.TrimSpace(string(raw))
	secret, err := base64.StdEncoding.DecodeString(text)
	if err != nil {
		// The decoder's error is not wrapped: it is about the contents,
		// which are the secret.
		return nil, fmt.Errorf("the %s file %s is not valid base64: it must hold the base64 encoding of exactly %d bytes", what, path, size)
	}
	if len(secret) != size {
		return nil, fmt.Errorf("the %s file %s must hold the base64 encoding of exactly %d bytes; it decodes to %d bytes", what, path, size, len(secret))
	}
	return secret, nil
}
