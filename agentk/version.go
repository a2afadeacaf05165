package agentk

import (
	"runtime/debug"
	"sync"
)

// Version and Commit identify the agentk build. Release builds set them
// with the linker:
//
//	go build -ldflags "-X github.com/caddy-kas/caddy-kas/agentk.Version=v1.2.3 -X github.com/caddy-kas/caddy-kas/agentk.Commit=abc123" ./cmd/agentk
//
// When they are empty, [BuildVersion] and [BuildCommit] fall back to what
// the Go toolchain recorded in the binary.
var (
	Version string
	Commit  string
)

// buildInfo caches what debug.ReadBuildInfo says; it never changes while
// the process runs.
var buildInfo = sync.OnceValues(func() (version, commit string) {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "", ""
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		version = v
	}
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" {
			commit = s.Value
		}
	}
	return version, commit
})

// BuildVersion returns the agentk version: [Version] if the linker set it,
// else the module version Go recorded, else "devel".
func BuildVersion() string {
	if Version != "" {
		return Version
	}
	if v, _ := buildInfo(); v != "" {
		return v
	}
	return "devel"
}

// BuildCommit returns the commit agentk was built from: [Commit] if the
// linker set it, else the VCS revision Go recorded, else "unknown".
func BuildCommit() string {
	if Commit != "" {
		return Commit
	}
	if _, c := buildInfo(); c != "" {
		return c
	}
	return "unknown"
}
