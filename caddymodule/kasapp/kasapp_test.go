package kasapp

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel/h2tunneltest"
)

// TestTunnelStoreSurvivesReload follows Caddy's reload order: the new config's
// app is provisioned before the old one is cleaned up.
func TestTunnelStoreSurvivesReload(t *testing.T) {
	var old, next App
	if err := old.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	if err := next.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	if old.Store() != next.Store() || old.Router() != next.Router() {
		t.Fatal("a reload got a new tunnel store: connected agents would be lost")
	}
	if err := old.Cleanup(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := next.Router().Find(ctx, 1); !errors.Is(err, tunnel.ErrNoConnection) {
		t.Errorf("store after the old config's cleanup: Find = %v, want it still open", err)
	}

	// Process exit: the last reference goes and the store closes.
	if err := next.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if _, err := next.Router().Find(context.Background(), 1); !errors.Is(err, tunnel.ErrStoreClosed) {
		t.Errorf("store after the last cleanup: Find = %v, want ErrStoreClosed", err)
	}
}

func TestCleanupAfterFailedProvision(t *testing.T) {
	var a App
	if err := a.Cleanup(); err != nil {
		t.Errorf("Cleanup of an unprovisioned app = %v", err)
	}
}

type agentSet map[int64][sha256.Size]byte

func (s agentSet) Declares(id int64, credential [sha256.Size]byte) bool {
	d, ok := s[id]
	return ok && d == credential
}

// TestStartClosesRevokedTunnels: a reload that removes an agent or changes
// its token cuts that agent's tunnels when the new config starts, and keeps
// the others.
func TestStartClosesRevokedTunnels(t *testing.T) {
	var old App
	if err := old.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	defer old.Cleanup()
	tunnelOf := func(id int64, token string) *h2tunnel.Conn {
		p := h2tunneltest.NewPair(t, http.NotFoundHandler(), h2tunneltest.Options{
			Agent: tunnel.AgentInfo{ID: id, Credential: sha256.Sum256([]byte(token))},
		})
		t.Cleanup(old.Store().Add(p.KAS))
		return p.KAS
	}
	kept := tunnelOf(1, "token-one")
	removed := tunnelOf(2, "token-two")
	rotated := tunnelOf(3, "token-three")

	var next App
	if err := next.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	defer next.Cleanup()
	next.DeclareAgents(agentSet{
		1: sha256.Sum256([]byte("token-one")),
		3: sha256.Sum256([]byte("token-three-rotated")),
	})
	if err := next.Start(); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]*h2tunnel.Conn{"removed agent": removed, "rotated token": rotated} {
		select {
		case <-c.Done():
		default:
			t.Errorf("tunnel of the %s is still open", name)
		}
	}
	if kept.Err() != nil {
		t.Errorf("tunnel of a still declared agent was closed: %v", kept.Err())
	}
}

// TestStartRefusesUndeclaredAgents: a k8s_proxy user that names an agent no
// kubernetes_agent declares fails the configuration when it starts,
// instead of at request time.
func TestStartRefusesUndeclaredAgents(t *testing.T) {
	tests := []struct {
		name     string
		declared []int64
		refs     []AgentRef
		wantErr  []string
	}{
		{"all declared", []int64{1, 2}, []AgentRef{{ID: 1, By: "user a"}, {ID: 2, By: "user b"}}, nil},
		{"none named", []int64{1}, nil, nil},
		{"one undeclared", []int64{1, 2}, []AgentRef{{ID: 2, By: "user a"}, {ID: 3, By: `k8s_proxy user "ci", at Caddyfile:31,`}},
			[]string{`k8s_proxy user "ci", at Caddyfile:31, names agent 3, which no kubernetes_agent declares`}},
		{"two undeclared", nil, []AgentRef{{ID: 4, By: "user a"}, {ID: 5, By: "user b"}},
			[]string{"user a names agent 4", "user b names agent 5"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var a App
			if err := a.Provision(caddy.Context{}); err != nil {
				t.Fatal(err)
			}
			defer a.Cleanup()
			a.DeclareAgentIDs(tt.declared...)
			a.ReferAgents(tt.refs...)
			err := a.Start()
			if len(tt.wantErr) == 0 {
				if err != nil {
					t.Errorf("Start = %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("Start succeeded")
			}
			for _, want := range tt.wantErr {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("Start = %v, want it to say %q", err, want)
				}
			}
		})
	}
}

// TestLocalStore: the admin API finds the store while a configuration holds
// it, the same one across a reload, and nothing once the last is gone.
func TestLocalStore(t *testing.T) {
	if s := LocalStore(); s != nil {
		t.Fatal("LocalStore found a store before any kas app was provisioned")
	}
	var old, next App
	if err := old.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	if LocalStore() != old.Store() {
		t.Error("LocalStore is not the kas app's store")
	}
	if err := next.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	if err := old.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if LocalStore() != next.Store() {
		t.Error("LocalStore after a reload is not the kas app's store")
	}
	if err := next.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if s := LocalStore(); s != nil {
		t.Error("LocalStore found a store after the last kas app was cleaned up")
	}
}

// TestProvisionNodesRefuses: several-node settings that cannot work stop
// Caddy with a message that names the fix.
func TestProvisionNodesRefuses(t *testing.T) {
	good := writeTestFile(t, "good.secret", base64.StdEncoding.EncodeToString(bytes.Repeat([]byte("s"), 32)))
	short := writeTestFile(t, "short.secret", base64.StdEncoding.EncodeToString([]byte("short")))
	redisOK := &Redis{Addresses: []string{"127.0.0.1:1"}}
	tests := []struct {
		name    string
		app     *App
		wantErr string
	}{
		{"redis alone", &App{Redis: redisOK}, "redis and private_api go together"},
		{"private_api alone", &App{PrivateAPI: &PrivateAPI{Listen: "10.0.0.5:8155", SecretFile: good}}, "redis and private_api go together"},
		{"no addresses", &App{Redis: &Redis{}, PrivateAPI: &PrivateAPI{Listen: "10.0.0.5:8155", SecretFile: good}}, "addresses are required"},
		{"no listen", &App{Redis: redisOK, PrivateAPI: &PrivateAPI{SecretFile: good}}, "listen and secret_file are required"},
		{"short secret", &App{Redis: redisOK, PrivateAPI: &PrivateAPI{Listen: "10.0.0.5:8155", SecretFile: short}}, "must hold the base64 encoding of exactly 32 bytes; it decodes to 5 bytes"},
		{"loopback only", &App{Redis: redisOK, PrivateAPI: &PrivateAPI{Listen: "127.0.0.1:8155", SecretFile: good}}, "OWN_PRIVATE_API_URL or OWN_PRIVATE_API_CIDR"},
		{"grpcs without host", &App{Redis: redisOK, PrivateAPI: &PrivateAPI{Listen: "10.0.0.5:8155", SecretFile: good, OwnScheme: "grpcs"}}, "OWN_PRIVATE_API_HOST"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := tt.app
			err := a.Provision(caddy.Context{})
			defer a.Cleanup()
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Provision = %v, want an error containing %q", err, tt.wantErr)
			}
		})
	}
}

