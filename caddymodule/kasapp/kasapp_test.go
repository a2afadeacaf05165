package kasapp

import (
	"context"
	"errors"
	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-kas/caddy-kas/tunnel"
)

// TestRegistrySurvivesReload follows Caddy's reload order: the new config's
// app is provisioned before the old one is cleaned up.
func TestRegistrySurvivesReload(t *testing.T) {
	var old, next App
	if err := old.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	if err := next.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	if old.Registry() != next.Registry() {
		t.Fatal("a reload got a new registry: connected agents would be lost")
	}
	if err := old.Cleanup(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := next.Registry().Find(ctx, 1); !errors.Is(err, tunnel.ErrNoConnection) {
		t.Errorf("registry after the old config's cleanup: Find = %v, want it still open", err)
	}

	// Process exit: the last reference goes and the registry closes.
	if err := next.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if _, err := next.Registry().Find(context.Background(), 1); !errors.Is(err, tunnel.ErrRegistryClosed) {
		t.Errorf("registry after the last cleanup: Find = %v, want ErrRegistryClosed", err)
	}
}

func TestCleanupAfterFailedProvision(t *testing.T) {
	var a App
	if err := a.Cleanup(); err != nil {
		t.Errorf("Cleanup of an unprovisioned app = %v", err)
	}
}
