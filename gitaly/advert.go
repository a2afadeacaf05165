package gitaly

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
)

// maxPktLen is the largest pkt-line git allows, its 4-byte header included.
const maxPktLen = 65520

// noRefsName is the pseudo-ref git advertises, with an all-zero object id,
// to carry the capabilities when a repository has no refs at all.
const noRefsName = "capabilities^{}"

// ErrBadAdvertisement is wrapped by the errors of [ParseAdvertisement] for
// a stream that is not a well-formed ref advertisement.
var ErrBadAdvertisement = errors.New("malformed ref advertisement")

// Advertisement is what [ParseAdvertisement] keeps of a git-upload-pack ref
// advertisement.
type Advertisement struct {
	// Capabilities are those of the first ref line, in order.
	Capabilities []string
	// Head is the commit HEAD points to, or "" when HEAD was not advertised
	// (its branch is unborn, or the repository is empty).
	Head string
	// HeadTarget is the ref HEAD is a symbolic ref to, from the capability
	// "symref=HEAD:<ref>", such as "refs/heads/main"; "" when not given.
	HeadTarget string
	// Refs maps the name of each ref that was kept to its object id: HEAD,
	// HeadTarget, and those the keep function of ParseAdvertisement chose.
	Refs map[string]string
	// Count is the number of refs advertised, peeled tags and the
	// placeholder of a repository without refs not counted.
	Count int
}

// ParseAdvertisement reads a ref advertisement as Gitaly's
// InfoRefsUploadPack streams it and git-upload-pack --advertise-refs makes
// it (protocol v0, or v1 with its "version 1" line): an optional
// "# service=git-upload-pack" pkt-line and flush, then one pkt-line
// "<oid> <ref>" per ref, the first with the capabilities after a NUL, then
// a flush. It reads r up to that last flush and no further.
//
// Only the refs for which keep returns true are kept in Refs (keep may be
// nil), besides HEAD and the ref HEAD points to, so that a repository with
// very many refs costs no memory. An empty stream is an advertisement
// without refs: Gitaly answers an empty repository so.
//
// Errors from r are returned wrapped as they are; a malformed stream gives
// an error that wraps [ErrBadAdvertisement].
func ParseAdvertisement(r io.Reader, keep func(ref string) bool) (*Advertisement, error) {
	p := pktReader{r: r}
	adv := &Advertisement{Refs: make(map[string]string)}

	line, flush, err := p.next()
	switch {
	case errors.Is(err, io.EOF) && p.read == 0:
		return adv, nil // an empty stream: no refs
	case err != nil:
		return nil, err
	}
	if !flush && bytes.HasPrefix(line, []byte("# service=")) {
		if svc := string(trimLF(line)); svc != "# service=git-upload-pack" {
			return nil, badAdvertisement("advertisement for %q, want git-upload-pack", strings.TrimPrefix(svc, "# service="))
		}
		if _, flush, err := p.next(); err != nil {
			return nil, err
		} else if !flush {
			return nil, badAdvertisement("no flush after the service line")
		}
		if line, flush, err = p.next(); err != nil {
			return nil, err
		}
	}

	first := true
	for ; !flush; line, flush, err = p.next() {
		if err != nil {
			return nil, err
		}
		line = trimLF(line)
		if first && bytes.HasPrefix(line, []byte("version ")) {
			if v := string(line); v != "version 1" {
				return nil, badAdvertisement("protocol %q, want v0 or v1", strings.TrimPrefix(v, "version "))
			}
			continue
		}
		if err := adv.addLine(line, first, keep); err != nil {
			return nil, err
		}
		first = false
	}
	return adv, nil
}

// addLine takes one line of the ref section.
func (adv *Advertisement) addLine(line []byte, first bool, keep func(string) bool) error {
	if msg, ok := bytes.CutPrefix(line, []byte("ERR ")); ok {
		return fmt.Errorf("git-upload-pack: %q", msg)
	}
	if rest, ok := bytes.CutPrefix(line, []byte("shallow ")); ok {
		// A shallow repository lists its shallow commits after the refs.
		if !validOID(string(rest)) {
			return badAdvertisement("bad shallow line %q", line)
		}
		return nil
	}
	refPart, caps, hasCaps := bytes.Cut(line, []byte{0})
	if hasCaps && !first {
		return badAdvertisement("capabilities after the first ref")
	}
	oid, name, ok := strings.Cut(string(refPart), " ")
	if !ok || !validOID(oid) || !validRefName(name) {
		return badAdvertisement("bad ref line %q", refPart)
	}
	if hasCaps {
		if bytes.IndexByte(caps, 0) >= 0 {
			return badAdvertisement("NUL among the capabilities")
		}
		adv.Capabilities = strings.Fields(string(caps))
		for _, c := range adv.Capabilities {
			if target, ok := strings.CutPrefix(c, "symref=HEAD:"); ok {
				adv.HeadTarget = target
			}
		}
	}
	if name == noRefsName {
		if !first || strings.Trim(oid, "0") != "" {
			return badAdvertisement("%s out of place", noRefsName)
		}
		return nil
	}
	if strings.HasSuffix(name, "^{}") {
		return nil // the object a tag peels to
	}
	adv.Count++
	switch {
	case name == "HEAD":
		adv.Head = oid
		adv.Refs[name] = oid
	case name == adv.HeadTarget || (keep != nil && keep(name)):
		adv.Refs[name] = oid
	}
	return nil
}

