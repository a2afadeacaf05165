package h2tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-kas/caddy-kas/tunnel"
)

// Defaults of [Options].
const (
	// DefaultKeepaliveInterval is how long a side waits without receiving a
	// frame before it sends an HTTP/2 PING (RFC 9113 §6.7). Ten seconds
	// finds a dead peer quickly and is well below the 30–60 s idle timeouts
	// of common load balancers, which the PINGs also keep from firing.
	DefaultKeepaliveInterval = 10 * time.Second
	// DefaultKeepaliveTimeout is how long a PING may go unanswered before
	// the connection is declared dead and closed.
	DefaultKeepaliveTimeout = 5 * time.Second

	// streamWindow is the HTTP/2 receive window of one stream, on both
	// sides. It bounds what one stalled reader can make the other side
	// buffer, and it must cover bandwidth × RTT for a single stream to run
	// at full speed: 4 MiB is 330 Mbit/s at 100 ms. It is also the default
	// of Go's HTTP/2 client.
	streamWindow = 4 << 20
	// connWindow is the receive window of the whole connection. It must be
	// much larger than streamWindow: the connection window is only given
	// back as data is read, so if it were small, a few stalled streams
	// would use it up and block every other stream (head-of-line blocking).
	// 1 GiB lets 256 streams stall at once without affecting the rest;
	// memory is only used for data actually buffered.
	connWindow = 1 << 30
	// maxStreams is how many concurrent requests agentk accepts on one
	// connection (SETTINGS_MAX_CONCURRENT_STREAMS). Go's default of 250 is
	// too low for an agent that carries many long watches; KAS waits for a
	// free slot beyond this.
	maxStreams = 10000
	// maxFrameSize is the largest HTTP/2 frame either side accepts
	// (SETTINGS_MAX_FRAME_SIZE). Larger frames mean fewer frame headers and
	// fewer WebSocket messages per MiB of body.
	maxFrameSize = 1 << 20
)

// Options tune the HTTP/2 connection inside a tunnel. The zero value uses
// the defaults.
type Options struct {
	// KeepaliveInterval is how long to wait without receiving a frame before
	// sending a PING. Zero means [DefaultKeepaliveInterval].
	KeepaliveInterval time.Duration
	// KeepaliveTimeout is how long a PING may go unanswered before the
	// connection is closed. Zero means [DefaultKeepaliveTimeout].
	KeepaliveTimeout time.Duration
}

func (o Options) http2Config() *http.HTTP2Config {
	interval, timeout := o.KeepaliveInterval, o.KeepaliveTimeout
	if interval <= 0 {
		interval = DefaultKeepaliveInterval
	}
	if timeout <= 0 {
		timeout = DefaultKeepaliveTimeout
	}
	return &http.HTTP2Config{
		MaxConcurrentStreams:          maxStreams,
		MaxReadFrameSize:              maxFrameSize,
		MaxReceiveBufferPerConnection: connWindow,
		MaxReceiveBufferPerStream:     streamWindow,
		SendPingTimeout:               interval,
		PingTimeout:                   timeout,
	}
}

func h2cOnly() *http.Protocols {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	return &p
}

// Conn is one tunnel connection on the KAS side, a [tunnel.Tunnel]. It
// sends requests to agentk, each on its own HTTP/2 stream, and is safe for
// concurrent use.
type Conn struct {
	info        tunnel.AgentInfo
	connectedAt time.Time
	cc          *http.ClientConn
	nc          net.Conn

	done      chan struct{} // closed once the connection is unusable
	closeOnce sync.Once

	afterMu    sync.Mutex // guards the fields below
	afterDone  []func()   // run by markDone; nil once they ran
	afterRan   bool       // whether markDone ran them
	afterReady []func()   // run by markReady; nil once they ran
	readyRan   bool       // whether markReady ran them

	// active counts requests sent and not yet finished (response body
	// closed or request failed). Unlike cc.InFlight it also counts requests
	// that are waiting for a free stream slot.
	active atomic.Int64
	// moving is set once KAS asked the agent to move ([Conn.Move]).
	moving atomic.Bool
}

