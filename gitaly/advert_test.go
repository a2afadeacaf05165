package gitaly

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
)

const (
	oidA = "1111111111111111111111111111111111111111"
	oidB = "2222222222222222222222222222222222222222"
	oidC = "3333333333333333333333333333333333333333"
	oidT = "4444444444444444444444444444444444444444"
	// a SHA-256 object id
	oid256 = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
)

// pkt encodes one pkt-line.
func pkt(s string) string { return fmt.Sprintf("%04x%s", len(s)+4, s) }

const flushPkt = "0000"

// serviceHeader is what Gitaly puts before git-upload-pack's output.
var serviceHeader = pkt("# service=git-upload-pack\n") + flushPkt

const caps = "multi_ack thin-pack side-band side-band-64k ofs-delta shallow no-progress include-tag"

func TestParseAdvertisement(t *testing.T) {
	typical := serviceHeader +
		pkt(oidA+" HEAD\x00"+caps+" symref=HEAD:refs/heads/main agent=git/2.39.5\n") +
		pkt(oidB+" refs/heads/feature\n") +
		pkt(oidA+" refs/heads/main\n") +
		pkt(oidT+" refs/tags/v1\n") +
		pkt(oidC+" refs/tags/v1^{}\n") +
		flushPkt

	tests := []struct {
		name  string
		in    string
		keep  func(string) bool
		want  *Advertisement
		err   error  // errors.Is target, nil for success
		errIn string // substring of the error
	}{
		{
			name: "typical",
			in:   typical,
			keep: func(r string) bool { return r == "refs/heads/feature" },
			want: &Advertisement{
				Capabilities: append(strings.Fields(caps), "symref=HEAD:refs/heads/main", "agent=git/2.39.5"),
				Head:         oidA, HeadTarget: "refs/heads/main",
				Refs:  map[string]string{"HEAD": oidA, "refs/heads/main": oidA, "refs/heads/feature": oidB},
				Count: 4,
			},
		},
		{
			name: "without the service header, lines without newlines",
			in:   pkt(oidA+" HEAD\x00symref=HEAD:refs/heads/master") + pkt(oidA+" refs/heads/master") + flushPkt,
			want: &Advertisement{
				Capabilities: []string{"symref=HEAD:refs/heads/master"},
				Head:         oidA, HeadTarget: "refs/heads/master",
				Refs: map[string]string{"HEAD": oidA, "refs/heads/master": oidA}, Count: 2,
			},
		},
		{
			name: "protocol v1",
			in:   serviceHeader + pkt("version 1\n") + pkt(oidA+" HEAD\x00agent=x\n") + flushPkt,
			want: &Advertisement{Capabilities: []string{"agent=x"}, Head: oidA, Refs: map[string]string{"HEAD": oidA}, Count: 1},
		},
		{
			name: "detached HEAD",
			in:   serviceHeader + pkt(oidC+" HEAD\x00agent=x\n") + pkt(oidA+" refs/heads/main\n") + flushPkt,
			keep: keepDefaultBranch,
			want: &Advertisement{Capabilities: []string{"agent=x"}, Head: oidC,
				Refs: map[string]string{"HEAD": oidC, "refs/heads/main": oidA}, Count: 2},
		},
		{
			name: "unborn HEAD",
			in:   serviceHeader + pkt(oidB+" refs/heads/other\x00agent=x\n") + pkt(oidA+" refs/heads/master\n") + flushPkt,
			keep: keepDefaultBranch,
			want: &Advertisement{Capabilities: []string{"agent=x"},
				Refs: map[string]string{"refs/heads/master": oidA}, Count: 2},
		},
		{
			name: "sha256 and shallow",
			in:   serviceHeader + pkt(oid256+" HEAD\x00object-format=sha256\n") + pkt("shallow "+oid256+"\n") + flushPkt,
			want: &Advertisement{Capabilities: []string{"object-format=sha256"}, Head: oid256,
				Refs: map[string]string{"HEAD": oid256}, Count: 1},
		},
		{
			name: "empty stream",
			in:   "",
			want: &Advertisement{Refs: map[string]string{}},
		},
		{
			name: "empty repository as git advertises it",
			in:   serviceHeader + pkt(strings.Repeat("0", 40)+" capabilities^{}\x00"+caps+"\n") + flushPkt,
			want: &Advertisement{Capabilities: strings.Fields(caps), Refs: map[string]string{}},
		},
		{
			name: "header and flushes only",
			in:   serviceHeader + flushPkt,
			want: &Advertisement{Refs: map[string]string{}},
		},
		{
			name: "trailing data after the final flush is not read",
			in:   serviceHeader + pkt(oidA+" HEAD\n") + flushPkt + "garbage",
			want: &Advertisement{Head: oidA, Refs: map[string]string{"HEAD": oidA}, Count: 1},
		},
		{name: "another service", in: pkt("# service=git-receive-pack\n") + flushPkt + flushPkt, err: ErrBadAdvertisement, errIn: "git-receive-pack"},
		{name: "no flush after the header", in: pkt("# service=git-upload-pack\n") + pkt(oidA+" HEAD\n") + flushPkt, err: ErrBadAdvertisement},
		{name: "protocol v2", in: serviceHeader + pkt("version 2\n") + pkt("agent=git\n") + flushPkt, err: ErrBadAdvertisement, errIn: "protocol"},
		{name: "delim packet", in: serviceHeader + "0001" + flushPkt, err: ErrBadAdvertisement},
		{name: "bad length", in: "00zz", err: ErrBadAdvertisement},
		{name: "length over the maximum", in: "fff1" + strings.Repeat("x", 0xfff1-4), err: ErrBadAdvertisement},
		{name: "truncated header", in: "00", err: ErrBadAdvertisement, errIn: "truncated"},
		{name: "truncated payload", in: serviceHeader + "0030" + oidA, err: ErrBadAdvertisement, errIn: "truncated"},
		{name: "no final flush", in: serviceHeader + pkt(oidA+" HEAD\n"), err: ErrBadAdvertisement, errIn: "truncated"},
		{name: "no final flush after the header", in: serviceHeader, err: ErrBadAdvertisement, errIn: "truncated"},
		{name: "short oid", in: serviceHeader + pkt("1234 HEAD\n") + flushPkt, err: ErrBadAdvertisement},
		{name: "uppercase oid", in: serviceHeader + pkt(strings.ToUpper("abcdef"+oidA[6:])+" HEAD\n") + flushPkt, err: ErrBadAdvertisement},
		{name: "no ref name", in: serviceHeader + pkt(oidA+" \n") + flushPkt, err: ErrBadAdvertisement},
		{name: "no space", in: serviceHeader + pkt(oidA+"\n") + flushPkt, err: ErrBadAdvertisement},
		{name: "capabilities on a later line", in: serviceHeader + pkt(oidA+" HEAD\n") + pkt(oidB+" refs/heads/x\x00agent=y\n") + flushPkt, err: ErrBadAdvertisement},
		{name: "no-refs placeholder after a ref", in: serviceHeader + pkt(oidA+" HEAD\n") + pkt(strings.Repeat("0", 40)+" capabilities^{}\n") + flushPkt, err: ErrBadAdvertisement},
		{name: "no-refs placeholder with an id", in: serviceHeader + pkt(oidA+" capabilities^{}\x00\n") + flushPkt, err: ErrBadAdvertisement},
		{name: "git error", in: serviceHeader + pkt("ERR access denied\n") + flushPkt, errIn: "access denied"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, mode := range []string{"whole", "one byte at a time"} {
				var r io.Reader = strings.NewReader(tt.in)
				if mode != "whole" {
					r = iotest.OneByteReader(r)
				}
				got, err := ParseAdvertisement(r, tt.keep)
				if tt.err != nil || tt.errIn != "" {
					if err == nil {
						t.Fatalf("%s: got %+v, want an error", mode, got)
					}
					if tt.err != nil && !errors.Is(err, tt.err) {
						t.Errorf("%s: error %q, want one wrapping %q", mode, err, tt.err)
					}
					if !strings.Contains(err.Error(), tt.errIn) {
						t.Errorf("%s: error %q, want it to mention %q", mode, err, tt.errIn)
					}
					continue
				}
				if err != nil {
					t.Fatalf("%s: %v", mode, err)
				}
				if !reflect.DeepEqual(got, tt.want) {
					t.Errorf("%s: got\n%+v\nwant\n%+v", mode, got, tt.want)
				}
			}
		})
	}
}

