package main

import (
	"archive/tar"
	"bytes"
	"crypto/x509"
	gobuildinfo "debug/buildinfo"
	"debug/elf"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/crypto/x509roots/fallback/bundle"
)

// TestImage builds the image as `make image` does and checks what a
// cluster gets: the index and its platforms, how the container runs, its
// labels, its files, and that its agentk is the one of this commit. The
// build is shared by the checks, because cross-compiling agentk for two
// platforms is the slow part; a second build checks that it is
// reproducible.
func TestImage(t *testing.T) {
	head := gitOutput(t, "rev-parse", "HEAD")
	created, err := creationTime(os.Getenv("SOURCE_DATE_EPOCH"), gitOutput(t, "log", "-1", "--format=%cI", "HEAD"))
	if err != nil {
		t.Fatal(err)
	}

	first := buildInto(t, t.TempDir())
	res := first.res
	if res.revision != head {
		t.Errorf("build result names commit %s, want HEAD %s", res.revision, head)
	}
	if !res.created.Equal(created) {
		t.Errorf("build result is dated %s, want %s", res.created, created)
	}
	wantLabels := map[string]string{
		"org.opencontainers.image.title":       "agentk",
		"org.opencontainers.image.description": "The caddy-kas agent: dials out to the agent server (KAS) and forwards its requests to the cluster's kube-apiserver.",
		"org.opencontainers.image.version":     res.version,
		"org.opencontainers.image.revision":    head,
		"org.opencontainers.image.source":      defaultSource,
		"org.opencontainers.image.created":     created.Format(time.RFC3339),
	}
	top, err := layout.ImageIndexFromPath(first.opts.layoutDir)
	if err != nil {
		t.Fatalf("opening the OCI layout: %v", err)
	}

	t.Run("layout", func(t *testing.T) {
		m, err := top.IndexManifest()
		if err != nil {
			t.Fatal(err)
		}
		if len(m.Manifests) != 1 {
			t.Fatalf("index.json lists %d manifests, want the one image index", len(m.Manifests))
		}
		d := m.Manifests[0]
		if d.MediaType != types.OCIImageIndex || d.Digest != res.digest {
			t.Errorf("index.json lists %s %s, want %s %s", d.MediaType, d.Digest, types.OCIImageIndex, res.digest)
		}
		tag := tagOf(res.version)
		wantAnnotations := map[string]string{
			"org.opencontainers.image.ref.name": tag,
			"io.containerd.image.name":          "docker.io/" + defaultName + ":" + tag,
		}
		if !maps.Equal(d.Annotations, wantAnnotations) {
			t.Errorf("index.json annotations = %v, want %v", d.Annotations, wantAnnotations)
		}
	})

	idx, err := top.ImageIndex(res.digest)
	if err != nil {
		t.Fatalf("opening the image index: %v", err)
	}
	t.Run("index", func(t *testing.T) {
		m, err := idx.IndexManifest()
		if err != nil {
			t.Fatal(err)
		}
		if m.MediaType != types.OCIImageIndex {
			t.Errorf("index media type = %s, want %s", m.MediaType, types.OCIImageIndex)
		}
		var got []string
		for _, d := range m.Manifests {
			if d.MediaType != types.OCIManifestSchema1 {
				t.Errorf("manifest %s has media type %s, want %s", d.Digest, d.MediaType, types.OCIManifestSchema1)
			}
			if d.ArtifactType != "" {
				t.Errorf("manifest %s has artifactType %s, want none: it is not an artifact", d.Digest, d.ArtifactType)
			}
			if d.Platform == nil {
				t.Errorf("manifest %s has no platform", d.Digest)
				continue
			}
			got = append(got, d.Platform.String())
		}
		if want := []string{"linux/amd64", "linux/arm64"}; strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("index platforms = %v, want %v", got, want)
		}
		if !maps.Equal(m.Annotations, wantLabels) {
			t.Errorf("index annotations = %v, want %v", m.Annotations, wantLabels)
		}
	})

	for _, p := range platforms {
		t.Run(p.String(), func(t *testing.T) {
			img := platformOf(t, idx, p)
			checkConfig(t, img, p, created, wantLabels)
			files := readFiles(t, img, created)
			checkCABundle(t, files[caBundlePath])
			checkAgentk(t, files[binaryPath], p, head, res.version)
		})
	}

	t.Run("reproducible", func(t *testing.T) {
		second := buildInto(t, t.TempDir())
		if second.res.digest != res.digest {
			t.Errorf("second build has index %s, first %s", second.res.digest, res.digest)
		}
		a, err := os.ReadFile(first.opts.archive)
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(second.opts.archive)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a, b) {
			t.Errorf("the OCI archives of two builds differ (%d and %d bytes)", len(a), len(b))
		}
	})
}