// connKey carries the net.Conn to dialFromContext.
type connKey struct{}

// clientTransport turns an existing net.Conn into an HTTP/2 client
// connection: NewClientConn "dials" by taking the conn out of the context.
// One transport serves every connection with the same options.
func clientTransport(o Options) *http.Transport {
	return &http.Transport{
		Protocols: h2cOnly(),
		HTTP2:     o.http2Config(),
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			nc, ok := ctx.Value(connKey{}).(net.Conn)
			if !ok {
				return nil, errors.New("tunnel: no connection in context")
			}
			return nc, nil
		},
		// The tunnel carries what the cluster sends; never rewrite it.
		DisableCompression: true,
	}
}

// transports caches one client transport per Options value.
var transports sync.Map // Options -> *http.Transport

// NewConn starts the HTTP/2 client side of a tunnel on nc, which carries
// the agent described by info. It writes the HTTP/2 connection preface and
// settings and returns without waiting for the agent's answer
// ([Conn.AfterReady] tells when it came). The Conn owns nc from then on.
func NewConn(nc net.Conn, info tunnel.AgentInfo, o Options) (*Conn, error) {
	tr, _ := transports.LoadOrStore(o, clientTransport(o))
	c := &Conn{info: info, connectedAt: time.Now(), nc: nc, done: make(chan struct{})}
	watched := &prefaceWatcher{Conn: nc, onPreface: c.markReady}
	ctx := context.WithValue(context.Background(), connKey{}, net.Conn(watched))
	cc, err := tr.(*http.Transport).NewClientConn(ctx, "http", "agent:80")
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("starting http/2 on tunnel of agent %d: %w", info.ID, err)
	}
	c.cc = cc
	// The hook runs whenever the connection's state changes, including
	// when it dies on its own (peer gone, PING unanswered).
	cc.SetStateHook(func(cc *http.ClientConn) {
		if cc.Err() != nil {
			c.markDone()
		}
	})
	if cc.Err() != nil { // died before the hook was set
		c.markDone()
	}
	return c, nil
}

func (c *Conn) markDone() {
	c.closeOnce.Do(func() {
		close(c.done)
		c.afterMu.Lock()
		fs := c.afterDone
		c.afterDone, c.afterRan = nil, true
		c.afterMu.Unlock()
		// Each in its own goroutine: markDone runs inside the HTTP/2
		// client's state hook, where a callback must not block.
		for _, f := range fs {
			go f()
		}
	})
}

// markReady runs the AfterReady callbacks, once.
func (c *Conn) markReady() {
	c.afterMu.Lock()
	if c.readyRan {
		c.afterMu.Unlock()
		return
	}
	fs := c.afterReady
	c.afterReady, c.readyRan = nil, true
	c.afterMu.Unlock()
	// Each in its own goroutine: markReady runs in the HTTP/2 client's
	// read loop, which a callback must not hold up.
	for _, f := range fs {
		go f()
	}
}

// AfterReady arranges for f to run in a goroutine of its own once the
// agent's first HTTP/2 frame, its SETTINGS, has arrived (RFC 9113 §3.4:
// the server connection preface), or at once if it has. Until then the
// other end has not shown it is an HTTP/2 server that is alive: a
// connection that upgraded and went silent would take requests only to
// fail them once keepalive gives up. f never runs for a connection that
// ends first.
func (c *Conn) AfterReady(f func()) {
	c.afterMu.Lock()
	if !c.readyRan {
		c.afterReady = append(c.afterReady, f)
		c.afterMu.Unlock()
		return
	}
	c.afterMu.Unlock()
	go f()
}

// AfterDone implements [tunnel.Tunnel].
func (c *Conn) AfterDone(f func()) {
	c.afterMu.Lock()
	if !c.afterRan {
		c.afterDone = append(c.afterDone, f)
		c.afterMu.Unlock()
		return
	}
	c.afterMu.Unlock()
	go f()
}

// Agent returns what KAS knows about the agent at the other end.
func (c *Conn) Agent() tunnel.AgentInfo { return c.info }