func TestParseAdvertisementStopsAtFinalFlush(t *testing.T) {
	r := strings.NewReader(serviceHeader + pkt(oidA+" HEAD\n") + flushPkt + "rest")
	if _, err := ParseAdvertisement(r, nil); err != nil {
		t.Fatal(err)
	}
	if rest, _ := io.ReadAll(r); string(rest) != "rest" {
		t.Errorf("left %q unread, want %q", rest, "rest")
	}
}

func TestParseAdvertisementReaderError(t *testing.T) {
	boom := errors.New("boom")
	r := io.MultiReader(strings.NewReader(serviceHeader+pkt(oidA+" HEAD\n")), iotest.ErrReader(boom))
	if _, err := ParseAdvertisement(r, nil); !errors.Is(err, boom) || errors.Is(err, ErrBadAdvertisement) {
		t.Errorf("error %v, want the reader's own", err)
	}
}

func TestDefaultBranch(t *testing.T) {
	tests := []struct {
		name       string
		adv        Advertisement
		ref, oid   string
		err        error
		errMention string
	}{
		{"HEAD", Advertisement{Head: oidA, HeadTarget: "refs/heads/dev", Refs: map[string]string{"HEAD": oidA, "refs/heads/main": oidB}, Count: 2}, "refs/heads/dev", oidA, nil, ""},
		{"detached HEAD", Advertisement{Head: oidA, Refs: map[string]string{"HEAD": oidA}, Count: 1}, "", oidA, nil, ""},
		{"unborn HEAD, main", Advertisement{Refs: map[string]string{"refs/heads/main": oidB, "refs/heads/master": oidC}, Count: 2}, "refs/heads/main", oidB, nil, ""},
		{"unborn HEAD, master", Advertisement{Refs: map[string]string{"refs/heads/master": oidC}, Count: 3}, "refs/heads/master", oidC, nil, ""},
		{"unborn HEAD, other branches", Advertisement{Refs: map[string]string{}, Count: 3}, "", "", ErrNotFound, "no HEAD"},
		{"empty", Advertisement{Refs: map[string]string{}}, "", "", ErrEmptyRepository, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ref, oid, err := tt.adv.DefaultBranch()
			if !errors.Is(err, tt.err) || (tt.err == nil) != (err == nil) {
				t.Fatalf("error %v, want %v", err, tt.err)
			}
			if err != nil && !strings.Contains(err.Error(), tt.errMention) {
				t.Errorf("error %q, want it to mention %q", err, tt.errMention)
			}
			if ref != tt.ref || oid != tt.oid {
				t.Errorf("got %q %q, want %q %q", ref, oid, tt.ref, tt.oid)
			}
		})
	}
}

