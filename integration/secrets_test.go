package integration

import (
	"crypto/rand"
	"encoding/hex"
	"strings"
	"sync"
)

// knownSecrets remembers every token the tests made, so that process output
// can be searched for leaks and so that logs printed by the tests never show
// one.
var knownSecrets struct {
	sync.Mutex
	labelByValue map[string]string
}

// newToken returns a fresh random token and remembers it under label, which
// describes it in messages instead of its value.
func newToken(label string) string {
	token := randomHex(24)
	knownSecrets.Lock()
	defer knownSecrets.Unlock()
	if knownSecrets.labelByValue == nil {
		knownSecrets.labelByValue = make(map[string]string)
	}
	knownSecrets.labelByValue[token] = label
	return token
}

// randomHex returns n random bytes from crypto/rand, hex encoded.
func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails on supported platforms
	return hex.EncodeToString(b)
}

// leakedSecret reports the label of a token that text contains.
func leakedSecret(text string) (label string, found bool) {
	knownSecrets.Lock()
	defer knownSecrets.Unlock()
	for value, label := range knownSecrets.labelByValue {
		if strings.Contains(text, value) {
			return label, true
		}
	}
	return "", false
}

// redact replaces every known token in text by its label.
func redact(text string) string {
	knownSecrets.Lock()
	defer knownSecrets.Unlock()
	for value, label := range knownSecrets.labelByValue {
		text = strings.ReplaceAll(text, value, "<"+label+">")
	}
	return text
}
