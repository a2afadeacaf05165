package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	gobuildinfo "debug/buildinfo"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/crypto/x509roots/fallback/bundle"

	"github.com/caddy-kas/caddy-kas/internal/buildinfo"
)

const (
	// defaultName is the image name recorded in the layout.
	defaultName = "caddy-kas/agentk"
	// defaultSource is the repository the image is built from, for the
	// org.opencontainers.image.source label.
	defaultSource = "https://github.com/caddy-kas/caddy-kas"

	// modulePath is this project's Go module; the agentk binary must be
	// its main package.
	modulePath = "github.com/caddy-kas/caddy-kas"
	// agentkPackage is the package built into the image, relative to the
	// module root.
	agentkPackage = "./cmd/agentk"
	// versionVar is the variable the linker sets for -version; see
	// internal/buildinfo.
	versionVar = modulePath + "/internal/buildinfo.version"

	// binaryPath is where agentk lives in the image, without the leading
	// slash of tar entry names.
	binaryPath = "usr/bin/agentk"
	// caBundlePath is the first file Go's crypto/x509 reads the system
	// roots from on Linux (and where Debian, Ubuntu and Alpine keep them).
	caBundlePath = "etc/ssl/certs/ca-certificates.crt"
	// nonRootUser is the user and group agentk runs as: 65532, the
	// "nonroot" user of the distroless images, a value that Kubernetes'
	// runAsNonRoot accepts because it is numeric and not 0.
	nonRootUser = "65532:65532"
)

// platforms are the platforms of the image index, in index order.
var platforms = []v1.Platform{
	{OS: "linux", Architecture: "amd64"},
	{OS: "linux", Architecture: "arm64"},
}

// options configure a build; see parseFlags for their meaning.
type options struct {
	layoutDir string
	archive   string
	name      string
	source    string
	version   string
	licenses  string
}

// result describes a finished build.
type result struct {
	digest    v1.Hash   // of the image index
	reference string    // name:tag recorded in the layout
	version   string    // the org.opencontainers.image.version label
	revision  string    // the full commit the binaries were built from
	created   time.Time // the timestamp of every part of the image
	// uncommitted says that the work tree had changes, which are not in
	// the image.
	uncommitted bool
}

// build compiles agentk for every platform and writes the image.
func build(ctx context.Context, o options) (result, error) {
	if strings.ContainsAny(o.version, " \t\n'\"") {
		return result{}, fmt.Errorf("version %q holds a space or quote, which the linker flags cannot carry", o.version)
	}
	tmp, err := os.MkdirTemp("", "agentk-image-")
	if err != nil {
		return result{}, fmt.Errorf("creating a directory for the build: %w", err)
	}
	defer os.RemoveAll(tmp)
	src, err := checkoutHead(ctx, filepath.Join(tmp, "src"))
	if err != nil {
		return result{}, err
	}

	binaries := make([]string, len(platforms))
	var st stamp
	for i, p := range platforms {
		binaries[i] = filepath.Join(tmp, "agentk-"+p.OS+"-"+p.Architecture)
		if err := goBuild(ctx, src.dir, p, o.version, binaries[i]); err != nil {
			return result{}, err
		}
		s, err := readStamp(binaries[i])
		if err != nil {
			return result{}, err
		}
		if i > 0 && s != st {
			return result{}, fmt.Errorf("the %s binary records %+v, the %s binary %+v: they must agree", p, s, platforms[0], st)
		}
		st = s
	}
	if st.revision != src.revision || st.modified {
		return result{}, fmt.Errorf("the binaries record commit %s (modified: %t), not the clean checkout of %s", st.revision, st.modified, src.revision)
	}

	created, err := creationTime(os.Getenv("SOURCE_DATE_EPOCH"), st.commitTime)
	if err != nil {
		return result{}, err
	}
	res := result{
		version:     st.version,
		revision:    st.revision,
		uncommitted: src.uncommitted,
		created:     created,
	}
	if o.version != "" {
		res.version = o.version
	}
	res.reference = o.name + ":" + tagOf(res.version)
	labels := map[string]string{
		"org.opencontainers.image.title":       "agentk",
		"org.opencontainers.image.description": "The caddy-kas agent: dials out to the agent server (KAS) and forwards its requests to the cluster's kube-apiserver.",
		"org.opencontainers.image.version":     res.version,
		"org.opencontainers.image.revision":    res.revision,
		"org.opencontainers.image.source":      o.source,
		"org.opencontainers.image.created":     created.Format(time.RFC3339),
	}
	if o.licenses != "" {
		labels["org.opencontainers.image.licenses"] = o.licenses
	}

	caLayer, caHistory, err := caBundleLayer(created)
	if err != nil {
		return result{}, err
	}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for i, p := range platforms {
		img, err := platformImage(p, binaries[i], st.goVersion, o.version, created, labels, caLayer, caHistory)
		if err != nil {
			return result{}, err
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{
			Add:        plainImage{img},
			Descriptor: v1.Descriptor{Platform: &p},
		})
	}
	idx, ok := mutate.Annotations(idx, labels).(v1.ImageIndex)
	if !ok {
		return result{}, errors.New("annotating the image index returned no index")
	}
	if res.digest, err = idx.Digest(); err != nil {
		return result{}, fmt.Errorf("computing the index digest: %w", err)
	}

	if err := writeLayout(o.layoutDir, idx, res.reference); err != nil {
		return result{}, err
	}
	if o.archive != "" {
		if err := writeArchive(o.archive, o.layoutDir, created); err != nil {
			return result{}, err
		}
	}
	return res, nil
}

