package tunnel_test

import (
	"errors"
	"net/http"
	"reflect"
	"strings"
	"testing"

	"github.com/caddy-kas/caddy-kas/tunnel"
)

func TestAgentMetaRoundTrip(t *testing.T) {
	in := tunnel.AgentMeta{
		Version: "v0.1.0", CommitID: "abc123", PodNamespace: "gitlab-agent", PodName: "agentk-7d9f",
		PodID: 8817, ConnectionID: -42, KubernetesVersion: "v1.32.13", KubernetesPlatform: "linux/amd64",
	}
	h := http.Header{}
	in.SetHeaders(h)
	out, err := tunnel.MetaFromHeaders(h)
	if err != nil {
		t.Fatal(err)
	}
	if out != in {
		t.Errorf("round trip: got %+v, want %+v", out, in)
	}
}

func TestMetaFromHeadersRejects(t *testing.T) {
	tests := []struct {
		name   string
		header string
		value  string
	}{
		{"too long", tunnel.HeaderPodName, strings.Repeat("a", 254)},
		{"control character", tunnel.HeaderAgentVersion, "v1\x01"},
		{"non-ASCII", tunnel.HeaderPodNamespace, "nämespace"},
		{"not a number", tunnel.HeaderPodID, "12a"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := http.Header{}
			h.Set(tt.header, tt.value)
			if _, err := tunnel.MetaFromHeaders(h); !errors.Is(err, tunnel.ErrBadMeta) {
				t.Errorf("tunnel.MetaFromHeaders = %v, want tunnel.ErrBadMeta", err)
			}
		})
	}
	if m, err := tunnel.MetaFromHeaders(http.Header{}); err != nil || m != (tunnel.AgentMeta{}) {
		t.Errorf("empty headers: %+v, %v; want zero meta and no error", m, err)
	}
}

func TestIdentityRoundTrip(t *testing.T) {
	in := &tunnel.Identity{
		Username: "gitlab:ci_job:42",
		UID:      "u-1",
		Groups:   []string{"gitlab:ci_job", "gitlab:project:7", "dev ops"},
		Extra:    map[string][]string{"agent.gitlab.com/id": {"5"}},
	}
	out, err := tunnel.DecodeIdentity(in.Encode())
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(in, out) {
		t.Errorf("round trip: got %+v, want %+v", out, in)
	}
	for _, bad := range []string{"", "!!!", "bnVsbA", "e30"} { // "", invalid, "null", "{}"
		if _, err := tunnel.DecodeIdentity(bad); !errors.Is(err, tunnel.ErrBadIdentity) {
			t.Errorf("tunnel.DecodeIdentity(%q) = %v, want tunnel.ErrBadIdentity", bad, err)
		}
	}
}

func TestSetImpersonation(t *testing.T) {
	h := http.Header{}
	h.Set("Impersonate-User", "client-chosen")
	h.Add("Impersonate-Group", "system:masters")
	h["impersonate-extra-scopes"] = []string{"x"} // not canonical: must still go
	h.Set("Accept", "application/json")
	id := &tunnel.Identity{
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
		if got := tunnel.HasImpersonation(tt.h); got != tt.want {
			t.Errorf("tunnel.HasImpersonation(%v) = %v, want %v", tt.h, got, tt.want)
		}
	}
}
