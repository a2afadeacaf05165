package fakegitaly

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Repo is a repository of a Server: a bare git repository in the Server's
// storage and a work tree of its own, where tests write files and commit.
type Repo struct {
	// StorageName, RelativePath, GlRepository and GlProjectPath are the
	// gitaly_repository to give KAS for it.
	StorageName   string
	RelativePath  string
	GlRepository  string
	GlProjectPath string
	// GitDir is the bare repository.
	GitDir string

	t        testing.TB
	workTree string
}

// RepoOptions describe a repository to add.
type RepoOptions struct {
	// RelativePath is its path in the storage; empty means
	// "@hashed/<GlRepository>.git".
	RelativePath string
	// GlRepository is GitLab's identifier for it, e.g. "project-1";
	// required.
	GlRepository string
	// GlProjectPath is its project's full path, e.g. "group/project";
	// required.
	GlProjectPath string
	// DefaultBranch is the branch HEAD points to; empty means "main".
	DefaultBranch string
}

// AddRepository creates an empty bare repository in the Server's storage
// and returns it. Its HEAD points to the unborn default branch until the
// first Commit.
func (s *Server) AddRepository(opts RepoOptions) *Repo {
	s.t.Helper()
	if opts.GlRepository == "" || opts.GlProjectPath == "" {
		s.t.Fatal("fakegitaly: AddRepository needs GlRepository and GlProjectPath")
	}
	if opts.RelativePath == "" {
		opts.RelativePath = "@hashed/" + opts.GlRepository + ".git"
	}
	if opts.DefaultBranch == "" {
		opts.DefaultBranch = "main"
	}
	if filepath.IsAbs(opts.RelativePath) || strings.Contains("/"+opts.RelativePath+"/", "/../") {
		s.t.Fatalf("fakegitaly: relative path %q leaves the storage", opts.RelativePath)
	}
	r := &Repo{
		StorageName:   s.storage,
		RelativePath:  opts.RelativePath,
		GlRepository:  opts.GlRepository,
		GlProjectPath: opts.GlProjectPath,
		GitDir:        filepath.Join(s.storageDir, filepath.FromSlash(opts.RelativePath)),
		t:             s.t,
		workTree:      s.t.TempDir(),
	}
	s.mu.Lock()
	_, dup := s.repos[r.RelativePath]
	s.mu.Unlock()
	if dup {
		s.t.Fatalf("fakegitaly: repository %q added twice", r.RelativePath)
	}
	if err := os.MkdirAll(r.GitDir, 0o755); err != nil {
		s.t.Fatalf("fakegitaly: %v", err)
	}
	if _, err := runGit(context.Background(), r.GitDir, "", nil, "init", "--quiet", "--bare", "--initial-branch="+opts.DefaultBranch); err != nil {
		s.t.Fatalf("fakegitaly: %v", err)
	}
	s.mu.Lock()
	s.repos[r.RelativePath] = r
	s.mu.Unlock()
	return r
}

// WriteFile writes content to the file at path (slash-separated, from the
// repository root) of the work tree, making its directories.
func (r *Repo) WriteFile(path, content string) {
	r.t.Helper()
	full := filepath.Join(r.workTree, filepath.FromSlash(path))
	if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
		r.t.Fatalf("fakegitaly: %v", err)
	}
	if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
		r.t.Fatalf("fakegitaly: %v", err)
	}
}

// Remove removes the file or directory at path of the work tree.
func (r *Repo) Remove(path string) {
	r.t.Helper()
	if err := os.RemoveAll(filepath.Join(r.workTree, filepath.FromSlash(path))); err != nil {
		r.t.Fatalf("fakegitaly: %v", err)
	}
}

// Commit commits the whole work tree to the current branch with git add
// and git commit, and returns the new commit's id.
func (r *Repo) Commit(message string) string {
	r.t.Helper()
	r.Git("add", "--all")
	r.Git("commit", "--quiet", "--allow-empty", "--message", message)
	return r.Git("rev-parse", "HEAD")
}

// Git runs git with the repository and its work tree, failing the test if
// it fails, and returns its output with surrounding space trimmed.
func (r *Repo) Git(args ...string) string {
	r.t.Helper()
	out, err := runGit(context.Background(), r.GitDir, r.workTree, nil, args...)
	if err != nil {
		r.t.Fatalf("fakegitaly: %v", err)
	}
	return strings.TrimSpace(string(out))
}

// gitEnv is the environment of every git command: no configuration but
// the repository's, a fixed identity, literal pathspecs and the C locale.
func gitEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "GIT_") && !strings.HasPrefix(kv, "LC_") && !strings.HasPrefix(kv, "LANG") {
			env = append(env, kv)
		}
	}
	return append(env,
		"GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL="+os.DevNull,
		"GIT_AUTHOR_NAME=Fake Gitaly", "GIT_AUTHOR_EMAIL=fakegitaly@example.com",
		"GIT_COMMITTER_NAME=Fake Gitaly", "GIT_COMMITTER_EMAIL=fakegitaly@example.com",
		"GIT_LITERAL_PATHSPECS=1", "GIT_TERMINAL_PROMPT=0", "LC_ALL=C",
	)
}

// runGit runs git on gitDir (and workTree, if not empty) with stdin, and
// returns its standard output.
func runGit(ctx context.Context, gitDir, workTree string, stdin []byte, args ...string) ([]byte, error) {
	global := []string{"--git-dir=" + gitDir}
	if workTree != "" {
		global = append(global, "--work-tree="+workTree)
	}
	cmd := exec.CommandContext(ctx, "git", append(global, args...)...)
	cmd.Env = gitEnv()
	cmd.Dir = gitDir
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("git %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}