// ConnectedAt is when the connection was established.
func (c *Conn) ConnectedAt() time.Time { return c.connectedAt }

// Done is closed when the connection can no longer carry requests.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err reports why the connection is unusable, or nil while it is usable.
func (c *Conn) Err() error {
	select {
	case <-c.done:
		if err := c.cc.Err(); err != nil {
			return err
		}
		return net.ErrClosed
	default:
		return nil
	}
}

// Load is the number of requests using or waiting for the connection.
func (c *Conn) Load() int64 { return c.active.Load() }

// Close closes the connection. Requests in flight fail at once.
func (c *Conn) Close() error {
	err := c.cc.Close()
	c.nc.Close()
	c.markDone()
	return err
}

// Move implements [tunnel.Movable]: it asks agentk, with a request that
// carries [MoveHeader], to open a new tunnel while this one carries on.
// An agentk that does not know the request forwards it to its cluster,
// which refuses it; Move then reports an error and the tunnel simply
// closes once idle.
func (c *Conn) Move(ctx context.Context) error {
	c.moving.Store(true)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://agent/", http.NoBody)
	if err != nil {
		return fmt.Errorf("asking agent %d to move: %w", c.info.ID, err)
	}
	req.Header.Set(MoveHeader, "1")
	resp, err := c.cc.RoundTrip(req)
	if err != nil {
		return fmt.Errorf("asking agent %d to move: %w", c.info.ID, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		return fmt.Errorf("asking agent %d to move: agentk answered %s", c.info.ID, resp.Status)
	}
	return nil
}

// Moving implements [tunnel.Movable].
func (c *Conn) Moving() bool { return c.moving.Load() }

// RoundTrip implements [tunnel.Tunnel]: it sends req to the agent on a new
// HTTP/2 stream, with the identity and upgrade encoded in this protocol's
// headers (see the package documentation). The response body streams;
// closing it (or cancelling the request's context) resets the stream.
func (c *Conn) RoundTrip(req *tunnel.Request) (*http.Response, error) {
	out := encodeRequest(req)
	c.active.Add(1)
	resp, err := c.cc.RoundTrip(out)
	if err != nil {
		c.active.Add(-1)
		return nil, fmt.Errorf("agent %d: %w", c.info.ID, err)
	}
	resp.Body = &countedBody{ReadCloser: resp.Body, active: &c.active}
	if req.Upgrade != "" {
		decodeSwitched(resp)
	}
	return resp, nil
}

// countedBody releases its request's place in Conn.active once closed.
type countedBody struct {
	io.ReadCloser
	active *atomic.Int64
	once   sync.Once
}

func (b *countedBody) Close() error {
	b.once.Do(func() { b.active.Add(-1) })
	return b.ReadCloser.Close()
}

// prefaceWatcher passes a connection's bytes through and calls onPreface
// once the first frame header the peer sent is complete and is that of a
// SETTINGS frame without ACK (RFC 9113 §3.4, §6.5). Only the HTTP/2 read
// loop reads, one Read at a time, so the header needs no lock.
type prefaceWatcher struct {
	net.Conn
	onPreface func()
	seen      atomic.Bool // the first frame header is complete
	head      [frameHeaderLen]byte
	n         int
}

// frameHeaderLen is the length of an HTTP/2 frame header (RFC 9113 §4.1).
const frameHeaderLen = 9

// HTTP/2 frame type and flag of the server connection preface.
const (
	frameTypeSettings = 0x4
	flagSettingsAck   = 0x1
)

func (w *prefaceWatcher) Read(p []byte) (int, error) {
	n, err := w.Conn.Read(p)
	if n > 0 && !w.seen.Load() {
		w.n += copy(w.head[w.n:], p[:n])
		if w.n == frameHeaderLen {
			w.seen.Store(true)
			if w.head[3] == frameTypeSettings && w.head[4]&flagSettingsAck == 0 {
				w.onPreface()
			}
		}
	}
	return n, err
}

var _ tunnel.Movable = (*Conn)(nil)
