package fakecluster

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"slices"
	"strings"
	"sync"
	"time"
)

// memFS is the file system of one fake container: directories, regular
// files and symbolic links in memory. Paths are absolute, or relative to /.
type memFS struct {
	mu    sync.Mutex
	nodes map[string]*memNode
}

type memNode struct {
	dir     bool
	link    string // target of a symbolic link; empty for others
	data    []byte
	mode    fs.FileMode // permission bits
	modTime time.Time
}

// newMemFS returns a file system with the directories a container usually
// has.
func newMemFS() *memFS {
	m := &memFS{nodes: make(map[string]*memNode)}
	for _, dir := range []string{"/", "/tmp", "/root", "/etc", "/var", "/home"} {
		m.nodes[dir] = &memNode{dir: true, mode: 0o755, modTime: time.Now()}
	}
	m.nodes["/tmp"].mode = 0o777
	return m
}

func cleanPath(p string) string { return path.Clean("/" + p) }

var (
	errNotExist = errors.New("No such file or directory")
	errNotDir   = errors.New("Not a directory")
	errIsDir    = errors.New("Is a directory")
	errExist    = errors.New("File exists")
)

// stat returns a copy of the node at p, without its data.
func (m *memFS) stat(p string) (memNode, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n, ok := m.nodes[cleanPath(p)]
	if !ok {
		return memNode{}, errNotExist
	}
	return memNode{dir: n.dir, link: n.link, mode: n.mode, modTime: n.modTime}, nil
}

func (m *memFS) isDir(p string) bool {
	n, err := m.stat(p)
	return err == nil && n.dir
}

// mkdirAll creates p and its missing parents.
func (m *memFS) mkdirAll(p string, mode fs.FileMode) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.mkdirAllLocked(cleanPath(p), mode)
}

func (m *memFS) mkdirAllLocked(p string, mode fs.FileMode) error {
	if n, ok := m.nodes[p]; ok {
		if !n.dir {
			return errNotDir
		}
		return nil
	}
	if err := m.mkdirAllLocked(path.Dir(p), 0o755); err != nil {
		return err
	}
	m.nodes[p] = &memNode{dir: true, mode: mode.Perm(), modTime: time.Now()}
	return nil
}

// writeFile creates or replaces the regular file p; its directory must
// exist unless parents is true.
func (m *memFS) writeFile(p string, data []byte, mode fs.FileMode, parents bool) error {
	p = cleanPath(p)
	m.mu.Lock()
	defer m.mu.Unlock()
	if parents {
		if err := m.mkdirAllLocked(path.Dir(p), 0o755); err != nil {
			return err
		}
	} else if dir, ok := m.nodes[path.Dir(p)]; !ok {
		return errNotExist
	} else if !dir.dir {
		return errNotDir
	}
	if n, ok := m.nodes[p]; ok && n.dir {
		return errIsDir
	}
	m.nodes[p] = &memNode{data: slices.Clone(data), mode: mode.Perm(), modTime: time.Now()}
	return nil
}

// symlink creates the symbolic link p pointing to target.
func (m *memFS) symlink(target, p string) error {
	p = cleanPath(p)
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.mkdirAllLocked(path.Dir(p), 0o755); err != nil {
		return err
	}
	if n, ok := m.nodes[p]; ok && n.dir {
		return errIsDir
	}
	m.nodes[p] = &memNode{link: target, mode: 0o777, modTime: time.Now()}
	return nil
}

// readFile returns the contents of the regular file p.
func (m *memFS) readFile(p string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n, ok := m.nodes[cleanPath(p)]
	switch {
	case !ok:
		return nil, errNotExist
	case n.dir:
		return nil, errIsDir
	case n.link != "":
		return nil, fmt.Errorf("symbolic links are not followed here")
	}
	return slices.Clone(n.data), nil
}

