// Package wsconn turns a WebSocket (RFC 6455) into a byte stream: the
// payloads of its binary messages, in order, as a [net.Conn]. Tunnel
// protocols run on top: our HTTP/2 tunnel (package h2tunnel) and GitLab's
// "ws-tunnel", gRPC over the same kind of stream (gitlab-wire §B.1). Each
// names itself with a WebSocket subprotocol.
//
// The framing is done here rather than by a WebSocket library, so that a
// write costs one frame, one TLS record and one system call, and an idle
// connection holds no buffer but 512 bytes; the tests hold it to
// github.com/coder/websocket.
//
// This package imports no Caddy package.
package wsconn

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/caddy-kas/caddy-kas/internal/httpheader"
)

// IsUpgrade reports whether r asks to open a WebSocket
// (RFC 6455 §4.1: "Upgrade: websocket" and "Connection: Upgrade").
func IsUpgrade(r *http.Request) bool {
	return httpheader.HasToken(r.Header, "Connection", "upgrade") && httpheader.HasToken(r.Header, "Upgrade", "websocket")
}

// Offers reports whether a WebSocket handshake request lists subprotocol
// in Sec-WebSocket-Protocol.
func Offers(r *http.Request, subprotocol string) bool {
	return httpheader.HasToken(r.Header, "Sec-WebSocket-Protocol", subprotocol)
}

// websocketGUID is appended to the handshake key (RFC 6455 §1.3).
const websocketGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

func acceptKey(key string) string {
	h := sha1.Sum([]byte(key + websocketGUID))
	return base64.StdEncoding.EncodeToString(h[:])
}

// Accept completes a WebSocket handshake with subprotocol and returns the
// byte stream it carries. The caller has already authenticated the agent
// (if its protocol does that in the handshake) and checked [Offers]. The returned conn is independent of the
// request: it lives until it is closed, so a handler must either block
// until then or hand the conn to an owner.
//
// There is no origin check: it protects browsers' cookies against
// cross-site WebSockets, and a tunnel is authenticated with a bearer token
// that a browser cannot attach to a WebSocket. There is no compression
// either: it would cost CPU on every frame and open the door to compression
// side channels, and cluster traffic worth compressing already is.
func Accept(w http.ResponseWriter, r *http.Request, subprotocol string) (net.Conn, error) {
	code, err := checkHandshake(r, subprotocol)
	if err != nil {
		if code == http.StatusUpgradeRequired || code == http.StatusBadRequest {
			w.Header().Set("Sec-WebSocket-Version", "13")
		}
		http.Error(w, err.Error(), code)
		return nil, fmt.Errorf("accepting tunnel websocket: %w", err)
	}
	h := w.Header()
	h.Set("Upgrade", "websocket")
	h.Set("Connection", "Upgrade")
	h.Set("Sec-WebSocket-Accept", acceptKey(strings.TrimSpace(r.Header.Get("Sec-WebSocket-Key"))))
	h.Set("Sec-WebSocket-Protocol", subprotocol)
	w.WriteHeader(http.StatusSwitchingProtocols)
	nc, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return nil, fmt.Errorf("accepting tunnel websocket: hijacking the connection: %w", err)
	}
	if err := brw.Writer.Flush(); err != nil { // the 101, if still buffered
		nc.Close()
		return nil, fmt.Errorf("accepting tunnel websocket: %w", err)
	}
	// Clear any deadline the server set for the handshake request.
	nc.SetDeadline(time.Time{})
	var rd io.Reader = nc
	if n := brw.Reader.Buffered(); n > 0 { // frames sent right after the handshake
		early, _ := brw.Reader.Peek(n)
		rd = io.MultiReader(bytes.NewReader(bytes.Clone(early)), nc)
	}
	return newWSConn(nc, rd, nc, false), nil
}

