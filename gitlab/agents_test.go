package gitlab

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kas/caddy-kas/agentserver"
)

func TestAgentAuthenticator(t *testing.T) {
	tests := []struct {
		name        string
		status      int
		body        string
		want        agentserver.Agent
		wantUnknown bool
		wantErr     bool
	}{
		{name: "known", status: 200, body: agentInfoJSON, want: agentserver.Agent{ID: 2, Name: "my-agent", ProjectID: 1}},
		{name: "401 unknown or revoked", status: 401, body: `{"message":"401 Unauthorized"}`, wantUnknown: true},
		{name: "401 for the agent server's JWT (wrong shared secret)", status: 401, body: `{"message":"KAS JWT authentication invalid"}`, wantErr: true},
		{name: "403", status: 403, wantErr: true},
		{name: "404 (wrong GitLab URL)", status: 404, wantErr: true},
		{name: "500", status: 500, wantErr: true},
		{name: "no agent id", status: 200, body: `{"agent_name": "x"}`, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeGitLab(t, "")
			f.handle(PathAgentInfo, jsonAnswer(tt.status, tt.body))
			a := NewAgentAuthenticator(f.client(), 0, 0)
			for range 3 { // the answer is cached, errors included
				got, err := a.AuthenticateAgent(context.Background(), "agent-token-secret")
				switch {
				case tt.wantUnknown:
					if !errors.Is(err, agentserver.ErrUnknownToken) {
						t.Fatalf("error %v, want ErrUnknownToken", err)
					}
				case tt.wantErr:
					if err == nil || errors.Is(err, agentserver.ErrUnknownToken) {
						t.Fatalf("error %v, want a failure other than ErrUnknownToken", err)
					}
				default:
					if err != nil {
						t.Fatal(err)
					}
					if got != tt.want {
						t.Errorf("agent %+v, want %+v", got, tt.want)
					}
				}
				if err != nil && strings.Contains(err.Error(), "agent-token-secret") {
					t.Errorf("error %q contains the token", err)
				}
			}
			if n := f.callCount(PathAgentInfo); n != 1 {
				t.Errorf("%d agent_info calls, want 1 (cached)", n)
			}
		})
	}
}

func TestAgentAuthenticatorDefaults(t *testing.T) {
	a := NewAgentAuthenticator(&Client{}, 0, 0)
	if a.Cache.ttl != 5*time.Minute || a.Cache.errorTTL != time.Minute {
		t.Errorf("TTLs %v / %v, want GitLab's 5m / 1m", a.Cache.ttl, a.Cache.errorTTL)
	}
	if _, err := a.AuthenticateAgent(context.Background(), ""); !errors.Is(err, agentserver.ErrUnknownToken) {
		t.Errorf("empty token: %v", err)
	}
}