// children returns the names of the entries of directory p, sorted.
func (m *memFS) children(p string) ([]string, error) {
	p = cleanPath(p)
	m.mu.Lock()
	defer m.mu.Unlock()
	n, ok := m.nodes[p]
	if !ok {
		return nil, errNotExist
	}
	if !n.dir {
		return nil, errNotDir
	}
	var names []string
	for q := range m.nodes {
		if q != p && path.Dir(q) == p {
			names = append(names, path.Base(q))
		}
	}
	slices.Sort(names)
	return names, nil
}

// writeTar writes a tar archive of paths (recursively, for directories) to
// w, as GNU `tar cf - -C DIR PATH...` does: a relative path is relative to
// dir, and member names are the paths as given, less a leading /.
func (m *memFS) writeTar(w io.Writer, dir string, paths ...string) error {
	tw := tar.NewWriter(w)
	for _, p := range paths {
		name := strings.TrimLeft(path.Clean(p), "/")
		if err := m.addToTar(tw, resolvePath(dir, p), name); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
	}
	return tw.Close()
}

// resolvePath is p, relative to dir unless absolute.
func resolvePath(dir, p string) string {
	if strings.HasPrefix(p, "/") {
		return cleanPath(p)
	}
	return cleanPath(path.Join(dir, p))
}

// addToTar adds the node at p, named name, to tw.
func (m *memFS) addToTar(tw *tar.Writer, p, name string) error {
	m.mu.Lock()
	n, ok := m.nodes[p]
	var node memNode
	if ok {
		node = *n
	}
	m.mu.Unlock()
	if !ok {
		return errNotExist
	}
	hdr := &tar.Header{Name: name, Mode: int64(node.mode), ModTime: node.modTime, Uname: "root", Gname: "root", Format: tar.FormatGNU}
	switch {
	case node.dir:
		hdr.Typeflag = tar.TypeDir
		if name != "" && name != "." {
			hdr.Name += "/"
			if err := tw.WriteHeader(hdr); err != nil {
				return err
			}
		}
		names, err := m.children(p)
		if err != nil {
			return err
		}
		for _, child := range names {
			childName := child
			if name != "" && name != "." {
				childName = name + "/" + child
			}
			if err := m.addToTar(tw, path.Join(p, child), childName); err != nil {
				return err
			}
		}
		return nil
	case node.link != "":
		hdr.Typeflag = tar.TypeSymlink
		hdr.Linkname = node.link
		return tw.WriteHeader(hdr)
	default:
		hdr.Typeflag = tar.TypeReg
		hdr.Size = int64(len(node.data))
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		_, err := tw.Write(node.data)
		return err
	}
}

// extractTar reads a tar archive from r and creates its members under dir,
// as `tar xf - -C dir` does; it returns warnings for members it skipped.
func (m *memFS) extractTar(r io.Reader, dir string) (warnings []string, err error) {
	if !m.isDir(dir) {
		return nil, fmt.Errorf("%s: Cannot open: %w", dir, errNotExist)
	}
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return warnings, nil
		}
		if err != nil {
			return warnings, fmt.Errorf("This does not look like a tar archive: %w", err)
		}
		name := strings.TrimLeft(hdr.Name, "/")
		if slices.Contains(strings.Split(name, "/"), "..") {
			warnings = append(warnings, fmt.Sprintf("%s: Member name contains '..'", hdr.Name))
			continue
		}
		target := path.Join(cleanPath(dir), name)
		switch hdr.Typeflag {
		case tar.TypeDir:
			err = m.mkdirAll(target, fs.FileMode(hdr.Mode))
		case tar.TypeReg:
			var data []byte
			if data, err = io.ReadAll(tr); err == nil {
				err = m.writeFile(target, data, fs.FileMode(hdr.Mode), true)
			}
		case tar.TypeSymlink:
			err = m.symlink(hdr.Linkname, target)
		default:
			warnings = append(warnings, fmt.Sprintf("%s: Unsupported member type %q, skipped", hdr.Name, hdr.Typeflag))
		}
		if err != nil {
			return warnings, fmt.Errorf("%s: Cannot create: %w", name, err)
		}
	}
}