// checkHandshake checks a WebSocket handshake request (RFC 6455 §4.2.1).
func checkHandshake(r *http.Request, subprotocol string) (int, error) {
	switch {
	case r.ProtoMajor != 1 || !r.ProtoAtLeast(1, 1):
		return http.StatusUpgradeRequired, fmt.Errorf("websocket handshake over %s; HTTP/1.1 is required", r.Proto)
	case !IsUpgrade(r):
		return http.StatusUpgradeRequired, errors.New("not a websocket upgrade")
	case r.Method != http.MethodGet:
		return http.StatusMethodNotAllowed, fmt.Errorf("websocket handshake with method %s", r.Method)
	case r.Header.Get("Sec-WebSocket-Version") != "13":
		return http.StatusBadRequest, errors.New("unsupported websocket version: only 13 is supported")
	case !Offers(r, subprotocol):
		return http.StatusBadRequest, fmt.Errorf("client did not offer subprotocol %q", subprotocol)
	}
	keys := r.Header.Values("Sec-WebSocket-Key")
	if len(keys) != 1 {
		return http.StatusBadRequest, errors.New("want exactly one Sec-WebSocket-Key")
	}
	if k, err := base64.StdEncoding.DecodeString(strings.TrimSpace(keys[0])); err != nil || len(k) != 16 {
		return http.StatusBadRequest, errors.New("malformed Sec-WebSocket-Key")
	}
	return 0, nil
}

// DialOptions configure [Dial].
type DialOptions struct {
	// HTTPClient makes the handshake request; its transport decides TLS
	// settings and proxies. Nil means http.DefaultClient.
	HTTPClient *http.Client
	// Header is sent with the handshake: for our agentk the agent token in
	// Authorization, the agent's metadata and any extra headers.
	Header http.Header
	// Subprotocol is the one WebSocket subprotocol offered; the server
	// must choose it. Required.
	Subprotocol string
}

// maxRefusalBody is how much of a refused handshake's body [Dial] keeps.
const maxRefusalBody = 1024

// Dial opens a WebSocket to KAS at url (ws:// or wss://) and returns the
// byte stream it carries. On a refused handshake it also returns KAS's response,
// whose status tells why (401: the token was refused); up to 1 KiB of its
// body can be read.
func Dial(ctx context.Context, url string, o DialOptions) (net.Conn, *http.Response, error) {
	conn, resp, err := dial(ctx, url, o)
	if err != nil {
		return nil, resp, fmt.Errorf("dialing %s: %w", url, err)
	}
	return conn, resp, nil
}

func dial(ctx context.Context, rawURL string, o DialOptions) (net.Conn, *http.Response, error) {
	httpURL := rawURL
	switch {
	case strings.HasPrefix(strings.ToLower(rawURL), "ws://"):
		httpURL = "http://" + rawURL[len("ws://"):]
	case strings.HasPrefix(strings.ToLower(rawURL), "wss://"):
		httpURL = "https://" + rawURL[len("wss://"):]
	default:
		return nil, nil, errors.New("the url scheme must be ws or wss")
	}
	if o.Subprotocol == "" {
		return nil, nil, errors.New("no subprotocol to offer")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, httpURL, nil)
	if err != nil {
		return nil, nil, err
	}
	var k [16]byte
	rand.Read(k[:])
	key := base64.StdEncoding.EncodeToString(k[:])
	req.Header = o.Header.Clone()
	if req.Header == nil {
		req.Header = make(http.Header)
	}
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("Sec-WebSocket-Key", key)
	req.Header.Set("Sec-WebSocket-Protocol", o.Subprotocol)
	client := o.HTTPClient
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, nil, err
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, maxRefusalBody))
		resp.Body.Close()
		resp.Body = io.NopCloser(bytes.NewReader(body))
		return nil, resp, fmt.Errorf("expected handshake response status 101 but got %d", resp.StatusCode)
	}
	rwc, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		resp.Body.Close()
		return nil, resp, fmt.Errorf("the handshake response body is a %T, not a connection", resp.Body)
	}
	h := resp.Header
	var problem string
	switch {
	case !httpheader.HasToken(h, "Connection", "upgrade") || !httpheader.HasToken(h, "Upgrade", "websocket"):
		problem = "the server did not switch to websocket"
	case h.Get("Sec-WebSocket-Accept") != acceptKey(key):
		problem = "invalid Sec-WebSocket-Accept"
	case h.Get("Sec-WebSocket-Protocol") != o.Subprotocol:
		problem = fmt.Sprintf("server did not agree to subprotocol %q", o.Subprotocol)
	case h.Get("Sec-WebSocket-Extensions") != "":
		problem = "server chose an extension that was not offered"
	}
	if problem != "" {
		rwc.Close()
		resp.Body = http.NoBody
		return nil, resp, errors.New(problem)
	}
	return newWSConn(rwc, rwc, nil, true), resp, nil
}

