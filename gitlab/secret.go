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
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the GitLab shared secret: %w", err)
	}
	text := strings.TrimSpace(string(raw))
	secret, err := base64.StdEncoding.DecodeString(text)
	if err != nil {
		// The decoder's error is not wrapped: it is about the contents,
		// which are the secret.
		return nil, fmt.Errorf("the GitLab shared secret file %s is not valid base64: it must hold the base64 encoding of exactly %d bytes", path, SecretLength)
	}
	if len(secret) != SecretLength {
		return nil, fmt.Errorf("the GitLab shared secret file %s must hold the base64 encoding of exactly %d bytes; it decodes to %d bytes", path, SecretLength, len(secret))
	}
	return secret, nil
}
