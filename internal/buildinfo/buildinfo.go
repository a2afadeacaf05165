// Package buildinfo says which build of caddy-kas is running. The Caddy
// module reports it to GitLab (the User-Agent of its calls and the server
// info of the Rails API), and agentk reports it to KAS in its handshake,
// in its metrics and for --version.
//
// By default the version and commit come from what the Go toolchain
// recorded in the binary. Release builds may set them with the linker
// instead; a value set this way is used as given:
//
//	go build -ldflags "-X github.com/caddy-kas/caddy-kas/internal/buildinfo.version=v1.2.3 -X github.com/caddy-kas/caddy-kas/internal/buildinfo.commit=0123456789ab" ./cmd/agentk
package buildinfo

import (
	"runtime/debug"
	"sync"
)

// modulePath is this project's Go module. In a custom Caddy build
// (xcaddy) it is a dependency of the main module, with a real version.
const modulePath = "github.com/caddy-kas/caddy-kas"

// devel is the version of a build whose module version is not known,
// such as one from a work tree.
const devel = "devel"

// shortCommit is how many characters of the recorded VCS revision
// [Commit] keeps.
const shortCommit = 12

// version and commit are set by the linker (see the package
// documentation). Empty means the value Go recorded.
var (
	version string
	commit  string
)

// read caches the result of resolve; the build information never changes
// while the process runs.
var read = sync.OnceValues(func() (string, string) {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return resolve(version, commit, nil)
	}
	return resolve(version, commit, bi)
})

// resolve picks the version and commit: the linker's values where set,
// else those recorded in bi, which may be nil.
func resolve(linkVersion, linkCommit string, bi *debug.BuildInfo) (v, c string) {
	v, c = linkVersion, linkCommit
	if v == "" {
		v = moduleVersion(bi)
	}
	if c == "" {
		c = revision(bi)
	}
	return v, c
}

// Of returns the version and commit that a binary with the build
// information bi reports when no linker value is set, so that tools
// inspecting a built binary (the agentk image builder labels its image
// with them) agree with what the binary says of itself.
func Of(bi *debug.BuildInfo) (version, commit string) {
	return resolve("", "", bi)
}

// moduleVersion returns the version of this project's module in bi,
// whether it is the main module or a dependency, or "devel" when bi does
// not say. A dependency replaced by a local directory counts as a build
// from a work tree.
func moduleVersion(bi *debug.BuildInfo) string {
	if bi == nil {
		return devel
	}
	if bi.Main.Path == modulePath {
		if v := bi.Main.Version; v != "" && v != "(devel)" {
			return v
		}
		return devel
	}
	for _, m := range bi.Deps {
		if m.Path != modulePath {
			continue
		}
		if m.Replace != nil {
			if m.Replace.Version != "" {
				return m.Replace.Version
			}
			return devel
		}
		if m.Version != "" {
			return m.Version
		}
	}
	return devel
}

// revision returns the VCS revision recorded in bi, shortened to
// shortCommit characters, or "" when there is none. Go records the
// revision of the main module only: in a custom Caddy build (xcaddy) that
// is the builder's module, whose commit says nothing about caddy-kas, so
// it is not reported.
func revision(bi *debug.BuildInfo) string {
	if bi == nil || bi.Main.Path != modulePath {
		return ""
	}
	var c string
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" {
			c = s.Value
		}
	}
	if len(c) > shortCommit {
		c = c[:shortCommit]
	}
	return c
}

// Version returns the caddy-kas version, such as "v1.2.3": the one set by
// the linker, else the module version Go recorded, else "devel".
func Version() string {
	v, _ := read()
	return v
}

// Commit returns the commit caddy-kas was built from: the one set by the
// linker, else the first 12 characters of the VCS revision Go recorded,
// else "".
func Commit() string {
	_, c := read()
	return c
}