// builtImage is a build made by buildInto.
type builtImage struct {
	opts options
	res  result
}

// buildInto builds the image into dir with the defaults of the command.
func buildInto(t *testing.T, dir string) builtImage {
	t.Helper()
	o := options{
		layoutDir: filepath.Join(dir, "agentk-oci"),
		archive:   filepath.Join(dir, "agentk-oci.tar"),
		name:      defaultName,
		source:    defaultSource,
	}
	res, err := build(t.Context(), o)
	if err != nil {
		t.Fatalf("building the image: %v", err)
	}
	return builtImage{opts: o, res: res}
}

// platformOf returns the image of p in idx.
func platformOf(t *testing.T, idx v1.ImageIndex, p v1.Platform) v1.Image {
	t.Helper()
	m, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range m.Manifests {
		if d.Platform != nil && d.Platform.Equals(p) {
			img, err := idx.Image(d.Digest)
			if err != nil {
				t.Fatalf("opening the %s image: %v", p, err)
			}
			return img
		}
	}
	t.Fatalf("the index has no %s image", p)
	return nil
}

// checkConfig checks how a container of img runs.
func checkConfig(t *testing.T, img v1.Image, p v1.Platform, created time.Time, wantLabels map[string]string) {
	t.Helper()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if m.MediaType != types.OCIManifestSchema1 || m.Config.MediaType != types.OCIConfigJSON {
		t.Errorf("manifest and config media types = %s, %s; want OCI ones", m.MediaType, m.Config.MediaType)
	}
	for _, l := range m.Layers {
		if l.MediaType != types.OCILayer {
			t.Errorf("layer %s has media type %s, want %s", l.Digest, l.MediaType, types.OCILayer)
		}
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.OS != p.OS || cfg.Architecture != p.Architecture {
		t.Errorf("config platform = %s/%s, want %s", cfg.OS, cfg.Architecture, p)
	}
	if !cfg.Created.Equal(created) {
		t.Errorf("config created = %s, want %s", cfg.Created.Time, created)
	}
	for _, h := range cfg.History {
		if !h.Created.Equal(created) {
			t.Errorf("history entry %q created = %s, want %s", h.CreatedBy, h.Created.Time, created)
		}
	}
	c := cfg.Config
	if got, want := strings.Join(c.Entrypoint, " "), "/usr/bin/agentk"; got != want || len(c.Cmd) != 0 {
		t.Errorf("entrypoint = %q, cmd = %q; want %q and no cmd", c.Entrypoint, c.Cmd, want)
	}
	if c.User != "65532:65532" {
		t.Errorf("user = %q, want 65532:65532", c.User)
	}
	if !maps.Equal(c.Labels, wantLabels) {
		t.Errorf("labels = %v, want %v", c.Labels, wantLabels)
	}
	if !maps.Equal(m.Annotations, wantLabels) {
		t.Errorf("manifest annotations = %v, want %v", m.Annotations, wantLabels)
	}
}

// readFiles reads every layer of img and returns its regular files by
// name. It fails the test on anything but root-owned files and
// directories dated created, on files that a later layer replaces, and on
// any file other than the binary and the CA bundle: the image has no
// shell and nothing else to run.
func readFiles(t *testing.T, img v1.Image, created time.Time) map[string][]byte {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	files := make(map[string][]byte)
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		tr := tar.NewReader(rc)
		for {
			h, err := tr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("reading a layer: %v", err)
			}
			if h.Uid != 0 || h.Gid != 0 || !h.ModTime.Equal(created) {
				t.Errorf("%s: owner %d:%d, time %s; want 0:0, %s", h.Name, h.Uid, h.Gid, h.ModTime, created)
			}
			switch base := path.Base(h.Name); {
			case h.Typeflag == tar.TypeDir:
				continue
			case h.Typeflag != tar.TypeReg:
				t.Errorf("%s: type %q, want only files and directories", h.Name, h.Typeflag)
			case base == "sh" || base == "bash" || base == "ash" || base == "dash" || base == "busybox":
				t.Errorf("the image has a shell, %s", h.Name)
			}
			if _, dup := files[h.Name]; dup {
				t.Errorf("%s is in more than one layer", h.Name)
			}
			if files[h.Name], err = io.ReadAll(tr); err != nil {
				t.Fatalf("reading %s: %v", h.Name, err)
			}
			wantMode := int64(0o444)
			if h.Name == binaryPath {
				wantMode = 0o555
			}
			if h.Mode != wantMode {
				t.Errorf("%s: mode %o, want %o", h.Name, h.Mode, wantMode)
			}
		}
		if err := rc.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if got, want := strings.Join(slices.Sorted(maps.Keys(files)), " "), caBundlePath+" "+binaryPath; got != want {
		t.Errorf("files in the image = %s, want %s", got, want)
	}
	return files
}

