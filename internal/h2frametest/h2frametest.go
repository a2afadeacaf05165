// Package h2frametest serves a handler with an HTTP/2 server and shows a
// test the frames it writes for one request, as a peer on the wire sees
// them: what a test needs to hold a handler to how it flushes (one write
// per answer, not one per read) without timing anything.
package h2frametest

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Frame is one frame of the request's stream as the server wrote it.
type Frame struct {
	Type      http2.FrameType
	EndStream bool
	// Data is a DATA frame's payload.
	Data []byte
}

func (f Frame) String() string {
	s := f.Type.String()
	if f.Type == http2.FrameData {
		s += fmt.Sprintf("(%d bytes)", len(f.Data))
	}
	if f.EndStream {
		s += "+END_STREAM"
	}
	return s
}

// Exchange is one request to a handler served by an HTTP/2 server over
// loopback TCP; it reads the answer's frames by itself (see Next).
type Exchange struct {
	tb     testing.TB
	conn   net.Conn
	framer *http2.Framer
	done   bool
}

// Start serves h with an HTTP/2 server (cleartext, prior knowledge) on a
// loopback connection of its own and sends a GET for path with header.
// Cleanup closes the connection.
func Start(tb testing.TB, h http.Handler, path string, header http.Header) *Exchange {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	served := make(chan struct{})
	go func() { // ends when the client's connection closes (Cleanup below)
		defer close(served)
		c, err := ln.Accept()
		ln.Close()
		if err != nil {
			return
		}
		(&http2.Server{}).ServeConn(c, &http2.ServeConnOpts{Handler: h})
	}()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		conn.Close()
		<-served
	})
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		tb.Fatal(err)
	}
	fr := http2.NewFramer(conn, conn)
	if err := fr.WriteSettings(); err != nil {
		tb.Fatal(err)
	}
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	fields := []hpack.HeaderField{
		{Name: ":method", Value: http.MethodGet}, {Name: ":scheme", Value: "http"},
		{Name: ":authority", Value: "agent"}, {Name: ":path", Value: path},
	}
	for k, vs := range header {
		for _, v := range vs {
			fields = append(fields, hpack.HeaderField{Name: strings.ToLower(k), Value: v})
		}
	}
	for _, f := range fields {
		if err := enc.WriteField(f); err != nil {
			tb.Fatal(err)
		}
	}
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block.Bytes(), EndStream: true, EndHeaders: true}); err != nil {
		tb.Fatal(err)
	}
	return &Exchange{tb: tb, conn: conn, framer: fr}
}

// Next returns the next frame the server writes on the request's stream,
// answering its SETTINGS and PINGs and skipping connection frames on the
// way. It fails the test if none comes within a minute (a handler that
// holds back what it should have flushed) or after the stream ended.
func (e *Exchange) Next() Frame {
	e.tb.Helper()
	if e.done {
		e.tb.Fatal("h2frametest: the stream has ended")
	}
	e.conn.SetReadDeadline(time.Now().Add(time.Minute))
	for {
		f, err := e.framer.ReadFrame()
		if err != nil {
			e.tb.Fatalf("h2frametest: reading the answer: %v", err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				if err := e.framer.WriteSettingsAck(); err != nil {
					e.tb.Fatal(err)
				}
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				if err := e.framer.WritePing(true, f.Data); err != nil {
					e.tb.Fatal(err)
				}
			}
		case *http2.GoAwayFrame:
			e.tb.Fatalf("h2frametest: GOAWAY %v", f.ErrCode)
		case *http2.HeadersFrame:
			if f.StreamID == 1 {
				e.done = f.StreamEnded()
				return Frame{Type: http2.FrameHeaders, EndStream: f.StreamEnded()}
			}
		case *http2.DataFrame:
			if f.StreamID == 1 {
				e.done = f.StreamEnded()
				return Frame{Type: http2.FrameData, EndStream: f.StreamEnded(), Data: bytes.Clone(f.Data())}
			}
		case *http2.RSTStreamFrame:
			if f.StreamID == 1 {
				e.done = true
				return Frame{Type: http2.FrameRSTStream, EndStream: true}
			}
		}
	}
}

// All reads the frames of the stream to its end.
func (e *Exchange) All() []Frame {
	e.tb.Helper()
	var frames []Frame
	for !e.done {
		frames = append(frames, e.Next())
	}
	return frames
}

// Answer describes an upstream answer for [Answer.Handler]: Lines lines of
// Line, each flushed, the next written only once the test has seen the
// one before (a value on Next).
type Answer struct {
	ContentType string
	// Length makes the upstream declare Content-Length; otherwise the
	// answer is chunked (HTTP/1.1) or of unknown length (HTTP/2).
	Length bool
	Lines  int
	Line   []byte
	Next   chan struct{}
}

// Handler writes the answer.
func (a Answer) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", a.ContentType)
		if a.Length {
			w.Header().Set("Content-Length", fmt.Sprint(a.Lines*len(a.Line)))
		}
		for i := range a.Lines {
			if i > 0 {
				select {
				case <-a.Next: // the test saw the line before
				case <-r.Context().Done():
					return
				case <-time.After(time.Minute):
					return // the test fails on its side
				}
			}
			w.Write(a.Line)
			http.NewResponseController(w).Flush()
		}
	})
}

// Expect reads the answer to a as the handler under test passed it on, and
// fails the test unless a single line came as HEADERS and one DATA frame
// that ends the stream (nothing flushed on its own), or several lines
// came each on its own, on the wire before the upstream wrote the next.
func (e *Exchange) Expect(a Answer) {
	e.tb.Helper()
	if f := e.Next(); f.Type != http2.FrameHeaders || f.EndStream {
		e.tb.Fatalf("first frame %v, want HEADERS", f)
	}
	if a.Lines == 1 {
		got := e.All()
		if len(got) != 1 || got[0].Type != http2.FrameData || !got[0].EndStream || len(got[0].Data) != len(a.Line) {
			e.tb.Fatalf("after HEADERS: %v; want one DATA frame of %d bytes ending the stream", got, len(a.Line))
		}
		return
	}
	for i := range a.Lines {
		var n int
		for n < len(a.Line) { // a line may come in several frames, never with the next
			f := e.Next()
			if f.Type != http2.FrameData {
				e.tb.Fatalf("line %d: %v, want DATA", i, f)
			}
			n += len(f.Data)
		}
		if n != len(a.Line) {
			e.tb.Fatalf("line %d: %d bytes before the upstream wrote the next line, want %d", i, n, len(a.Line))
		}
		if i < a.Lines-1 {
			a.Next <- struct{}{}
		}
	}
	for _, f := range e.All() {
		if f.Type != http2.FrameData || len(f.Data) != 0 {
			e.tb.Fatalf("after the last line: %v, want at most an empty DATA frame ending the stream", f)
		}
	}
}

// FlushCases are the answers a proxy must pass on: one of known length
// (in one piece), a chunked watch and an event stream of known length
// (line by line).
func FlushCases() map[string]Answer {
	line := bytes.Repeat([]byte("k"), 1<<10)
	return map[string]Answer{
		"known length":                 {ContentType: "application/json", Length: true, Lines: 1, Line: line},
		"chunked watch":                {ContentType: "application/json", Lines: 3, Line: line, Next: make(chan struct{})},
		"event stream of known length": {ContentType: "text/event-stream", Length: true, Lines: 3, Line: line, Next: make(chan struct{})},
	}
}
