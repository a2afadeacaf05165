// Package fakegitaly is a test stand-in for the part of Gitaly that KAS
// calls to read agent configuration files (gitlab-wire §D):
// SmartHTTPService.InfoRefsUploadPack, CommitService.TreeEntry and
// CommitService.GetTreeEntries, served from our own protos.
//
// A Server is a gRPC server on 127.0.0.1 (Start) or on a unix socket
// (StartUnix), stopped when the test ends. Its repositories are real bare
// git repositories in a storage directory of t.TempDir(), which tests
// create with AddRepository and change with the git CLI (Repo.WriteFile,
// Repo.Commit, Repo.Git). Every answer comes from the repository through
// git plumbing, as Gitaly's do: the advertisement of
// `git upload-pack --advertise-refs --stateless-rpc` behind a
// "# service=git-upload-pack" line, `git ls-tree` for tree entries and
// listings, `git cat-file` for object sizes and blob contents. Streams are
// cut into small chunks (Options.ChunkSize, Options.BatchSize) so that
// clients must put them together.
//
// It answers the way Gitaly does and holds the caller to the contract KAS
// follows. Where Gitaly would merely answer an error, a call that breaks
// the contract also fails the test, with t.Errorf and a message that says
// what was wrong:
//
//   - Every call needs "authorization: Bearer v2.<hex HMAC-SHA256 of
//     ts keyed with the token>.<ts>", ts being the unix time in seconds,
//     within 30 seconds of the Server's clock (Gitaly's v2 token). A
//     missing token is answered Unauthenticated, a wrong or stale one
//     PermissionDenied, as Gitaly does, and both are violations.
//   - The repository must be one the Server has, named by storage_name and
//     relative_path, with the gl_repository and gl_project_path it was
//     added with and no object directories; another is answered NotFound
//     and is a violation.
//   - InfoRefsUploadPack must leave git_config_options and git_protocol
//     empty (KAS does, so as not to turn Gitaly's cache off).
//   - TreeEntry needs a revision, a path and max_size, and must not set
//     limit. A missing path is answered NotFound and a blob over max_size
//     FailedPrecondition; neither is a violation.
//   - GetTreeEntries needs a revision and a path, and must set neither
//     sort, pagination_params nor skip_flat_paths. A revision or path that
//     does not name a tree is answered InvalidArgument "invalid revision or
//     path", as the Gitaly KAS vendored does; that is not a violation.
//   - Any other service or method is answered Unimplemented and is a
//     violation.
//
// Calls lists the calls made, with their metadata, for tests to check the
// feature flags and user agent sent; SetFailure makes a method answer an
// error after those checks, to test how a client copes with a failing
// Gitaly. Failure messages never show the token.
package fakegitaly
