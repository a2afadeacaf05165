package wsconn_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/caddy-kas/caddy-kas/tunnel/wsconn"
)

// The tunnel frames its WebSocket itself (RFC 6455 §5) to keep the hot
// path free of per-message allocations. These tests hold that framing to
// an independent implementation, github.com/coder/websocket, in both
// roles.

// testSubprotocol is what both ends agree on; wsconn serves any.
const testSubprotocol = "caddy-kas.test"

// wsPeer is one tunnel end made by us and the other by coder/websocket.
type wsPeer struct {
	ours   net.Conn
	theirs *websocket.Conn
}

// peers returns a pair for each role: ours dialing theirs, and theirs
// dialing ours.
func peers(t *testing.T) map[string]func(t *testing.T) wsPeer {
	return map[string]func(t *testing.T) wsPeer{
		"ours dials theirs": func(t *testing.T) wsPeer {
			theirs := make(chan *websocket.Conn, 1)
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{testSubprotocol}})
				if err != nil {
					t.Errorf("accept: %v", err)
					return
				}
				theirs <- ws
			}))
			t.Cleanup(srv.Close)
			ours, _, err := wsconn.Dial(t.Context(), "ws"+srv.URL[len("http"):], wsconn.DialOptions{Subprotocol: testSubprotocol})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ours.Close() })
			p := wsPeer{ours: ours, theirs: <-theirs}
			p.theirs.SetReadLimit(4 << 20)
			t.Cleanup(func() { p.theirs.CloseNow() })
			return p
		},
		"theirs dials ours": func(t *testing.T) wsPeer {
			ours := make(chan net.Conn, 1)
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				nc, err := wsconn.Accept(w, r, testSubprotocol)
				if err != nil {
					t.Errorf("accept: %v", err)
					return
				}
				ours <- nc
			}))
			t.Cleanup(srv.Close)
			ws, _, err := websocket.Dial(t.Context(), "ws"+srv.URL[len("http"):], &websocket.DialOptions{Subprotocols: []string{testSubprotocol}})
			if err != nil {
				t.Fatal(err)
			}
			ws.SetReadLimit(4 << 20)
			t.Cleanup(func() { ws.CloseNow() })
			p := wsPeer{ours: <-ours, theirs: ws}
			t.Cleanup(func() { p.ours.Close() })
			return p
		},
	}
}

func payload(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>8)
	}
	return b
}

func TestWebSocketInterop(t *testing.T) {
	// One size in each length class of RFC 6455 §5.2 and at its edges.
	sizes := []int{1, 125, 126, 4096, 65535, 65536, 1 << 20}
	for role, newPeer := range peers(t) {
		t.Run(role, func(t *testing.T) {
			p := newPeer(t)
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			defer cancel()
			for _, n := range sizes {
				want := payload(n)
				if _, err := p.ours.Write(want); err != nil {
					t.Fatalf("%d bytes: write: %v", n, err)
				}
				var got []byte
				for len(got) < n {
					typ, b, err := p.theirs.Read(ctx)
					if err != nil || typ != websocket.MessageBinary {
						t.Fatalf("%d bytes: read message: type %v, %v", n, typ, err)
					}
					got = append(got, b...)
				}
				if !bytes.Equal(got, want) {
					t.Fatalf("%d bytes: payload corrupted on the way to coder/websocket", n)
				}

				// From theirs as one message of several frames: the
				// message writer sends a frame per flush of its buffer.
				w, err := p.theirs.Writer(ctx, websocket.MessageBinary)
				if err != nil {
					t.Fatal(err)
				}
				for rest := want; len(rest) > 0; {
					k := min(len(rest), 1000)
					if _, err := w.Write(rest[:k]); err != nil {
						t.Fatalf("%d bytes: write: %v", n, err)
					}
					rest = rest[k:]
				}
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
				got = make([]byte, n)
				if _, err := io.ReadFull(p.ours, got); err != nil {
					t.Fatalf("%d bytes: read: %v", n, err)
				}
				if !bytes.Equal(got, want) {
					t.Fatalf("%d bytes: payload corrupted on the way from coder/websocket", n)
				}
			}
		})
	}
}

// TestWebSocketControlFrames: pings are answered while data flows, a text
// message is a protocol error, and a close frame ends the stream cleanly.
func TestWebSocketControlFrames(t *testing.T) {
	for role, newPeer := range peers(t) {
		t.Run(role+": ping", func(t *testing.T) {
			p := newPeer(t)
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			// coder/websocket reads pongs only while a Read runs.
			readErr := make(chan error, 1)
			go func() {
				_, _, err := p.theirs.Read(ctx)
				readErr <- err
			}()
			go io.Copy(io.Discard, p.ours) // ours answers pings while it reads
			if err := p.theirs.Ping(ctx); err != nil {
				t.Fatalf("ping: %v", err)
			}
			cancel()
			<-readErr
		})
		t.Run(role+": text message", func(t *testing.T) {
			p := newPeer(t)
			if err := p.theirs.Write(t.Context(), websocket.MessageText, []byte("not binary")); err != nil {
				t.Fatal(err)
			}
			if _, err := p.ours.Read(make([]byte, 16)); err == nil || errors.Is(err, io.EOF) {
				t.Errorf("read of a text message: %v, want a protocol error", err)
			}
		})
		t.Run(role+": close", func(t *testing.T) {
			p := newPeer(t)
			if err := p.theirs.Write(t.Context(), websocket.MessageBinary, []byte("last")); err != nil {
				t.Fatal(err)
			}
			go p.theirs.Close(websocket.StatusNormalClosure, "") // waits for our close frame
			got, err := io.ReadAll(p.ours)
			if err != nil || string(got) != "last" {
				t.Errorf("read until close: %q, %v; want %q and a clean EOF", got, err, "last")
			}
		})
	}
}