// source is the checkout agentk is built from.
type source struct {
	dir         string // the module root in the checkout
	revision    string // the full commit hash of HEAD
	uncommitted bool   // the work tree the checkout was made from had changes
}

// checkoutHead checks the commit of the working directory's HEAD out into
// dir, a fresh clone that shares the objects of the working directory's
// repository. Building there rather than in the work tree makes the image
// depend on the commit alone, never on uncommitted or untracked files,
// and lets Go stamp the binary with the commit in every kind of checkout:
// Go's VCS stamping looks for a .git directory, so it records nothing in
// a linked work tree (git worktree), whose .git is a file.
func checkoutHead(ctx context.Context, dir string) (source, error) {
	root, err := moduleRoot(ctx)
	if err != nil {
		return source{}, err
	}
	top, err := git(ctx, root, "rev-parse", "--show-toplevel")
	if err != nil {
		return source{}, err
	}
	if !sameDir(top, root) {
		return source{}, fmt.Errorf("the module root %s is not the top of its git repository %s", root, top)
	}
	var src source
	if src.revision, err = git(ctx, root, "rev-parse", "HEAD"); err != nil {
		return source{}, err
	}
	status, err := git(ctx, root, "status", "--porcelain")
	if err != nil {
		return source{}, err
	}
	src.uncommitted = status != ""
	common, err := git(ctx, root, "rev-parse", "--path-format=absolute", "--git-common-dir")
	if err != nil {
		return source{}, err
	}
	if _, err := git(ctx, root, "clone", "--quiet", "--shared", "--no-checkout", common, dir); err != nil {
		return source{}, err
	}
	if _, err := git(ctx, dir, "checkout", "--quiet", "--detach", src.revision); err != nil {
		return source{}, err
	}
	src.dir = dir
	return src, nil
}

// git runs git with args in dir and returns its trimmed output.
func git(ctx context.Context, dir string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "git", args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("git %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return strings.TrimSpace(string(out)), nil
}

// sameDir reports whether a and b name the same directory.
func sameDir(a, b string) bool {
	ai, errA := os.Stat(a)
	bi, errB := os.Stat(b)
	return errA == nil && errB == nil && os.SameFile(ai, bi)
}

// plainImage is an image whose descriptor in an index has no
// artifactType. go-containerregistry fills that field with the config
// media type of every image, but OCI meant it for artifacts, and tools
// that do not know it (skopeo 1.9, in Debian 12) drop it when they copy
// the index, which changes its digest.
type plainImage struct{ v1.Image }

// ArtifactType overrides what go-containerregistry would derive.
func (plainImage) ArtifactType() (string, error) { return "", nil }

// moduleRoot returns the directory of the caddy-kas go.mod that the
// working directory belongs to.
func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "list", "-m", "-f", "{{.Path}} {{.Dir}}").Output()
	if err != nil {
		return "", fmt.Errorf("finding the module root with go list -m: %w", err)
	}
	path, dir, ok := strings.Cut(strings.TrimSpace(string(out)), " ")
	if !ok || path != modulePath || dir == "" {
		return "", fmt.Errorf("run inside the %s module; go list -m says %q", modulePath, out)
	}
	return dir, nil
}