// TestExitDrain follows Caddy's exit: the drain starts (on the "stopping"
// event), the agent is asked to move, a request in flight finishes whole,
// and the last Cleanup waits for the drain before it closes the store.
func TestExitDrain(t *testing.T) {
	var a App
	if err := a.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	moved := make(chan struct{}, 1)
	p := h2tunneltest.NewPair(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first ")
		w.(http.Flusher).Flush()
		<-release
		io.WriteString(w, "last")
	}), h2tunneltest.Options{OnMove: func() { moved <- struct{}{} }})
	a.Store().Add(p.KAS)

	resp, err := p.Get(t.Context(), "/watch")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	first := make([]byte, len("first "))
	if _, err := io.ReadFull(resp.Body, first); err != nil {
		t.Fatal(err)
	}
	a.tunnels.drain(time.Minute, zap.NewNop())
	cleaned := make(chan error, 1)
	go func() { cleaned <- a.Cleanup() }()
	select {
	case <-moved:
	case <-time.After(30 * time.Second):
		t.Fatal("the agent was not asked to move")
	}
	if !p.KAS.Moving() {
		t.Error("the tunnel is not marked as moving")
	}
	close(release)
	if rest, err := io.ReadAll(resp.Body); err != nil || string(rest) != "last" {
		t.Errorf("the request in flight ended with %q, %v", rest, err)
	}
	resp.Body.Close() // the request is done: the tunnel is idle
	if err := <-cleaned; err != nil {
		t.Fatal(err)
	}
	if p.KAS.Err() == nil {
		t.Error("the tunnel is open after the last Cleanup")
	}
	if _, err := a.Router().Find(t.Context(), 1); !errors.Is(err, tunnel.ErrStoreClosed) {
		t.Errorf("Find after the drain: %v, want ErrStoreClosed", err)
	}
}

// writeTestFile writes content to a new file name in the test's temporary
// directory and returns its path.
func writeTestFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestPeerServerName: the nodes verify each other's certificates for the
// host name own_host gives, or OWN_PRIVATE_API_HOST in its place, as
// GitLab's KAS lets the environment override its configuration.
func TestPeerServerName(t *testing.T) {
	secret := writeTestFile(t, "private.secret", base64.StdEncoding.EncodeToString(bytes.Repeat([]byte("s"), 32)))
	tests := []struct {
		name, ownHost, env, want string
	}{
		{name: "own_host", ownHost: "kas.internal", want: "kas.internal"},
		{name: "environment over own_host", ownHost: "kas.internal", env: "kas-env.internal", want: "kas-env.internal"},
		{name: "environment alone", env: "kas-env.internal", want: "kas-env.internal"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("OWN_PRIVATE_API_HOST", tt.env)
			a := App{
				// Nothing listens there: Provision does not need Redis.
				Redis: &Redis{Addresses: []string{"127.0.0.1:1"}},
				PrivateAPI: &PrivateAPI{Listen: "127.0.0.1:0", SecretFile: secret,
					OwnURL: "grpcs://127.0.0.1:8155", OwnHost: tt.ownHost},
			}
			err := a.Provision(caddy.Context{})
			defer a.Cleanup()
			if err != nil {
				t.Fatal(err)
			}
			if a.nodes.peers.TLS == nil {
				t.Fatal("no TLS configuration for grpcs:// peers")
			}
			if got := a.nodes.peers.TLS.ServerName; got != tt.want {
				t.Errorf("peers' TLS server name %q, want %q", got, tt.want)
			}
		})
	}
}
