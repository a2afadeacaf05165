package tunnel_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/caddy-kas/caddy-kas/tunnel"
)

func TestValidMetaValue(t *testing.T) {
	tests := []struct {
		v    string
		want bool
	}{
		{"", true},
		{"v1.32.13-gke.1014001", true},
		{strings.Repeat("a", tunnel.MaxMetaValueLen), true},
		{strings.Repeat("a", tunnel.MaxMetaValueLen+1), false},
		{"v1\x01", false},
		{"line\nbreak", false},
		{"nämespace", false},
		{"del\x7f", false},
	}
	for _, tt := range tests {
		if got := tunnel.ValidMetaValue(tt.v); got != tt.want {
			t.Errorf("ValidMetaValue(%q) = %v, want %v", tt.v, got, tt.want)
		}
	}
}

func TestAgentMetaValidate(t *testing.T) {
	good := tunnel.AgentMeta{Version: "v0.1.0", CommitID: "abc123", PodNamespace: "gitlab-agent", PodName: "agentk-0",
		PodID: -1, ConnectionID: 9, KubernetesVersion: "v1.32.13", KubernetesPlatform: "linux/amd64"}
	if err := good.Validate(); err != nil {
		t.Fatalf("valid metadata: %v", err)
	}
	bad := good
	bad.PodName = "agentk\x00"
	bad.KubernetesPlatform = strings.Repeat("x", 300)
	err := bad.Validate()
	if !errors.Is(err, tunnel.ErrBadMeta) {
		t.Fatalf("Validate = %v, want tunnel.ErrBadMeta", err)
	}
	for _, field := range []string{"pod name", "kubernetes platform"} {
		if !strings.Contains(err.Error(), field) {
			t.Errorf("error %q does not name the %s", err, field)
		}
	}
}
