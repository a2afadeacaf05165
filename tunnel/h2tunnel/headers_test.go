package h2tunnel_test

import (
	"errors"
	"net/http"
	"reflect"
	"strings"
	"testing"

	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
)

func TestAgentMetaRoundTrip(t *testing.T) {
	in := tunnel.AgentMeta{
		Version: "v0.1.0", CommitID: "abc123", PodNamespace: "gitlab-agent", PodName: "agentk-7d9f",
		PodID: 8817, ConnectionID: -42, KubernetesVersion: "v1.32.13", KubernetesPlatform: "linux/amd64",
	}
	h := http.Header{}
	h2tunnel.SetMetaHeaders(h, in)
	out, err := h2tunnel.MetaFromHeaders(h)
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
		{"too long", h2tunnel.HeaderPodName, strings.Repeat("a", 254)},
		{"control character", h2tunnel.HeaderAgentVersion, "v1\x01"},
		{"non-ASCII", h2tunnel.HeaderPodNamespace, "nämespace"},
		{"not a number", h2tunnel.HeaderPodID, "12a"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := http.Header{}
			h.Set(tt.header, tt.value)
			if _, err := h2tunnel.MetaFromHeaders(h); !errors.Is(err, tunnel.ErrBadMeta) {
				t.Errorf("h2tunnel.MetaFromHeaders = %v, want tunnel.ErrBadMeta", err)
			}
		})
	}
	if m, err := h2tunnel.MetaFromHeaders(http.Header{}); err != nil || m != (tunnel.AgentMeta{}) {
		t.Errorf("empty headers: %+v, %v; want zero meta and no error", m, err)
	}
}

func TestIdentityRoundTrip(t *testing.T) {
	in := &identity.Identity{
		Username: "gitlab:ci_job:42",
		UID:      "u-1",
		Groups:   []string{"gitlab:ci_job", "gitlab:project:7", "dev ops"},
		Extra:    map[string][]string{"agent.gitlab.com/id": {"5"}},
	}
	out, err := h2tunnel.DecodeIdentity(h2tunnel.EncodeIdentity(in))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(in, out) {
		t.Errorf("round trip: got %+v, want %+v", out, in)
	}
	for _, bad := range []string{"", "!!!", "bnVsbA", "e30"} { // "", invalid, "null", "{}"
		if _, err := h2tunnel.DecodeIdentity(bad); !errors.Is(err, h2tunnel.ErrBadIdentity) {
			t.Errorf("h2tunnel.DecodeIdentity(%q) = %v, want h2tunnel.ErrBadIdentity", bad, err)
		}
	}
}

// FuzzMetaFromHeaders holds the handshake metadata decoder to its
// contract on arbitrary header values: what it accepts passes
// tunnel.AgentMeta.Validate and survives a round trip.
func FuzzMetaFromHeaders(f *testing.F) {
	f.Add("v1.2.3", "agentk-0", "8817", "-42", "v1.32.13")
	f.Add(strings.Repeat("a", 254), "x\x01", "12a", "", "nämespace")
	f.Add("", "", "9223372036854775808", "+1", " v1")
	f.Fuzz(func(t *testing.T, version, podName, podID, connID, kubeVersion string) {
		h := http.Header{}
		h.Set(h2tunnel.HeaderAgentVersion, version)
		h.Set(h2tunnel.HeaderPodName, podName)
		h.Set(h2tunnel.HeaderPodID, podID)
		h.Set(h2tunnel.HeaderConnectionID, connID)
		h.Set(h2tunnel.HeaderKubernetesVersion, kubeVersion)
		m, err := h2tunnel.MetaFromHeaders(h)
		if err != nil {
			if !errors.Is(err, tunnel.ErrBadMeta) {
				t.Fatalf("error %v does not wrap tunnel.ErrBadMeta", err)
			}
			if m != (tunnel.AgentMeta{}) {
				t.Fatalf("refused metadata came back as %+v", m)
			}
			return
		}
		if err := m.Validate(); err != nil {
			t.Fatalf("accepted metadata fails Validate: %v", err)
		}
		again := http.Header{}
		h2tunnel.SetMetaHeaders(again, m)
		if m2, err := h2tunnel.MetaFromHeaders(again); err != nil || m2 != m {
			t.Fatalf("round trip: %+v, %v; want %+v", m2, err, m)
		}
	})
}

// FuzzDecodeIdentity holds the identity decoder to its contract on
// arbitrary header values: an identity it accepts has a username and
// encodes to a value that decodes to an identity with the same encoding
// (an empty list and a missing one are the same to Kubernetes).
func FuzzDecodeIdentity(f *testing.F) {
	f.Add(h2tunnel.EncodeIdentity(&identity.Identity{Username: "gitlab:ci_job:42", Groups: []string{"a"}, Extra: map[string][]string{"k": {"v"}}}))
	for _, s := range []string{"", "!!!", "bnVsbA", "e30", "eyJ1c2VybmFtZSI6MX0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		id, err := h2tunnel.DecodeIdentity(v)
		if err != nil {
			if !errors.Is(err, h2tunnel.ErrBadIdentity) {
				t.Fatalf("error %v does not wrap ErrBadIdentity", err)
			}
			return
		}
		if id.Username == "" {
			t.Fatal("accepted an identity without a username")
		}
		enc := h2tunnel.EncodeIdentity(id)
		again, err := h2tunnel.DecodeIdentity(enc)
		if err != nil || h2tunnel.EncodeIdentity(again) != enc {
			t.Fatalf("round trip: %+v, %v; want %+v", again, err, id)
		}
	})
}

func TestDecodeRequest(t *testing.T) {
	alice := &identity.Identity{Username: "alice", Groups: []string{"dev"}}
	tests := []struct {
		name         string
		header       http.Header
		wantIdentity *identity.Identity
		wantUpgrade  string
		wantErr      bool
	}{
		{name: "plain", header: http.Header{"Accept": {"*/*"}}},
		{name: "identity", header: http.Header{h2tunnel.IdentityHeader: {h2tunnel.EncodeIdentity(alice)}}, wantIdentity: alice},
		{name: "upgrade", header: http.Header{h2tunnel.UpgradeHeader: {"SPDY/3.1"}}, wantUpgrade: "SPDY/3.1"},
		{name: "two identities", header: http.Header{h2tunnel.IdentityHeader: {h2tunnel.EncodeIdentity(alice), h2tunnel.EncodeIdentity(alice)}}, wantErr: true},
		{name: "malformed identity", header: http.Header{h2tunnel.IdentityHeader: {"!!"}}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, _ := http.NewRequest(http.MethodGet, "http://agent/api", nil)
			r.Header = tt.header.Clone()
			r.Header.Set("Kas-Something-Else", "x")
			req, err := h2tunnel.DecodeRequest(r)
			if tt.wantErr {
				if !errors.Is(err, h2tunnel.ErrBadIdentity) {
					t.Fatalf("DecodeRequest = %v, want ErrBadIdentity", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(req.Identity, tt.wantIdentity) || req.Upgrade != tt.wantUpgrade || req.HTTP != r {
				t.Errorf("got identity %+v upgrade %q, want %+v %q", req.Identity, req.Upgrade, tt.wantIdentity, tt.wantUpgrade)
			}
			for k := range r.Header {
				if strings.HasPrefix(k, "Kas-") {
					t.Errorf("header %s left for the apiserver", k)
				}
			}
		})
	}
}
