// Package gitlab connects the agent server to GitLab: it is the client of
// GitLab's internal REST API for the agent server (kas-spec §2), the caches
// in front of it, the authenticators of GitLab mode for agents and for the
// Kubernetes API proxy, and the usage counters GitLab collects (kas-spec §7).
// It imports no Caddy package.
package gitlab
