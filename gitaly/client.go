package gitaly

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	gitalypb "github.com/caddy-kas/caddy-kas/gitaly/pb"
)

// MaxConfigFileSize is the largest agent configuration file GitLab's KAS
// reads (agent.configuration.max_configuration_file_size, kas-spec §3.1).
const MaxConfigFileSize = 128 * 1024

// maxTreeEntries bounds a listing, against a directory that is not what
// the caller expected it to be.
const maxTreeEntries = 100_000

// Repository locates a repository on its Gitaly server: gitaly_repository
// of agent_info, or the repository of ListAgentConfigFiles.
type Repository struct {
	StorageName                   string
	RelativePath                  string
	GitObjectDirectory            string
	GitAlternateObjectDirectories []string
	GlRepository                  string
	GlProjectPath                 string
}

func (r Repository) proto() (*gitalypb.Repository, error) {
	if r.StorageName == "" || r.RelativePath == "" {
		return nil, errors.New("repository without storage name or relative path")
	}
	return &gitalypb.Repository{
		StorageName:                   r.StorageName,
		RelativePath:                  r.RelativePath,
		GitObjectDirectory:            r.GitObjectDirectory,
		GitAlternateObjectDirectories: r.GitAlternateObjectDirectories,
		GlRepository:                  r.GlRepository,
		GlProjectPath:                 r.GlProjectPath,
	}, nil
}

// Client calls one Gitaly server with the token and feature flags of the
// [Info] it was made for. It is safe for concurrent use until Release.
type Client struct {
	pool     *Pool
	conn     *sharedConn
	features []string // metadata pairs

	released atomic.Bool
	once     sync.Once
}

// Release tells the Pool that c is no longer used; c must not be used
// afterwards (its calls fail with [ErrClosed]). It may be called more than
// once.
func (c *Client) Release() {
	c.once.Do(func() {
		c.released.Store(true)
		c.pool.release(c.conn)
	})
}

// callContext is ctx with the feature flags added to the outgoing
// metadata, or ErrClosed.
func (c *Client) callContext(ctx context.Context) (context.Context, error) {
	if c.released.Load() {
		return nil, ErrClosed
	}
	c.pool.mu.Lock()
	closed := c.pool.closed
	c.pool.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	if len(c.features) > 0 {
		ctx = metadata.AppendToOutgoingContext(ctx, c.features...)
	}
	return ctx, nil
}