// goBuild cross-compiles agentk for p into out. The environment pins what
// changes the output besides the source and the toolchain: no cgo (a
// static binary that needs no libc in the image) and the baseline
// instruction sets; GOFLAGS is cleared so that a developer's defaults do
// not leak in. VCS stamping is required, so that the binary and the image
// say which commit they are. root is the module root of a checkout.
func goBuild(ctx context.Context, root string, p v1.Platform, version, out string) error {
	ldflags := "-s -w"
	if version != "" {
		ldflags += " -X " + versionVar + "=" + version
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-buildvcs=true", "-ldflags="+ldflags, "-o", out, agentkPackage)
	cmd.Dir = root
	cmd.Env = append(os.Environ(),
		"CGO_ENABLED=0",
		"GOOS="+p.OS,
		"GOARCH="+p.Architecture,
		"GOAMD64=v1",
		"GOARM64=v8.0",
		"GOFLAGS=",
	)
	if msg, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("building agentk for %s: %w\n%s", p, err, msg)
	}
	return nil
}

// stamp is what a built binary records about its source.
type stamp struct {
	version    string // as the binary reports it, see internal/buildinfo
	revision   string // the full commit hash
	modified   bool   // the work tree had uncommitted changes
	commitTime string // RFC 3339
	goVersion  string
}

// readStamp reads the build information Go recorded in the binary at
// path.
func readStamp(path string) (stamp, error) {
	bi, err := gobuildinfo.ReadFile(path)
	if err != nil {
		return stamp{}, fmt.Errorf("reading the build information of %s: %w", path, err)
	}
	st := stamp{goVersion: bi.GoVersion}
	st.version, _ = buildinfo.Of(bi)
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			st.revision = s.Value
		case "vcs.time":
			st.commitTime = s.Value
		case "vcs.modified":
			st.modified = s.Value == "true"
		}
	}
	if st.revision == "" {
		return stamp{}, fmt.Errorf("%s records no commit: build from a git checkout", path)
	}
	return st, nil
}

// creationTime returns the timestamp of the image: SOURCE_DATE_EPOCH when
// set (https://reproducible-builds.org/specs/source-date-epoch/), else
// the commit time.
func creationTime(sourceDateEpoch, commitTime string) (time.Time, error) {
	if sourceDateEpoch != "" {
		sec, err := strconv.ParseInt(sourceDateEpoch, 10, 64)
		if err != nil || sec < 0 {
			return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH %q is not a non-negative number of seconds", sourceDateEpoch)
		}
		return time.Unix(sec, 0).UTC(), nil
	}
	t, err := time.Parse(time.RFC3339, commitTime)
	if err != nil {
		return time.Time{}, fmt.Errorf("parsing the commit time %q: %w", commitTime, err)
	}
	return t.UTC().Truncate(time.Second), nil
}

// tagOf turns a version into an image tag, which allows only
// [A-Za-z0-9_.-] and at most 128 characters: Go's "+dirty" suffix becomes
// "-dirty".
func tagOf(version string) string {
	b := []byte(version)
	for i, c := range b {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '.' || c == '-') {
			b[i] = '-'
		}
	}
	if len(b) > 128 {
		b = b[:128]
	}
	if len(b) == 0 || b[0] == '.' || b[0] == '-' {
		b = append([]byte("v"), b...)
	}
	return string(b)
}

// tarEntry is a file or, when its name ends in "/", a directory of a
// layer.
type tarEntry struct {
	name string
	mode int64
	body []byte
}