// WebSocket framing (RFC 6455 §5.2).
const (
	opContinuation = 0x0
	opText         = 0x1
	opBinary       = 0x2
	opClose        = 0x8
	opPing         = 0x9
	opPong         = 0xa

	finBit  = 0x80
	maskBit = 0x80

	// maxHeader is the longest frame header: 2 bytes, 8 of length, 4 of
	// mask key.
	maxHeader = 14
	// writeChunk is how much of a frame is handed to the connection in
	// one write: one TLS record is at most 16 KiB, and a few records per
	// write keep both the copy and the number of writes small.
	writeChunk = 64 << 10
	// readBufferSize is the read buffer under the frame parser, which
	// every connection keeps for its life. Frame headers go through it;
	// payload reads at least this large bypass it, and the HTTP/2 code
	// above reads through a buffer of its own, so it can be small.
	readBufferSize = 512
)

// writeBuffers hold frames being written. They are pooled rather than
// kept per connection, so that an idle tunnel holds none.
var writeBuffers = sync.Pool{New: func() any { b := make([]byte, 0, maxHeader+writeChunk); return &b }}

// wsConn is the byte stream of a tunnel WebSocket: every Write is sent as
// one binary message of one frame, and Read returns the payload of the
// binary messages received, in order, whatever their framing. Pings are
// answered, a close frame ends the stream (io.EOF), and text frames are a
// protocol error. Only the framing of RFC 6455 is implemented: the tunnel
// negotiates no extension.
//
// Read and Write are each safe for one goroutine at a time, and may run
// concurrently with each other and with Close; this is what net/http's
// HTTP/2 code needs of a net.Conn.
type wsConn struct {
	rwc io.ReadWriteCloser
	nc  net.Conn // rwc as a net.Conn, for deadlines and addresses; nil after Dial
	// client is true on the dialing side, whose frames are masked
	// (RFC 6455 §5.3) and which must not receive masked frames.
	client bool

	rmu       sync.Mutex // guards the read state below
	br        *bufio.Reader
	remaining uint64  // payload bytes left in the current data frame
	masked    bool    // whether the current frame is masked
	maskKey   [4]byte // its mask key, rotated by the bytes already read
	readErr   error   // sticky: once reading failed, it keeps failing
	hdr       [maxHeader]byte
	ctrl      [125]byte // payload of a control frame

	wmu      sync.Mutex // guards writeErr and writes to rwc
	writeErr error      // sticky: once writing failed, it keeps failing

	closeOnce sync.Once
	closeErr  error
	closed    chan struct{} // closed by Close

	dmu sync.Mutex // guards the timers, used when nc is nil
	// readTimer and writeTimer close the connection when their deadline
	// passes.
	readTimer, writeTimer *time.Timer
}

// newWSConn wraps a connection whose WebSocket handshake is done. Reads
// come from rd (rwc, or rwc behind bytes read with the handshake), writes
// go to rwc. nc is rwc as a net.Conn, or nil when the handshake did not
// give one out (an http.Client's 101 response).
func newWSConn(rwc io.ReadWriteCloser, rd io.Reader, nc net.Conn, client bool) *wsConn {
	return &wsConn{
		rwc:    rwc,
		nc:     nc,
		client: client,
		br:     bufio.NewReaderSize(rd, readBufferSize),
		closed: make(chan struct{}),
	}
}

// errProtocol is wrapped by errors about frames RFC 6455 forbids.
var errProtocol = errors.New("websocket protocol error")

