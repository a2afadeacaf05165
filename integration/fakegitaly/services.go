package fakegitaly

import (
	"bytes"
	"context"
	"strconv"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	gitalypb "github.com/caddy-kas/caddy-kas/gitaly/pb"
)

// serviceHeader is what Gitaly puts before git-upload-pack's advertisement
// for smart HTTP: a pkt-line naming the service, then a flush.
const serviceHeader = "001e# service=git-upload-pack\n0000"

type smartHTTP struct {
	gitalypb.UnimplementedSmartHTTPServiceServer
	s *Server
}

func (h *smartHTTP) InfoRefsUploadPack(req *gitalypb.InfoRefsRequest, stream gitalypb.SmartHTTPService_InfoRefsUploadPackServer) error {
	const method = MethodInfoRefsUploadPack
	s := h.s
	repo, err := s.repository(method, req.GetRepository())
	if err != nil {
		return err
	}
	if len(req.GetGitConfigOptions()) > 0 {
		s.violation(method, "git_config_options set (%d); KAS leaves them empty so as not to bypass Gitaly's cache", len(req.GetGitConfigOptions()))
	}
	if req.GetGitProtocol() != "" {
		s.violation(method, "git_protocol %q set; KAS leaves it empty so as not to bypass Gitaly's cache", req.GetGitProtocol())
	}
	if err := s.failure(method); err != nil {
		return err
	}
	out, err := runGit(stream.Context(), repo.GitDir, "", nil, "upload-pack", "--advertise-refs", "--stateless-rpc", repo.GitDir)
	if err != nil {
		return status.Errorf(codes.Internal, "%v", err)
	}
	data := append([]byte(serviceHeader), out...)
	for len(data) > 0 {
		n := min(s.chunkSize, len(data))
		if err := stream.Send(&gitalypb.InfoRefsResponse{Data: data[:n]}); err != nil {
			return err
		}
		data = data[n:]
	}
	return nil
}

type commitService struct {
	gitalypb.UnimplementedCommitServiceServer
	s *Server
}

func (c *commitService) TreeEntry(req *gitalypb.TreeEntryRequest, stream gitalypb.CommitService_TreeEntryServer) error {
	const method = MethodTreeEntry
	s := c.s
	repo, err := s.repository(method, req.GetRepository())
	if err != nil {
		return err
	}
	if err := s.checkRevision(method, req.GetRevision()); err != nil {
		return err
	}
	path := string(req.GetPath())
	if path == "" {
		s.violation(method, "no path")
		return status.Error(codes.InvalidArgument, "empty Path")
	}
	if req.GetMaxSize() <= 0 {
		s.violation(method, "no max_size: KAS always bounds the file it reads")
	}
	if req.GetLimit() != 0 {
		s.violation(method, "limit %d set: KAS never cuts a file short", req.GetLimit())
	}
	if err := s.failure(method); err != nil {
		return err
	}
	ctx := stream.Context()
	commit, ok, err := resolveCommit(ctx, repo, string(req.GetRevision()))
	switch {
	case err != nil:
		return err
	case !ok:
		return status.Error(codes.NotFound, "revision not found")
	}
	entries, err := lsTree(ctx, repo, "--full-tree", commit, "--", path)
	if err != nil {
		return err
	}
	var entry *gitalypb.TreeEntry
	for _, e := range entries {
		if string(e.Path) == path {
			entry = e
		}
	}
	if entry == nil {
		return status.Error(codes.NotFound, "tree entry not found")
	}

	resp := &gitalypb.TreeEntryResponse{Oid: entry.Oid, Mode: entry.Mode}
	switch entry.Type {
	case gitalypb.TreeEntry_COMMIT:
		// A submodule: its commit is not in this repository.
		resp.Type = gitalypb.TreeEntryResponse_COMMIT
		return stream.Send(resp)
	case gitalypb.TreeEntry_TREE:
		resp.Type = gitalypb.TreeEntryResponse_TREE
		if resp.Size, err = objectSize(ctx, repo, entry.Oid); err != nil {
			return err
		}
		return stream.Send(resp)
	}
	resp.Type = gitalypb.TreeEntryResponse_BLOB
	if resp.Size, err = objectSize(ctx, repo, entry.Oid); err != nil {
		return err
	}
	if maxSize := req.GetMaxSize(); maxSize > 0 && resp.Size > maxSize {
		return status.Errorf(codes.FailedPrecondition, "object size (%d) is bigger than the maximum allowed size (%d)", resp.Size, maxSize)
	}
	data, err := runGit(ctx, repo.GitDir, "", nil, "cat-file", "blob", entry.Oid)
	if err != nil {
		return status.Errorf(codes.Internal, "%v", err)
	}
	if limit := req.GetLimit(); limit > 0 && int64(len(data)) > limit {
		data = data[:limit]
	}
	// The first message carries the entry and the first chunk, the
	// following ones the rest of the content.
	for first := true; first || len(data) > 0; first = false {
		n := min(s.chunkSize, len(data))
		resp.Data = data[:n]
		if err := stream.Send(resp); err != nil {
			return err
		}
		data = data[n:]
		resp = &gitalypb.TreeEntryResponse{}
	}
	return nil
}

