package buildinfo

import (
	"runtime/debug"
	"testing"
)

func TestModuleVersion(t *testing.T) {
	dep := func(path, version string, replace *debug.Module) *debug.Module {
		return &debug.Module{Path: path, Version: version, Replace: replace}
	}
	tests := []struct {
		name string
		bi   *debug.BuildInfo
		want string
	}{
		{
			name: "main module",
			bi:   &debug.BuildInfo{Main: debug.Module{Path: modulePath, Version: "v1.2.3"}},
			want: "v1.2.3",
		},
		{
			name: "main module pseudo-version",
			bi:   &debug.BuildInfo{Main: debug.Module{Path: modulePath, Version: "v0.0.0-20240102030405-0123456789ab"}},
			want: "v0.0.0-20240102030405-0123456789ab",
		},
		{
			name: "main module from a work tree",
			bi:   &debug.BuildInfo{Main: debug.Module{Path: modulePath, Version: "(devel)"}},
			want: "devel",
		},
		{
			name: "main module without a version",
			bi:   &debug.BuildInfo{Main: debug.Module{Path: modulePath}},
			want: "devel",
		},
		{
			name: "dependency",
			bi: &debug.BuildInfo{
				Main: debug.Module{Path: "caddy", Version: "(devel)"},
				Deps: []*debug.Module{
					dep("github.com/caddyserver/caddy/v2", "v2.8.4", nil),
					dep(modulePath, "v1.4.0", nil),
				},
			},
			want: "v1.4.0",
		},
		{
			name: "dependency replaced by another version",
			bi: &debug.BuildInfo{
				Main: debug.Module{Path: "caddy", Version: "(devel)"},
				Deps: []*debug.Module{
					dep(modulePath, "v1.4.0", dep("github.com/fork/caddy-kas", "v1.4.1-fix", nil)),
				},
			},
			want: "v1.4.1-fix",
		},
		{
			name: "dependency replaced by a local directory",
			bi: &debug.BuildInfo{
				Main: debug.Module{Path: "caddy", Version: "(devel)"},
				Deps: []*debug.Module{
					dep(modulePath, "v1.4.0", dep("../caddy-kas", "", nil)),
				},
			},
			want: "devel",
		},
		{
			name: "module with a longer path is not this one",
			bi: &debug.BuildInfo{
				Main: debug.Module{Path: "caddy", Version: "(devel)"},
				Deps: []*debug.Module{dep(modulePath+"/v2", "v2.0.0", nil)},
			},
			want: "devel",
		},
		{
			name: "not built with this module",
			bi:   &debug.BuildInfo{Main: debug.Module{Path: "example.com/other", Version: "v9.9.9"}},
			want: "devel",
		},
		{
			name: "no build information",
			want: "devel",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := moduleVersion(tt.bi); got != tt.want {
				t.Errorf("moduleVersion = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestResolve(t *testing.T) {
	bi := &debug.BuildInfo{
		Main: debug.Module{Path: modulePath, Version: "v1.2.3"},
		Settings: []debug.BuildSetting{
			{Key: "vcs", Value: "git"},
			{Key: "vcs.revision", Value: "0123456789abcdef0123456789abcdef01234567"},
		},
	}
	tests := []struct {
		name                    string
		linkVersion, linkCommit string
		bi                      *debug.BuildInfo
		wantVersion, wantCommit string
	}{
		{name: "recorded", bi: bi, wantVersion: "v1.2.3", wantCommit: "0123456789ab"},
		{name: "linker", linkVersion: "v2.0.0", linkCommit: "0123456789abcdef", bi: bi, wantVersion: "v2.0.0", wantCommit: "0123456789abcdef"},
		{name: "linker version only", linkVersion: "v2.0.0", bi: bi, wantVersion: "v2.0.0", wantCommit: "0123456789ab"},
		{name: "short revision", bi: &debug.BuildInfo{Main: debug.Module{Path: modulePath}, Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "abc"}}}, wantVersion: "devel", wantCommit: "abc"},
		{name: "revision of another main module", bi: &debug.BuildInfo{
			Main:     debug.Module{Path: "example.com/custom-caddy", Version: "(devel)"},
			Deps:     []*debug.Module{{Path: modulePath, Version: "v1.4.0"}},
			Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "fedcba9876543210"}},
		}, wantVersion: "v1.4.0", wantCommit: ""},
		{name: "no revision", bi: &debug.BuildInfo{Main: debug.Module{Path: modulePath, Version: "(devel)"}}, wantVersion: "devel", wantCommit: ""},
		{name: "no build information", wantVersion: "devel", wantCommit: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, c := resolve(tt.linkVersion, tt.linkCommit, tt.bi)
			if v != tt.wantVersion || c != tt.wantCommit {
				t.Errorf("resolve = %q, %q; want %q, %q", v, c, tt.wantVersion, tt.wantCommit)
			}
		})
	}
}

func TestVersionAndCommit(t *testing.T) {
	// Whatever the test binary recorded, the version is never empty and
	// the commit is short unless the linker set it.
	if v := Version(); v == "" {
		t.Error("Version is empty")
	}
	if c := Commit(); len(c) > shortCommit && commit == "" {
		t.Errorf("Commit = %q, longer than %d characters", c, shortCommit)
	}
}
