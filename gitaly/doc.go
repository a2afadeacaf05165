// Package gitaly is the agent server's client of Gitaly, GitLab's Git RPC
// service, for the few calls GitLab's KAS makes to read agent configuration
// files (gitlab-wire §D, kas-spec §3.1): the ref advertisement of
// SmartHTTPService.InfoRefsUploadPack for branch heads, CommitService.TreeEntry
// for one file of a commit and CommitService.GetTreeEntries for a directory.
//
// A [Pool] hands out a [Client] for the Gitaly server that agent_info or
// ListAgentConfigFiles names ([Info]: address, token, feature flags). Clients
// of the same address and token share one gRPC connection, which the Pool
// closes a short while after its last Client is released; calls are held to
// GitLab's client-side rate limits, globally and per server.
//
// On the wire every call carries, as KAS sends them:
//
//   - authorization: "Bearer v2.<hex HMAC-SHA256 of the unix time, keyed
//     with the token>.<the same unix time>", made afresh for each call;
//   - each entry of Info.Features as a metadata pair, e.g.
//     gitaly-feature-foo-bar: true;
//   - the user agent of [Options].
//
// Errors wrap the gRPC status and one of the sentinel errors ([ErrNotFound],
// [ErrUnavailable], [ErrUnauthenticated], [ErrFileTooLarge],
// [ErrEmptyRepository]) where one applies, so that callers can tell a
// missing file from an unreachable Gitaly with errors.Is.
//
// The package imports no Caddy package.
package gitaly