// InfoRefs reads the ref advertisement of repo (InfoRefsUploadPack) and
// keeps the refs for which keep returns true; see [ParseAdvertisement].
func (c *Client) InfoRefs(ctx context.Context, repo Repository, keep func(ref string) bool) (*Advertisement, error) {
	const op = "gitaly InfoRefsUploadPack"
	pbRepo, err := repo.proto()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the stream if the advertisement is not read to its end
	ctx, err = c.callContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	stream, err := c.conn.smart.InfoRefsUploadPack(ctx, &gitalypb.InfoRefsRequest{Repository: pbRepo})
	if err != nil {
		return nil, callError(op, err, nil)
	}
	sr := &streamReader[gitalypb.InfoRefsResponse]{stream: stream, data: (*gitalypb.InfoRefsResponse).GetData}
	adv, err := ParseAdvertisement(sr, keep)
	if err != nil {
		if sr.err != nil {
			return nil, callError(op, sr.err, nil)
		}
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	return adv, nil
}

// DefaultBranchHead returns the commit at the tip of repo's default branch:
// HEAD's, or, if HEAD's branch is unborn, that of main or else master (see
// [Advertisement.DefaultBranch]). A repository without refs gives
// [ErrEmptyRepository].
func (c *Client) DefaultBranchHead(ctx context.Context, repo Repository) (commit string, err error) {
	adv, err := c.InfoRefs(ctx, repo, keepDefaultBranch)
	if err != nil {
		return "", err
	}
	_, commit, err = adv.DefaultBranch()
	if err != nil {
		return "", fmt.Errorf("gitaly InfoRefsUploadPack: default branch: %w", err)
	}
	return commit, nil
}

// BranchHead returns the commit at the tip of refs/heads/<branch>, or of
// the default branch if branch is "" (as [Client.DefaultBranchHead]). A
// missing branch gives [ErrNotFound], a repository without refs
// [ErrEmptyRepository].
func (c *Client) BranchHead(ctx context.Context, repo Repository, branch string) (commit string, err error) {
	if branch == "" {
		return c.DefaultBranchHead(ctx, repo)
	}
	ref := "refs/heads/" + branch
	adv, err := c.InfoRefs(ctx, repo, func(name string) bool { return name == ref })
	if err != nil {
		return "", err
	}
	if oid, ok := adv.Refs[ref]; ok {
		return oid, nil
	}
	if adv.Count == 0 {
		return "", fmt.Errorf("gitaly InfoRefsUploadPack: branch %q: %w", branch, ErrEmptyRepository)
	}
	return "", fmt.Errorf("gitaly InfoRefsUploadPack: branch %q: %w", branch, ErrNotFound)
}

// ReadFile returns the content of the file at path (from the repository
// root) in commit, which may be any revision, through TreeEntry. A file
// larger than limit bytes (which must be positive; GitLab's is
// [MaxConfigFileSize]) gives [ErrFileTooLarge]; a path that does not exist
// or is not a file, [ErrNotFound].
func (c *Client) ReadFile(ctx context.Context, repo Repository, commit, path string, limit int64) ([]byte, error) {
	op := fmt.Sprintf("gitaly TreeEntry %s at %s", path, commit)
	pbRepo, err := repo.proto()
	switch {
	case err != nil:
		return nil, fmt.Errorf("%s: %w", op, err)
	case commit == "" || path == "":
		return nil, fmt.Errorf("%s: no revision or no path", op)
	case limit <= 0:
		return nil, fmt.Errorf("%s: size limit %d is not positive", op, limit)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ctx, err = c.callContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	stream, err := c.conn.commit.TreeEntry(ctx, &gitalypb.TreeEntryRequest{
		Repository: pbRepo,
		Revision:   []byte(commit),
		Path:       []byte(path),
		MaxSize:    limit,
	})
	if err != nil {
		return nil, treeEntryError(op, err)
	}
	first, err := stream.Recv()
	switch {
	case errors.Is(err, io.EOF):
		// Older Gitaly answers a missing path with an empty stream.
		return nil, fmt.Errorf("%s: %w", op, ErrNotFound)
	case err != nil:
		return nil, treeEntryError(op, err)
	case first.GetOid() == "":
		// ... or with one empty message.
		return nil, fmt.Errorf("%s: %w", op, ErrNotFound)
	case first.GetType() != gitalypb.TreeEntryResponse_BLOB:
		return nil, fmt.Errorf("%s: %w: it is a %s, not a file", op, ErrNotFound, first.GetType())
	case first.GetSize() > limit:
		return nil, fmt.Errorf("%s: %w: %d bytes, over the limit of %d", op, ErrFileTooLarge, first.GetSize(), limit)
	case first.GetSize() < 0:
		return nil, fmt.Errorf("%s: negative size %d", op, first.GetSize())
	}
	size := first.GetSize()
	data := make([]byte, 0, size)
	for msg := first; ; {
		if int64(len(data))+int64(len(msg.GetData())) > size {
			return nil, fmt.Errorf("%s: more content than the size of %d bytes Gitaly gave", op, size)
		}
		data = append(data, msg.GetData()...)
		msg, err = stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, treeEntryError(op, err)
		}
	}
	if int64(len(data)) != size {
		return nil, fmt.Errorf("%s: got %d bytes of a file of %d", op, len(data), size)
	}
	return data, nil
}

func treeEntryError(op string, err error) error {
	return callError(op, err, map[codes.Code]error{codes.FailedPrecondition: ErrFileTooLarge})
}

// EntryType is the type of a [TreeEntry].
type EntryType int

// The types of tree entries.
const (
	EntryBlob EntryType = iota
	EntryTree
	// EntrySubmodule is a commit of a submodule.
	EntrySubmodule
)

func (t EntryType) String() string {
	switch t {
	case EntryBlob:
		return "blob"
	case EntryTree:
		return "tree"
	case EntrySubmodule:
		return "submodule"
	}
	return fmt.Sprintf("EntryType(%d)", int(t))
}

// TreeEntry is one entry of a listing.
type TreeEntry struct {
	// Path is the entry's path from the repository root.
	Path string
	Type EntryType
	// OID is the object id of the blob, tree or submodule commit.
	OID string
	// Mode is the git file mode, e.g. 0o100644.
	Mode int32
}

// ListDir lists, through GetTreeEntries, the directory at path (from the
// repository root) of revision (a commit, "HEAD" or "refs/heads/<name>")
// recursively: every file and directory below it, with paths from the
// repository root, in Gitaly's order. A revision or path that does not
// exist gives [ErrNotFound].
func (c *Client) ListDir(ctx context.Context, repo Repository, revision, path string) ([]TreeEntry, error) {
	op := fmt.Sprintf("gitaly GetTreeEntries %s at %s", path, revision)
	pbRepo, err := repo.proto()
	switch {
	case err != nil:
		return nil, fmt.Errorf("%s: %w", op, err)
	case revision == "" || path == "":
		return nil, fmt.Errorf("%s: no revision or no path", op)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ctx, err = c.callContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	stream, err := c.conn.commit.GetTreeEntries(ctx, &gitalypb.GetTreeEntriesRequest{
		Repository: pbRepo,
		Revision:   []byte(revision),
		Path:       []byte(path),
		Recursive:  true,
	})
	if err != nil {
		return nil, listError(op, err)
	}
	var entries []TreeEntry
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return entries, nil
		}
		if err != nil {
			return nil, listError(op, err)
		}
		if len(entries)+len(msg.GetEntries()) > maxTreeEntries {
			return nil, fmt.Errorf("%s: more than %d entries", op, maxTreeEntries)
		}
		for _, e := range msg.GetEntries() {
			var t EntryType
			switch e.GetType() {
			case gitalypb.TreeEntry_BLOB:
				t = EntryBlob
			case gitalypb.TreeEntry_TREE:
				t = EntryTree
			case gitalypb.TreeEntry_COMMIT:
				t = EntrySubmodule
			default:
				return nil, fmt.Errorf("%s: entry %q of unknown type %d", op, e.GetPath(), e.GetType())
			}
			entries = append(entries, TreeEntry{Path: string(e.GetPath()), Type: t, OID: e.GetOid(), Mode: e.GetMode()})
		}
	}
}

func listError(op string, err error) error {
	return callError(op, err, map[codes.Code]error{codes.InvalidArgument: ErrNotFound})
}

// streamReader reads the data of a stream of messages as one byte stream.
type streamReader[T any] struct {
	stream grpc.ServerStreamingClient[T]
	data   func(*T) []byte
	buf    []byte
	err    error // the stream's error other than io.EOF
}

func (r *streamReader[T]) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		msg, err := r.stream.Recv()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				r.err = err
			}
			return 0, err
		}
		r.buf = r.data(msg)
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}