// encodeAdvertisement writes refs (HEAD first if present) as Gitaly would.
func encodeAdvertisement(caps []string, refs map[string]string) []byte {
	var b bytes.Buffer
	b.WriteString(serviceHeader)
	first := true
	line := func(oid, name string) {
		s := oid + " " + name
		if first {
			s += "\x00" + strings.Join(caps, " ")
			first = false
		}
		b.WriteString(pkt(s + "\n"))
	}
	if oid, ok := refs["HEAD"]; ok {
		line(oid, "HEAD")
	}
	for name, oid := range refs {
		if name != "HEAD" {
			line(oid, name)
		}
	}
	if first {
		line(strings.Repeat("0", 40), noRefsName)
	}
	b.WriteString(flushPkt)
	return b.Bytes()
}

// FuzzParseAdvertisement checks that the parser never panics, reads the
// same whatever the chunking, gives only well-formed refs, and reads back
// what it kept once re-encoded.
func FuzzParseAdvertisement(f *testing.F) {
	f.Add([]byte(""))
	f.Add([]byte(serviceHeader + pkt(oidA+" HEAD\x00"+caps+" symref=HEAD:refs/heads/main\n") + pkt(oidA+" refs/heads/main\n") + pkt(oidB+" refs/heads/master\n") + flushPkt))
	f.Add([]byte(serviceHeader + pkt(strings.Repeat("0", 40)+" capabilities^{}\x00"+caps+"\n") + flushPkt))
	f.Add([]byte(serviceHeader + pkt("version 1\n") + pkt(oid256+" HEAD\x00symref=HEAD:refs/heads/x\n") + pkt(oid256+" refs/heads/x\n") + pkt("shallow "+oid256+"\n") + flushPkt))
	f.Add([]byte(serviceHeader + pkt(oidT+" refs/tags/v1\n") + pkt(oidC+" refs/tags/v1^{}\n") + flushPkt))
	f.Add([]byte(serviceHeader + pkt("ERR nope") + flushPkt))
	f.Add([]byte("0001000200030004ffff"))
	f.Fuzz(func(t *testing.T, in []byte) {
		keep := func(r string) bool { return strings.HasPrefix(r, "refs/heads/") }
		adv, err := ParseAdvertisement(bytes.NewReader(in), keep)
		adv2, err2 := ParseAdvertisement(iotest.HalfReader(bytes.NewReader(in)), keep)
		if (err == nil) != (err2 == nil) || !reflect.DeepEqual(adv, adv2) {
			t.Fatalf("chunking changed the result: %+v %v, then %+v %v", adv, err, adv2, err2)
		}
		if err != nil {
			return
		}
		if len(adv.Refs) > adv.Count {
			t.Fatalf("kept %d refs of %d", len(adv.Refs), adv.Count)
		}
		for name, oid := range adv.Refs {
			if !validOID(oid) || !validRefName(name) {
				t.Fatalf("kept a malformed ref %q %q", name, oid)
			}
		}
		if (adv.Head != "") != (adv.Refs["HEAD"] != "") {
			t.Fatalf("Head %q but Refs[HEAD] %q", adv.Head, adv.Refs["HEAD"])
		}
		for _, c := range adv.Capabilities {
			if strings.ContainsAny(c, " \x00") {
				t.Fatalf("capability %q", c)
			}
		}
		if _, _, err := adv.DefaultBranch(); err != nil && !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrEmptyRepository) {
			t.Fatalf("DefaultBranch: %v", err)
		}
		// Re-encoded, what was kept reads back the same (counting only the
		// kept refs now).
		again, err := ParseAdvertisement(bytes.NewReader(encodeAdvertisement(adv.Capabilities, adv.Refs)), keep)
		if err != nil {
			t.Fatalf("re-encoded advertisement: %v", err)
		}
		if !reflect.DeepEqual(again.Refs, adv.Refs) || again.Head != adv.Head {
			t.Fatalf("re-encoded: got %+v, want the refs of %+v", again, adv)
		}
	})
}