// Read reads payload bytes of binary messages.
func (c *wsConn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if c.readErr != nil {
		return 0, c.readErr
	}
	for c.remaining == 0 {
		if err := c.nextFrame(); err != nil {
			c.readErr = err
			return 0, err
		}
	}
	if uint64(len(p)) > c.remaining {
		p = p[:c.remaining]
	}
	n, err := c.br.Read(p)
	c.remaining -= uint64(n)
	if c.masked {
		maskBytes(c.maskKey, p[:n])
		c.maskKey = rotate(c.maskKey, n)
	}
	if err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF // the frame was cut short
		}
		c.readErr = err
		if n > 0 {
			return n, nil // the error comes with the next Read
		}
	}
	return n, err
}

// nextFrame reads frame headers, handling control frames, until a data
// frame starts. It returns io.EOF when the peer closed the WebSocket.
func (c *wsConn) nextFrame() error {
	for {
		h := c.hdr[:]
		if _, err := io.ReadFull(c.br, h[:2]); err != nil {
			return err
		}
		if h[0]&0x70 != 0 {
			return fmt.Errorf("%w: reserved bits set without an extension", errProtocol)
		}
		fin, op := h[0]&finBit != 0, h[0]&0x0f
		masked := h[1]&maskBit != 0
		if masked == c.client {
			if c.client {
				return fmt.Errorf("%w: masked frame from the server", errProtocol)
			}
			return fmt.Errorf("%w: unmasked frame from the client", errProtocol)
		}
		length := uint64(h[1] & 0x7f)
		switch length {
		case 126:
			if _, err := io.ReadFull(c.br, h[2:4]); err != nil {
				return unexpected(err)
			}
			length = uint64(binary.BigEndian.Uint16(h[2:4]))
		case 127:
			if _, err := io.ReadFull(c.br, h[2:10]); err != nil {
				return unexpected(err)
			}
			length = binary.BigEndian.Uint64(h[2:10])
			if length>>63 != 0 {
				return fmt.Errorf("%w: frame length out of range", errProtocol)
			}
		}
		var key [4]byte
		if masked {
			if _, err := io.ReadFull(c.br, key[:]); err != nil {
				return unexpected(err)
			}
		}
		switch op {
		case opBinary, opContinuation:
			c.remaining, c.masked, c.maskKey = length, masked, key
			if c.remaining > 0 {
				return nil
			}
			continue // an empty frame: nothing to return
		case opText:
			return fmt.Errorf("%w: text message on a binary tunnel", errProtocol)
		case opClose, opPing, opPong:
		default:
			return fmt.Errorf("%w: unknown opcode %d", errProtocol, op)
		}
		if !fin || length > uint64(len(c.ctrl)) {
			return fmt.Errorf("%w: fragmented or oversized control frame", errProtocol)
		}
		payload := c.ctrl[:length]
		if _, err := io.ReadFull(c.br, payload); err != nil {
			return unexpected(err)
		}
		if masked {
			maskBytes(key, payload)
		}
		switch op {
		case opPing:
			if err := c.writeFrame(opPong, payload); err != nil {
				return err
			}
		case opClose:
			// Echo the status code, as RFC 6455 §5.5.1 asks, then end
			// the stream; the caller closes the connection.
			var code []byte
			if len(payload) >= 2 {
				code = payload[:2]
			}
			c.writeFrame(opClose, code)
			return io.EOF
		}
	}
}

