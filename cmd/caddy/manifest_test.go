package main

import (
	"go/parser"
	"go/token"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
	"golang.org/x/mod/modfile"
)

// manifest is xcaddy.toml.
type manifest struct {
	Caddy struct {
		Version string `toml:"version"`
	} `toml:"caddy"`
	Build struct {
		Main   string   `toml:"main"`
		Output string   `toml:"output"`
		Flags  []string `toml:"flags"`
	} `toml:"build"`
	Plugins []struct {
		Module  string `toml:"module"`
		Version string `toml:"version"`
	} `toml:"plugins"`
}

const (
	ourModule       = "github.com/caddy-kas/caddy-kas"
	caddyModule     = "github.com/caddyserver/caddy/v2"
	standardModules = "github.com/caddyserver/caddy/v2/modules/standard"
)

// TestManifestMatchesBuild keeps xcaddy.toml, go.mod and this package's
// imports in agreement, so the manifest always says what ships.
func TestManifestMatchesBuild(t *testing.T) {
	var m manifest
	meta, err := toml.DecodeFile("../../xcaddy.toml", &m)
	if err != nil {
		t.Fatal(err)
	}
	if undecoded := meta.Undecoded(); len(undecoded) > 0 {
		t.Errorf("xcaddy.toml has keys this test does not know: %v", undecoded)
	}
	gomodText, err := os.ReadFile("../../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	gomod, err := modfile.Parse("go.mod", gomodText, nil)
	if err != nil {
		t.Fatal(err)
	}
	required := map[string]string{}
	for _, r := range gomod.Require {
		required[r.Mod.Path] = r.Mod.Version
	}

	if got := required[caddyModule]; got != m.Caddy.Version {
		t.Errorf("xcaddy.toml ships Caddy %s, go.mod requires %s", m.Caddy.Version, got)
	}
	if m.Build.Main != "./cmd/caddy" {
		t.Errorf("xcaddy.toml builds %s; this test checks ./cmd/caddy", m.Build.Main)
	}

	var plugins []string
	for _, p := range m.Plugins {
		plugins = append(plugins, p.Module)
		switch {
		case p.Module == ourModule || strings.HasPrefix(p.Module, ourModule+"/"):
			if p.Version != "" {
				t.Errorf("plugin %s is built from this module and must not have a version", p.Module)
			}
		case p.Version == "":
			t.Errorf("third-party plugin %s needs a version", p.Module)
		default:
			if v, ok := requiredFor(required, p.Module); !ok || v != p.Version {
				t.Errorf("plugin %s: xcaddy.toml says %s, go.mod says %q", p.Module, p.Version, v)
			}
		}
	}

	f, err := parser.ParseFile(token.NewFileSet(), "main.go", nil, parser.ImportsOnly)
	if err != nil {
		t.Fatal(err)
	}
	var blank []string
	for _, imp := range f.Imports {
		if imp.Name != nil && imp.Name.Name == "_" {
			path, _ := strconv.Unquote(imp.Path.Value)
			if path != "time/tzdata" && path != standardModules {
				blank = append(blank, path)
			}
		}
	}
	slices.Sort(blank)
	slices.Sort(plugins)
	if !slices.Equal(blank, plugins) {
		t.Errorf("cmd/caddy imports plugins %v, xcaddy.toml lists %v", blank, plugins)
	}
}

// requiredFor returns the go.mod version of the module that provides pkg.
func requiredFor(required map[string]string, pkg string) (string, bool) {
	for p := pkg; p != "." && p != "/" && p != ""; p = p[:max(strings.LastIndex(p, "/"), 0)] {
		if v, ok := required[p]; ok {
			return v, true
		}
		if !strings.Contains(p, "/") {
			break
		}
	}
	return "", false
}
