// Package tokenmatch finds which of a set of secret tokens a client
// presented, in time that does not depend on the token.
package tokenmatch

import (
	"crypto/sha256"
	"crypto/subtle"
)

// Set is an immutable set of tokens.
type Set struct {
	digests [][sha256.Size]byte // SHA-256 of each token, in the order given
}

// New returns the set of tokens; Match reports positions in this order.
func New(tokens []string) *Set {
	s := &Set{digests: make([][sha256.Size]byte, len(tokens))}
	for i, t := range tokens {
		s.digests[i] = sha256.Sum256([]byte(t))
	}
	return s
}

// Match returns the position of token in the set, or -1. It compares
// fixed-size digests, so the time taken does not depend on the token's
// length or on how much of it is right, and it compares all of them
// without stopping or branching on a match, so the time does not tell
// which entry (if any) matched either.
func (s *Set) Match(token string) int {
	return s.MatchDigest(sha256.Sum256([]byte(token)))
}

// MatchDigest is Match for a token known by its SHA-256 digest.
func (s *Set) MatchDigest(d [sha256.Size]byte) int {
	found := -1
	for i := range s.digests {
		eq := subtle.ConstantTimeCompare(d[:], s.digests[i][:])
		found = subtle.ConstantTimeSelect(eq, i, found)
	}
	return found
}

// Duplicates returns the positions of tokens equal to an earlier one, so
// that configuration errors can name them.
func Duplicates(tokens []string) []int {
	seen := make(map[[sha256.Size]byte]bool, len(tokens))
	var dups []int
	for i, t := range tokens {
		d := sha256.Sum256([]byte(t))
		if seen[d] {
			dups = append(dups, i)
		}
		seen[d] = true
	}
	return dups
}