func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// Write sends p as one binary message.
func (c *wsConn) Write(p []byte) (int, error) {
	if err := c.writeFrame(opBinary, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// writeFrame writes one final frame. The header and as much of the
// payload as fits go to the connection in one write, so that a small
// message is one TLS record and one system call.
func (c *wsConn) writeFrame(op byte, p []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.writeErr != nil {
		return c.writeErr
	}
	bp := writeBuffers.Get().(*[]byte)
	defer writeBuffers.Put(bp)
	buf := (*bp)[:maxHeader]
	buf[0] = finBit | op
	n := 2
	switch l := len(p); {
	case l <= 125:
		buf[1] = byte(l)
	case l <= 0xffff:
		buf[1] = 126
		binary.BigEndian.PutUint16(buf[2:], uint16(l))
		n = 4
	default:
		buf[1] = 127
		binary.BigEndian.PutUint64(buf[2:], uint64(l))
		n = 10
	}
	var key [4]byte
	if c.client {
		buf[1] |= maskBit
		rand.Read(key[:])
		copy(buf[n:], key[:])
		n += 4
	}
	buf = buf[:n]
	for first := true; first || len(p) > 0; first = false {
		m := min(len(p), writeChunk)
		start := len(buf)
		buf = append(buf, p[:m]...)
		if c.client {
			maskBytes(key, buf[start:])
			key = rotate(key, m)
		}
		p = p[m:]
		if _, err := c.rwc.Write(buf); err != nil {
			c.writeErr = err
			return err
		}
		buf = buf[:0]
	}
	return nil
}

// maskBytes XORs b with the mask key, starting at the key's first byte
// (RFC 6455 §5.3).
func maskBytes(key [4]byte, b []byte) {
	k32 := binary.LittleEndian.Uint32(key[:])
	k64 := uint64(k32) | uint64(k32)<<32
	for len(b) >= 8 {
		binary.LittleEndian.PutUint64(b, binary.LittleEndian.Uint64(b)^k64)
		b = b[8:]
	}
	for i := range b {
		b[i] ^= key[i&3]
	}
}

// rotate returns the key for masking bytes that follow n masked bytes.
func rotate(key [4]byte, n int) [4]byte {
	s := n & 3
	return [4]byte{key[s], key[(s+1)&3], key[(s+2)&3], key[(s+3)&3]}
}

// Close closes the connection at once, without the WebSocket closing
// handshake: by the time a tunnel is closed the HTTP/2 layer above has
// already said goodbye (GOAWAY) or found the peer dead, so waiting for the
// peer's close frame buys nothing.
func (c *wsConn) Close() error {
	c.closeOnce.Do(func() {
		close(c.closed)
		c.closeErr = c.rwc.Close()
		c.dmu.Lock()
		for _, t := range []*time.Timer{c.readTimer, c.writeTimer} {
			if t != nil {
				t.Stop()
			}
		}
		c.dmu.Unlock()
	})
	return c.closeErr
}

// wsAddr is the address of a tunnel whose connection is not at hand.
type wsAddr struct{}

func (wsAddr) Network() string { return "websocket" }
func (wsAddr) String() string  { return "websocket" }

func (c *wsConn) LocalAddr() net.Addr {
	if c.nc != nil {
		return c.nc.LocalAddr()
	}
	return wsAddr{}
}

func (c *wsConn) RemoteAddr() net.Addr {
	if c.nc != nil {
		return c.nc.RemoteAddr()
	}
	return wsAddr{}
}

// SetDeadline sets the deadlines of the connection under the WebSocket.
// When that connection is not at hand (the dialing side), a deadline that
// passes closes the tunnel, which is what a deadline means to HTTP/2.
func (c *wsConn) SetDeadline(t time.Time) error {
	if c.nc != nil {
		return c.nc.SetDeadline(t)
	}
	return errors.Join(c.setTimer(&c.readTimer, t), c.setTimer(&c.writeTimer, t))
}

// SetReadDeadline sets the read deadline; see SetDeadline.
func (c *wsConn) SetReadDeadline(t time.Time) error {
	if c.nc != nil {
		return c.nc.SetReadDeadline(t)
	}
	return c.setTimer(&c.readTimer, t)
}

// SetWriteDeadline sets the write deadline; see SetDeadline.
func (c *wsConn) SetWriteDeadline(t time.Time) error {
	if c.nc != nil {
		return c.nc.SetWriteDeadline(t)
	}
	return c.setTimer(&c.writeTimer, t)
}

// setTimer replaces the timer *tp with one that closes the connection at
// t; a zero t clears it.
func (c *wsConn) setTimer(tp **time.Timer, t time.Time) error {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	if *tp != nil {
		(*tp).Stop()
		*tp = nil
	}
	if t.IsZero() {
		return nil
	}
	select {
	case <-c.closed:
		return net.ErrClosed
	default:
	}
	*tp = time.AfterFunc(time.Until(t), func() { c.Close() })
	return nil
}

var _ net.Conn = (*wsConn)(nil)
