package wsconn

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
)

// discardCloser takes the frames a connection writes (pongs, close echoes).
type discardCloser struct{ bytes.Buffer }

func (*discardCloser) Close() error { return nil }

// frame builds one frame as a peer would send it (RFC 6455 §5.2).
func frame(fin bool, op byte, payload []byte, mask *[4]byte) []byte {
	b := []byte{op}
	if fin {
		b[0] |= finBit
	}
	var maskFlag byte
	if mask != nil {
		maskFlag = maskBit
	}
	switch n := len(payload); {
	case n < 126:
		b = append(b, maskFlag|byte(n))
	case n <= 0xffff:
		b = append(b, maskFlag|126)
		b = binary.BigEndian.AppendUint16(b, uint16(n))
	default:
		b = append(b, maskFlag|127)
		b = binary.BigEndian.AppendUint64(b, uint64(n))
	}
	p := bytes.Clone(payload)
	if mask != nil {
		b = append(b, mask[:]...)
		maskBytes(*mask, p)
	}
	return append(b, p...)
}

// referenceDecode is a second, deliberately plain reading of the frames a
// server (client=false) or client receives: the payload of the binary
// stream, and whether the input is valid up to where it ends. It follows
// RFC 6455 §5 directly rather than the connection's incremental parser.
func referenceDecode(data []byte, client bool) (payload []byte, valid bool) {
	for len(data) > 0 {
		if len(data) < 2 {
			return payload, false
		}
		b0, b1 := data[0], data[1]
		data = data[2:]
		if b0&0x70 != 0 || (b1&maskBit != 0) == client {
			return payload, false
		}
		n := uint64(b1 & 0x7f)
		switch n {
		case 126:
			if len(data) < 2 {
				return payload, false
			}
			n, data = uint64(binary.BigEndian.Uint16(data)), data[2:]
		case 127:
			if len(data) < 8 {
				return payload, false
			}
			n, data = binary.BigEndian.Uint64(data), data[8:]
			if n>>63 != 0 {
				return payload, false
			}
		}
		var key [4]byte
		if !client {
			if len(data) < 4 {
				return payload, false
			}
			copy(key[:], data)
			data = data[4:]
		}
		op := b0 & 0x0f
		control := op >= 0x8
		switch {
		case op == opText || (op > opBinary && op < opClose) || op > opPong:
			return payload, false
		case control && (b0&finBit == 0 || n > 125):
			return payload, false
		}
		if uint64(len(data)) < n {
			if control {
				return payload, false
			}
			// A data frame cut short: what arrived is delivered.
			n = uint64(len(data))
			p := bytes.Clone(data[:n])
			if !client {
				maskBytes(key, p)
			}
			return append(payload, p...), false
		}
		p := bytes.Clone(data[:n])
		data = data[n:]
		if !client {
			maskBytes(key, p)
		}
		switch op {
		case opClose:
			return payload, true
		case opBinary, opContinuation:
			payload = append(payload, p...)
		}
	}
	return payload, true
}

// FuzzNextFrame reads arbitrary bytes as the frames of a peer, in both
// roles, and holds the result to referenceDecode: the same payload bytes,
// and an error exactly when the input is not a valid (possibly closed)
// stream of frames.
func FuzzNextFrame(f *testing.F) {
	key := [4]byte{1, 2, 3, 4}
	seeds := [][]byte{
		frame(true, opBinary, []byte("hello"), &key),
		frame(false, opBinary, []byte("hel"), &key),
		append(frame(true, opPing, []byte("p"), &key), frame(true, opBinary, []byte("x"), &key)...),
		frame(true, opClose, []byte{0x03, 0xe8}, &key),
		frame(true, opBinary, make([]byte, 300), &key),
		frame(true, opBinary, make([]byte, 70000), &key),
		frame(true, opText, []byte("text"), &key),
		frame(false, opPing, nil, &key),
		frame(true, opBinary, nil, &key),
		frame(true, opBinary, []byte("unmasked"), nil),
		{0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0},
	}
	for _, s := range seeds {
		f.Add(s, false)
	}
	f.Add(frame(true, opBinary, []byte("from the server"), nil), true)
	f.Add(frame(true, opBinary, []byte("masked from the server"), &key), true)

	f.Fuzz(func(t *testing.T, data []byte, client bool) {
		out := new(discardCloser)
		c := newWSConn(out, bytes.NewReader(data), nil, client)
		got, err := io.ReadAll(c)
		want, valid := referenceDecode(data, client)
		if !bytes.Equal(got, want) {
			t.Fatalf("payload %x, reference %x", got, want)
		}
		if valid != (err == nil) {
			t.Fatalf("Read error %v, but the reference says valid=%v", err, valid)
		}
		if err != nil && !errors.Is(err, errProtocol) && !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("Read error %v is neither a protocol error nor a cut-short stream", err)
		}
		if _, again := c.Read(make([]byte, 1)); again == nil {
			t.Fatal("reading on after the end succeeded")
		}
	})
}

// FuzzWriteRead writes arbitrary payloads as one side and reads them back
// as the other, in both directions.
func FuzzWriteRead(f *testing.F) {
	f.Add([]byte("hello"), uint16(0))
	f.Add(make([]byte, 70000), uint16(1000))
	f.Add([]byte{}, uint16(3))
	f.Fuzz(func(t *testing.T, p []byte, split uint16) {
		for _, client := range []bool{true, false} {
			var wire discardCloser
			w := newWSConn(&wire, bytes.NewReader(nil), nil, client)
			// Two writes, so that the reader sees a message boundary.
			cut := min(int(split), len(p))
			if _, err := w.Write(p[:cut]); err != nil {
				t.Fatal(err)
			}
			if _, err := w.Write(p[cut:]); err != nil {
				t.Fatal(err)
			}
			r := newWSConn(new(discardCloser), bytes.NewReader(wire.Bytes()), nil, !client)
			got, err := io.ReadAll(r)
			if err != nil || !bytes.Equal(got, p) {
				t.Fatalf("client=%v: read %d bytes, %v; wrote %d", client, len(got), err, len(p))
			}
		}
	})
}