// layerOf makes a gzip-compressed OCI layer of entries, owned by root and
// dated created, so that it is the same bytes on every build.
func layerOf(created time.Time, entries []tarEntry) (v1.Layer, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{
			Name:    e.name,
			Mode:    e.mode,
			ModTime: created,
			Format:  tar.FormatPAX,
		}
		if strings.HasSuffix(e.name, "/") {
			h.Typeflag = tar.TypeDir
		} else {
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("writing %s into a layer: %w", e.name, err)
		}
		if _, err := tw.Write(e.body); err != nil {
			return nil, fmt.Errorf("writing %s into a layer: %w", e.name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("closing a layer: %w", err)
	}
	raw := buf.Bytes()
	layer, err := tarball.LayerFromOpener(
		func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(raw)), nil },
		tarball.WithMediaType(types.OCILayer),
		// Level 9 saves half a percent over the default for three times the time.
		tarball.WithCompressionLevel(gzip.DefaultCompression),
		// Compress once, not on every read of the layer.
		tarball.WithCompressedCaching,
	)
	if err != nil {
		return nil, fmt.Errorf("making a layer: %w", err)
	}
	return layer, nil
}

// parentDirs returns the directory entries leading to path, outermost
// first.
func parentDirs(path string) []tarEntry {
	var dirs []tarEntry
	for i, c := range path {
		if c == '/' {
			dirs = append(dirs, tarEntry{name: path[:i+1], mode: 0o755})
		}
	}
	return dirs
}

// caBundleLayer makes the layer with the CA bundle, shared by every
// platform. The roots are the Mozilla ones that Go's
// golang.org/x/crypto/x509roots/fallback carries, at the version go.sum
// pins. Roots that Mozilla constrains (trusted only for certificates
// issued before a date) are left out: a PEM file cannot carry the
// constraint, and trusting them unconstrained would trust more than
// Mozilla does.
func caBundleLayer(created time.Time) (v1.Layer, v1.History, error) {
	var pemBundle bytes.Buffer
	for root := range bundle.Roots() {
		if root.Constraint != nil {
			continue
		}
		if err := pem.Encode(&pemBundle, &pem.Block{Type: "CERTIFICATE", Bytes: root.Certificate}); err != nil {
			return nil, v1.History{}, fmt.Errorf("encoding a CA certificate: %w", err)
		}
	}
	entries := append(parentDirs(caBundlePath), tarEntry{name: caBundlePath, mode: 0o444, body: pemBundle.Bytes()})
	layer, err := layerOf(created, entries)
	if err != nil {
		return nil, v1.History{}, err
	}
	return layer, v1.History{
		Created:   v1.Time{Time: created},
		CreatedBy: "agentk-image: /" + caBundlePath + " from the Mozilla roots of golang.org/x/crypto/x509roots/fallback " + moduleVersion("golang.org/x/crypto/x509roots/fallback"),
	}, nil
}

// moduleVersion returns the version of the dependency path of this
// program, as go.mod pins it.
func moduleVersion(path string) string {
	bi, ok := debug.ReadBuildInfo()
	if ok {
		for _, m := range bi.Deps {
			if m.Path == path {
				return m.Version
			}
		}
	}
	return "(unknown version)"
}

