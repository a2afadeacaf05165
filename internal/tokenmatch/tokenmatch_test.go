package tokenmatch

import (
	"reflect"
	"testing"
)

func TestMatch(t *testing.T) {
	s := New([]string{"alpha", "beta", "gamma"})
	tests := []struct {
		token string
		want  int
	}{
		{"alpha", 0}, {"beta", 1}, {"gamma", 2},
		{"", -1}, {"alph", -1}, {"alphaa", -1}, {"ALPHA", -1},
	}
	for _, tt := range tests {
		if got := s.Match(tt.token); got != tt.want {
			t.Errorf("Match(%q) = %d, want %d", tt.token, got, tt.want)
		}
	}
	if got := New(nil).Match("x"); got != -1 {
		t.Errorf("empty set matched at %d", got)
	}
}

func TestDuplicates(t *testing.T) {
	if got := Duplicates([]string{"a", "b", "a", "c", "b"}); !reflect.DeepEqual(got, []int{2, 4}) {
		t.Errorf("Duplicates = %v, want [2 4]", got)
	}
}