func (c *commitService) GetTreeEntries(req *gitalypb.GetTreeEntriesRequest, stream gitalypb.CommitService_GetTreeEntriesServer) error {
	const method = MethodGetTreeEntries
	s := c.s
	repo, err := s.repository(method, req.GetRepository())
	if err != nil {
		return err
	}
	if err := s.checkRevision(method, req.GetRevision()); err != nil {
		return err
	}
	path := string(req.GetPath())
	if path == "" {
		s.violation(method, "no path")
		return status.Error(codes.InvalidArgument, "empty Path")
	}
	if req.GetSort() != gitalypb.GetTreeEntriesRequest_DEFAULT {
		s.violation(method, "sort %v set; KAS does not sort", req.GetSort())
	}
	if req.GetPaginationParams() != nil {
		s.violation(method, "pagination_params set; KAS does not page")
		return status.Error(codes.Unimplemented, "fakegitaly does not page")
	}
	if req.GetSkipFlatPaths() {
		s.violation(method, "skip_flat_paths set; KAS does not set it")
	}
	if err := s.failure(method); err != nil {
		return err
	}
	ctx := stream.Context()
	invalid := status.Error(codes.InvalidArgument, "invalid revision or path")
	commit, ok, err := resolveCommit(ctx, repo, string(req.GetRevision()))
	switch {
	case err != nil:
		return err
	case !ok:
		return invalid
	}
	treeSpec, prefix := commit+"^{tree}", ""
	if path != "." {
		treeSpec, prefix = commit+":"+path, strings.TrimSuffix(path, "/")+"/"
	}
	out, err := runGit(ctx, repo.GitDir, "", []byte(treeSpec+"\n"), "cat-file", "--batch-check")
	if err != nil {
		return status.Errorf(codes.Internal, "%v", err)
	}
	fields := strings.Fields(string(out))
	if len(fields) != 3 || fields[1] != "tree" {
		return invalid // missing, or not a tree
	}
	args := []string{fields[0]}
	if req.GetRecursive() {
		args = []string{"-r", "-t", fields[0]}
	}
	entries, err := lsTree(ctx, repo, args...)
	if err != nil {
		return err
	}
	for _, e := range entries {
		e.Path = append([]byte(prefix), e.Path...)
		// Gitaly collapses chains of single-child directories into the
		// flat path; no caller here reads it, so it is the path.
		e.FlatPath = e.Path
		e.CommitOid = commit
	}
	for len(entries) > 0 {
		n := min(s.batchSize, len(entries))
		if err := stream.Send(&gitalypb.GetTreeEntriesResponse{Entries: entries[:n]}); err != nil {
			return err
		}
		entries = entries[n:]
	}
	return nil
}

