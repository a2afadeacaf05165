package identity_test

import (
	"net/http"
	"reflect"
	"testing"

	"github.com/caddy-kas/caddy-kas/identity"
)

func TestSetImpersonation(t *testing.T) {
	h := http.Header{}
	h.Set("Impersonate-User", "client-chosen")
	h.Add("Impersonate-Group", "system:masters")
	h["impersonate-extra-scopes"] = []string{"x"} // not canonical: must still go
	h.Set("Accept", "application/json")
	id := &identity.Identity{
		Username: "alice",
		Groups:   []string{"dev", "viewers"},
		Extra:    map[string][]string{"agent.gitlab.com/id": {"5"}, "a b%": {"1", "2"}},
	}
	id.SetImpersonation(h)
	want := http.Header{
		"Accept":            {"application/json"},
		"Impersonate-User":  {"alice"},
		"Impersonate-Group": {"dev", "viewers"},
		// Go canonicalises header names ("%2F" becomes "%2f"); the
		// apiserver lower-cases extra keys before unescaping, so both mean
		// "agent.gitlab.com/id".
		"Impersonate-Extra-Agent.gitlab.com%2fid": {"5"},
		"Impersonate-Extra-A%20b%25":              {"1", "2"},
	}
	if !reflect.DeepEqual(h, want) {
		t.Errorf("headers:\n got %v\nwant %v", h, want)
	}
}

func TestHasImpersonation(t *testing.T) {
	tests := []struct {
		h    http.Header
		want bool
	}{
		{http.Header{"Accept": {"*/*"}}, false},
		{http.Header{"Impersonate-User": {"bob"}}, true},
		{http.Header{"Impersonate-Uid": {"1"}}, true},
		{http.Header{"impersonate-group": {"g"}}, true},
		{http.Header{"Impersonate-Extra-Foo": {"x"}}, true},
		{http.Header{"Impersonated": {"x"}}, false},
	}
	for _, tt := range tests {
		if got := identity.HasImpersonation(tt.h); got != tt.want {
			t.Errorf("identity.HasImpersonation(%v) = %v, want %v", tt.h, got, tt.want)
		}
	}
}