// DefaultBranch tells the default branch and its commit: HEAD's, as KAS
// takes it, or, when HEAD is not advertised (its branch is unborn), that of
// refs/heads/main or else refs/heads/master. ref is "" when HEAD is
// detached or its target was not advertised. It fails with
// [ErrEmptyRepository] for a repository without refs and with [ErrNotFound]
// when none of these exists.
func (adv *Advertisement) DefaultBranch() (ref, commit string, err error) {
	if adv.Head != "" {
		return adv.HeadTarget, adv.Head, nil
	}
	for _, ref := range []string{"refs/heads/main", "refs/heads/master"} {
		if oid, ok := adv.Refs[ref]; ok {
			return ref, oid, nil
		}
	}
	if adv.Count == 0 {
		return "", "", ErrEmptyRepository
	}
	return "", "", fmt.Errorf("%w: no HEAD, refs/heads/main or refs/heads/master", ErrNotFound)
}

// keepDefaultBranch keeps what [Advertisement.DefaultBranch] may need.
func keepDefaultBranch(ref string) bool {
	return ref == "refs/heads/main" || ref == "refs/heads/master"
}

func badAdvertisement(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrBadAdvertisement, fmt.Sprintf(format, args...))
}

func trimLF(b []byte) []byte { return bytes.TrimSuffix(b, []byte{'\n'}) }

// validOID accepts a SHA-1 or SHA-256 object id in lowercase hex.
func validOID(s string) bool {
	if len(s) != 40 && len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// validRefName accepts what may follow the object id on a ref line: a
// non-empty name without spaces or control characters. It is not git's
// check-ref-format; the names only serve as map keys.
func validRefName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c == 0x7f {
			return false
		}
	}
	return true
}

// pktReader reads pkt-lines.
type pktReader struct {
	r    io.Reader
	read int // bytes read so far
	hdr  [4]byte
	buf  []byte
}

// next returns the next pkt-line's payload, valid until the next call, or
// flush for a flush-pkt. It returns io.EOF at a clean end of the stream
// (which is an error unless nothing was read), an error wrapping
// ErrBadAdvertisement for a malformed or truncated pkt-line, and the
// reader's other errors as they are.
func (p *pktReader) next() (payload []byte, flush bool, err error) {
	n, err := io.ReadFull(p.r, p.hdr[:])
	p.read += n
	switch {
	case errors.Is(err, io.EOF) && p.read == 0:
		return nil, false, io.EOF
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return nil, false, badAdvertisement("truncated: the stream ends before its final flush")
	case err != nil:
		return nil, false, err
	}
	size := 0
	for _, c := range p.hdr {
		d, ok := unhex(c)
		if !ok {
			return nil, false, badAdvertisement("bad pkt-line length %q", p.hdr[:])
		}
		size = size<<4 | d
	}
	switch {
	case size == 0:
		return nil, true, nil
	case size < 4:
		// 0001 (delim) and 0002 (response end) belong to protocol v2.
		return nil, false, badAdvertisement("unexpected special pkt-line %q", p.hdr[:])
	case size > maxPktLen:
		return nil, false, badAdvertisement("pkt-line of %d bytes, over git's maximum of %d", size, maxPktLen)
	}
	if cap(p.buf) < size-4 {
		p.buf = make([]byte, size-4)
	}
	p.buf = p.buf[:size-4]
	n, err = io.ReadFull(p.r, p.buf)
	p.read += n
	switch {
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return nil, false, badAdvertisement("truncated: the stream ends inside a pkt-line")
	case err != nil:
		return nil, false, err
	}
	return p.buf, false, nil
}

func unhex(c byte) (int, bool) {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0'), true
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10, true
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10, true
	}
	return 0, false
}
