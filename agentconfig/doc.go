// Package agentconfig reads an agent's configuration file, the config.yaml
// of an agent's configuration project (kas-spec §3), the way GitLab's agent
// server reads it, and derives from it what the agent server sends on:
// the configuration streamed to the agent ([ToAgentConfiguration]) and the
// body of the agent_configuration call that lets GitLab refresh the agent's
// CI and user access ([RailsBody]).
//
// It is pure: it imports no Caddy package and does no I/O.
package agentconfig