// platformImage makes the image of platform p: the CA bundle layer, then
// a layer with the agentk binary at path binary, run as nonRootUser.
func platformImage(p v1.Platform, binary, goVersion, version string, created time.Time, labels map[string]string, caLayer v1.Layer, caHistory v1.History) (v1.Image, error) {
	body, err := os.ReadFile(binary)
	if err != nil {
		return nil, fmt.Errorf("reading the %s binary: %w", p, err)
	}
	// Owned by root and not writable: the non-root user cannot replace it.
	entries := append(parentDirs(binaryPath), tarEntry{name: binaryPath, mode: 0o555, body: body})
	binLayer, err := layerOf(created, entries)
	if err != nil {
		return nil, err
	}
	buildCmd := "go build -trimpath -ldflags='-s -w'"
	if version != "" {
		buildCmd = "go build -trimpath -ldflags='-s -w -X " + versionVar + "=" + version + "'"
	}
	binHistory := v1.History{
		Created: v1.Time{Time: created},
		CreatedBy: fmt.Sprintf("agentk-image: /%s from CGO_ENABLED=0 GOOS=%s GOARCH=%s %s %s (%s)",
			binaryPath, p.OS, p.Architecture, buildCmd, agentkPackage, goVersion),
	}

	cfg := &v1.ConfigFile{
		Architecture: p.Architecture,
		OS:           p.OS,
		Variant:      p.Variant,
		Created:      v1.Time{Time: created},
		Config: v1.Config{
			Entrypoint: []string{"/" + binaryPath},
			User:       nonRootUser,
			WorkingDir: "/",
			Labels:     labels,
		},
		RootFS: v1.RootFS{Type: "layers"},
	}
	img, err := mutate.ConfigFile(empty.Image, cfg)
	if err != nil {
		return nil, fmt.Errorf("configuring the %s image: %w", p, err)
	}
	img, err = mutate.Append(img,
		mutate.Addendum{Layer: caLayer, History: caHistory},
		mutate.Addendum{Layer: binLayer, History: binHistory},
	)
	if err != nil {
		return nil, fmt.Errorf("adding the layers of the %s image: %w", p, err)
	}
	img = mutate.MediaType(img, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, ok := mutate.Annotations(img, labels).(v1.Image)
	if !ok {
		return nil, fmt.Errorf("annotating the %s image returned no image", p)
	}
	return img, nil
}

// writeLayout writes idx as the one entry of an OCI image layout at dir,
// named after reference (name:tag) for tools that tag what they load. The
// annotations are those docker save writes: the tag alone in
// org.opencontainers.image.ref.name (the reference of skopeo's oci:
// transport), the full name in io.containerd.image.name (containerd and
// Docker). A dir that exists must be empty or hold a layout already,
// which is replaced.
func writeLayout(dir string, idx v1.ImageIndex, reference string) error {
	if err := clearLayoutDir(dir); err != nil {
		return err
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return fmt.Errorf("creating the OCI layout %s: %w", dir, err)
	}
	name, tag, _ := strings.Cut(reference, ":")
	err = p.AppendIndex(idx, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": tag,
		"io.containerd.image.name":          qualified(name) + ":" + tag,
	}))
	if err != nil {
		return fmt.Errorf("writing the OCI layout %s: %w", dir, err)
	}
	return nil
}

// qualified completes an image name as Docker does: docker.io is the
// registry of a name without a registry host, and library the namespace
// of a name of one component.
func qualified(name string) string {
	host, _, ok := strings.Cut(name, "/")
	switch {
	case !ok:
		return "docker.io/library/" + name
	case strings.ContainsAny(host, ".:") || host == "localhost":
		return name
	default:
		return "docker.io/" + name
	}
}

// clearLayoutDir removes an OCI layout at dir, so that no blob of an
// earlier build stays behind. It refuses to remove anything else.
func clearLayoutDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) || err == nil && len(entries) == 0 {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading the output directory: %w", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "oci-layout")); err != nil {
		return fmt.Errorf("refusing to replace %s: it is not empty and holds no OCI layout", dir)
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("removing the previous OCI layout: %w", err)
	}
	return nil
}

// writeArchive writes the layout at dir as a tar file at path (the
// format of skopeo's oci-archive: transport, which docker load and podman
// load read too), with fixed modes, owner and timestamps so that it is the
// same bytes on every build. It writes a temporary file first so that a
// failed build leaves no truncated archive.
func writeArchive(path, dir string, created time.Time) (err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("creating the directory of the OCI archive: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("creating the OCI archive: %w", err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	tw := tar.NewWriter(tmp)
	// WalkDir visits in lexical order, which keeps the archive stable.
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil || rel == "." {
			return err
		}
		h := &tar.Header{Name: filepath.ToSlash(rel), ModTime: created, Format: tar.FormatPAX}
		switch {
		case d.IsDir():
			h.Typeflag, h.Name, h.Mode = tar.TypeDir, h.Name+"/", 0o755
			return tw.WriteHeader(h)
		case d.Type().IsRegular():
			body, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			h.Typeflag, h.Mode, h.Size = tar.TypeReg, 0o644, int64(len(body))
			if err := tw.WriteHeader(h); err != nil {
				return err
			}
			_, err = tw.Write(body)
			return err
		default:
			return fmt.Errorf("%s is neither a file nor a directory", p)
		}
	})
	if err != nil {
		return fmt.Errorf("archiving the OCI layout: %w", err)
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("finishing the OCI archive: %w", err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		return fmt.Errorf("finishing the OCI archive: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("finishing the OCI archive: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("finishing the OCI archive: %w", err)
	}
	return nil
}
