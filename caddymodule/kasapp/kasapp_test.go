package kasapp

import (
	"context"
	"crypto/sha256"
	"errors"
	"net/http"
	"testing"

	"github.com/caddyserver/caddy/v2"

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