// checkCABundle checks that pemBundle holds the unconstrained roots of
// golang.org/x/crypto/x509roots/fallback, the ones Go's crypto/x509 can
// use from a PEM file.
func checkCABundle(t *testing.T, pemBundle []byte) {
	t.Helper()
	want := make(map[string]bool)
	for r := range bundle.Roots() {
		if r.Constraint == nil {
			want[string(r.Certificate)] = true
		}
	}
	got := 0
	for rest := pemBundle; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			if len(bytes.TrimSpace(rest)) != 0 {
				t.Errorf("the CA bundle has %d bytes that are not PEM", len(rest))
			}
			break
		}
		got++
		if _, err := x509.ParseCertificate(block.Bytes); err != nil || block.Type != "CERTIFICATE" {
			t.Errorf("CA bundle block %d (%s) is no certificate: %v", got, block.Type, err)
		}
		if !want[string(block.Bytes)] {
			t.Errorf("CA bundle block %d is not an unconstrained Mozilla root", got)
		}
	}
	if got != len(want) || got < 100 {
		t.Errorf("the CA bundle holds %d certificates, want the %d unconstrained Mozilla roots", got, len(want))
	}
}

// checkAgentk checks that binary is a static agentk for p built from
// commit head, and, where it can run here, that it says so.
func checkAgentk(t *testing.T, binary []byte, p v1.Platform, head, version string) {
	t.Helper()
	file := filepath.Join(t.TempDir(), "agentk")
	if err := os.WriteFile(file, binary, 0o755); err != nil {
		t.Fatal(err)
	}
	bi, err := gobuildinfo.ReadFile(file)
	if err != nil {
		t.Fatalf("reading the build information of the image's agentk: %v", err)
	}
	if bi.Path != modulePath+"/cmd/agentk" || bi.Main.Path != modulePath {
		t.Errorf("the image's binary is %s of module %s, want cmd/agentk of %s", bi.Path, bi.Main.Path, modulePath)
	}
	if version != bi.Main.Version {
		t.Errorf("version label %q, but Go recorded module version %q", version, bi.Main.Version)
	}
	want := map[string]string{
		"vcs.revision": head,
		"vcs.modified": "false",
		"GOOS":         p.OS,
		"GOARCH":       p.Architecture,
		"CGO_ENABLED":  "0",
		"-trimpath":    "true",
	}
	for _, s := range bi.Settings {
		if w, ok := want[s.Key]; ok {
			if s.Value != w {
				t.Errorf("the image's agentk records %s=%s, want %s", s.Key, s.Value, w)
			}
			delete(want, s.Key)
		}
	}
	if len(want) > 0 {
		t.Errorf("the image's agentk records none of %v", want)
	}

	ef, err := elf.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer ef.Close()
	wantMachine := map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64}[p.Architecture]
	if ef.Machine != wantMachine {
		t.Errorf("the image's agentk is for %s, want %s", ef.Machine, wantMachine)
	}
	for _, prog := range ef.Progs {
		if prog.Type == elf.PT_INTERP {
			t.Error("the image's agentk asks for a dynamic loader; the image has none")
		}
	}

	// The image's binary of this machine's platform runs here too: it must
	// report this commit as it does to KAS.
	if runtime.GOOS != p.OS || runtime.GOARCH != p.Architecture {
		return
	}
	out, err := exec.CommandContext(t.Context(), file, "--version").CombinedOutput()
	if err != nil {
		t.Fatalf("agentk --version: %v\n%s", err, out)
	}
	if got, want := string(out), fmt.Sprintf("agentk %s (commit %s)\n", version, head[:12]); got != want {
		t.Errorf("agentk --version = %q, want %q", got, want)
	}
}

