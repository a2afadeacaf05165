// Package buildinfo says which build of caddy-kas is running, for the
// version GitLab shows next to its agents and the User-Agent of calls to
// GitLab.
package buildinfo

import (
	"runtime/debug"
	"sync"
)

// modulePath is this project's Go module. In a custom Caddy build
// (xcaddy) it is a dependency of the main module, with a real version.
const modulePath = "github.com/caddy-kas/caddy-kas"

var read = sync.OnceValues(func() (version, commit string) {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "devel", ""
	}
	version = moduleVersion(bi)
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" {
			commit = s.Value
		}
	}
	if len(commit) > 12 {
		commit = commit[:12]
	}
	return version, commit
})

func moduleVersion(bi *debug.BuildInfo) string {
	if bi.Main.Path == modulePath {
		if v := bi.Main.Version; v != "" && v != "(devel)" {
			return v
		}
		return "devel"
	}
	for _, m := range bi.Deps {
		if m.Path != modulePath {
			continue
		}
		if m.Replace != nil && m.Replace.Version != "" {
			return m.Replace.Version
		}
		if m.Version != "" {
			return m.Version
		}
	}
	return "devel"
}

// Version is the caddy-kas module version ("v1.2.3"), or "devel" for a
// build from a work tree.
func Version() string { v, _ := read(); return v }

// Commit is the short VCS revision Go recorded in the binary, or "" when
// it recorded none.
func Commit() string { _, c := read(); return c }