// repository finds the repository a call names and checks that it is
// named as KAS names it.
func (s *Server) repository(method string, r *gitalypb.Repository) (*Repo, error) {
	switch {
	case r == nil:
		s.violation(method, "no repository")
		return nil, status.Error(codes.InvalidArgument, "empty Repository")
	case r.GetStorageName() == "" || r.GetRelativePath() == "":
		s.violation(method, "repository without storage_name or relative_path")
		return nil, status.Error(codes.InvalidArgument, "empty StorageName or RelativePath")
	case r.GetStorageName() != s.storage:
		s.violation(method, "storage %q, the Server has %q", r.GetStorageName(), s.storage)
		return nil, status.Errorf(codes.InvalidArgument, "storage not found: %q", r.GetStorageName())
	}
	s.mu.Lock()
	repo := s.repos[r.GetRelativePath()]
	s.mu.Unlock()
	if repo == nil {
		s.violation(method, "no repository at relative path %q", r.GetRelativePath())
		return nil, status.Error(codes.NotFound, "repository not found")
	}
	if r.GetGlRepository() != repo.GlRepository || r.GetGlProjectPath() != repo.GlProjectPath {
		s.violation(method, "repository %q named as %q of %q, want %q of %q", repo.RelativePath,
			r.GetGlRepository(), r.GetGlProjectPath(), repo.GlRepository, repo.GlProjectPath)
	}
	if r.GetGitObjectDirectory() != "" || len(r.GetGitAlternateObjectDirectories()) > 0 {
		s.violation(method, "object directories set; Rails gives none outside a quarantine")
	}
	return repo, nil
}

// checkRevision refuses what Gitaly refuses as a revision.
func (s *Server) checkRevision(method string, rev []byte) error {
	switch {
	case len(rev) == 0:
		s.violation(method, "no revision")
		return status.Error(codes.InvalidArgument, "empty revision")
	case rev[0] == '-':
		s.violation(method, "revision %q starts with '-'", rev)
		return status.Error(codes.InvalidArgument, "revision can't start with '-'")
	case bytes.ContainsAny(rev, " \t\n\x00") || bytes.Contains(rev, []byte(":")):
		s.violation(method, "revision %q contains whitespace, NUL or ':'", rev)
		return status.Error(codes.InvalidArgument, "revision can't contain whitespace, NUL or ':'")
	}
	return nil
}

// resolveCommit resolves rev to a commit id; ok is false if it names none.
func resolveCommit(ctx context.Context, repo *Repo, rev string) (commit string, ok bool, err error) {
	out, err := runGit(ctx, repo.GitDir, "", []byte(rev+"^{commit}\n"), "cat-file", "--batch-check")
	if err != nil {
		return "", false, status.Errorf(codes.Internal, "%v", err)
	}
	fields := strings.Fields(string(out))
	if len(fields) != 3 || fields[1] != "commit" {
		return "", false, nil
	}
	return fields[0], true, nil
}

// objectSize is the size of an object, from git cat-file -s.
func objectSize(ctx context.Context, repo *Repo, oid string) (int64, error) {
	out, err := runGit(ctx, repo.GitDir, "", nil, "cat-file", "-s", oid)
	if err != nil {
		return 0, status.Errorf(codes.Internal, "%v", err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
	if err != nil {
		return 0, status.Errorf(codes.Internal, "git cat-file -s %s: %v", oid, err)
	}
	return n, nil
}

// lsTree runs git ls-tree -z with args and parses its entries; a pathspec
// that matches nothing gives none.
func lsTree(ctx context.Context, repo *Repo, args ...string) ([]*gitalypb.TreeEntry, error) {
	out, err := runGit(ctx, repo.GitDir, "", nil, append([]string{"ls-tree", "-z"}, args...)...)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "%v", err)
	}
	var entries []*gitalypb.TreeEntry
	for _, rec := range bytes.Split(out, []byte{0}) {
		if len(rec) == 0 {
			continue
		}
		// <mode> SP <type> SP <oid> TAB <path>
		meta, path, ok := bytes.Cut(rec, []byte{'\t'})
		f := strings.Fields(string(meta))
		if !ok || len(f) != 3 {
			return nil, status.Errorf(codes.Internal, "git ls-tree: unexpected line %q", rec)
		}
		mode, err := strconv.ParseInt(f[0], 8, 32)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "git ls-tree: mode %q: %v", f[0], err)
		}
		e := &gitalypb.TreeEntry{Oid: f[2], Path: append([]byte(nil), path...), Mode: int32(mode)}
		switch f[1] {
		case "blob":
			e.Type = gitalypb.TreeEntry_BLOB
		case "tree":
			e.Type = gitalypb.TreeEntry_TREE
		case "commit":
			e.Type = gitalypb.TreeEntry_COMMIT
		default:
			return nil, status.Errorf(codes.Internal, "git ls-tree: type %q", f[1])
		}
		entries = append(entries, e)
	}
	return entries, nil
}