func TestTagOf(t *testing.T) {
	tests := []struct{ version, want string }{
		{"v1.2.3", "v1.2.3"},
		{"v0.0.0-20261126013721-2bd09d5c1010", "v0.0.0-20261126013721-2bd09d5c1010"},
		{"v0.0.0-20261126013721-2bd09d5c1010+dirty", "v0.0.0-20261126013721-2bd09d5c1010-dirty"},
		{"devel", "devel"},
		{"", "v"},
		{".hidden", "v.hidden"},
		{strings.Repeat("a", 200), strings.Repeat("a", 128)},
	}
	for _, tt := range tests {
		if got := tagOf(tt.version); got != tt.want {
			t.Errorf("tagOf(%q) = %q, want %q", tt.version, got, tt.want)
		}
	}
}

func TestQualified(t *testing.T) {
	tests := []struct{ name, want string }{
		{"agentk", "docker.io/library/agentk"},
		{"caddy-kas/agentk", "docker.io/caddy-kas/agentk"},
		{"registry.example.com/caddy-kas/agentk", "registry.example.com/caddy-kas/agentk"},
		{"localhost:5000/agentk", "localhost:5000/agentk"},
		{"localhost/agentk", "localhost/agentk"},
	}
	for _, tt := range tests {
		if got := qualified(tt.name); got != tt.want {
			t.Errorf("qualified(%q) = %q, want %q", tt.name, got, tt.want)
		}
	}
}

func TestCreationTime(t *testing.T) {
	tests := []struct {
		name            string
		sourceDateEpoch string
		commitTime      string
		want            time.Time
		wantErr         bool
	}{
		{name: "commit time", commitTime: "2026-11-26T01:37:21Z", want: time.Date(2026, 11, 26, 1, 37, 21, 0, time.UTC)},
		{name: "commit time with offset", commitTime: "2026-11-26T02:37:21+01:00", want: time.Date(2026, 11, 26, 1, 37, 21, 0, time.UTC)},
		{name: "SOURCE_DATE_EPOCH wins", sourceDateEpoch: "1700000000", commitTime: "2026-11-26T01:37:21Z", want: time.Unix(1700000000, 0).UTC()},
		{name: "SOURCE_DATE_EPOCH zero", sourceDateEpoch: "0", want: time.Unix(0, 0).UTC()},
		{name: "SOURCE_DATE_EPOCH not a number", sourceDateEpoch: "yesterday", wantErr: true},
		{name: "SOURCE_DATE_EPOCH negative", sourceDateEpoch: "-1", wantErr: true},
		{name: "no time", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := creationTime(tt.sourceDateEpoch, tt.commitTime)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error: %t", err, tt.wantErr)
			}
			if !got.Equal(tt.want) || got.Location() != time.UTC {
				t.Errorf("creationTime = %s, want %s in UTC", got, tt.want)
			}
		})
	}
}

func TestClearLayoutDir(t *testing.T) {
	tests := []struct {
		name    string
		files   []string // created in the directory; nil for no directory
		wantErr bool
	}{
		{name: "missing"},
		{name: "empty", files: []string{}},
		{name: "earlier layout", files: []string{"oci-layout", "index.json", "blobs/sha256/0123"}},
		{name: "something else", files: []string{"notes.txt"}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "out")
			if tt.files != nil {
				if err := os.Mkdir(dir, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			for _, f := range tt.files {
				p := filepath.Join(dir, f)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			err := clearLayoutDir(dir)
			if (err != nil) != tt.wantErr {
				t.Fatalf("clearLayoutDir: %v, want error: %t", err, tt.wantErr)
			}
			entries, _ := os.ReadDir(dir)
			if !tt.wantErr && len(entries) != 0 {
				t.Errorf("%d entries left in the directory", len(entries))
			}
			if tt.wantErr && len(entries) != len(tt.files) {
				t.Errorf("%d entries left in the directory, want the %d it had", len(entries), len(tt.files))
			}
		})
	}
}

// gitOutput runs git in the working directory and returns its trimmed
// output.
func gitOutput(t *testing.T, args ...string) string {
	t.Helper()
	out, err := git(t.Context(), ".", args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}
