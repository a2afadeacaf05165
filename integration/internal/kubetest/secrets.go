package kubetest

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

// NewToken returns a fresh random token and remembers it under label, which
// describes it in messages instead of its value.
func NewToken(label string) string {
	token := RandomHex(24)
	NoteSecret(token, label)
	return token
}

// NoteSecret remembers a secret the tests did not make with NewToken (a
// shared secret read from a file, say) under label, so that it is searched
// for and redacted like the tokens.
func NoteSecret(value, label string) {
	knownSecrets.Lock()
	defer knownSecrets.Unlock()
	if knownSecrets.labelByValue == nil {
		knownSecrets.labelByValue = make(map[string]string)
	}
	knownSecrets.labelByValue[value] = label
}

// RandomHex returns n random bytes from crypto/rand, hex encoded.
func RandomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails on supported platforms
	return hex.EncodeToString(b)
}

// LeakedSecret reports the label of a token made by NewToken that text
// contains.
func LeakedSecret(text string) (label string, found bool) {
	knownSecrets.Lock()
	defer knownSecrets.Unlock()
	for value, label := range knownSecrets.labelByValue {
		if strings.Contains(text, value) {
			return label, true
		}
	}
	return "", false
}

// Redact replaces every token made by NewToken in text by its label.
func Redact(text string) string {
	knownSecrets.Lock()
	defer knownSecrets.Unlock()
	for value, label := range knownSecrets.labelByValue {
		text = strings.ReplaceAll(text, value, "<"+label+">")
	}
	return text
}
