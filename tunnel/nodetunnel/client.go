package nodetunnel

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"

	"github.com/caddy-kas/caddy-kas/tunnel"
)

// ErrNoTunnel is wrapped when the node asked holds no tunnel of the agent.
var ErrNoTunnel = errors.New("node has no tunnel of the agent")

// Timeouts of the connections between nodes. A node that died must cost a
// moment, not a request's whole wait: the dial is bounded, and pings find a
// connection whose peer vanished without a FIN.
const (
	dialTimeout     = 2 * time.Second
	readIdleTimeout = 30 * time.Second
	pingTimeout     = 10 * time.Second
	// unusedTimeout closes a ready stream no request was sent on (its
	// finder's caller went away).
	unusedTimeout = 30 * time.Second
	// idleConnTimeout closes a connection that carried no stream for this
	// long, as net/http's DefaultTransport does: the pings keep a
	// connection to a live node open for ever otherwise, and a Client
	// left behind by a configuration reload, or a node URL no longer in
	// use, would keep its connections.
	idleConnTimeout = 90 * time.Second
)

// Client opens streams to other nodes' private listeners. Its zero value
// is not usable: Secret must be set. It is safe for concurrent use.
type Client struct {
	// Secret is the private secret shared by the nodes.
	Secret []byte
	// TLS configures connections to https:// and grpcs:// nodes (root
	// CAs, server name); nil means the system's roots and the URL's host.
	TLS *tls.Config
	// Now tells the time for tokens; nil means time.Now.
	Now func() time.Time

	mu         sync.Mutex // guards transports
	transports map[string]*http2.Transport

	tokenMu sync.Mutex // guards tokens
	tokens  map[int64]signedToken
}

// signedToken is a token kept for reuse: signing one per request cost a
// tenth of the forwarding node's CPU (docs/benchmarks.md), and a token is
// good for jwtValidity.
type signedToken struct {
	token    string
	signedAt time.Time
}

// tokenReuse is how long a signed token is reused: well within its
// validity, so that it is still good when the other node checks it.
const tokenReuse = jwtValidity / 2

// maxCachedTokens bounds the tokens kept, one per agent.
const maxCachedTokens = 10_000

// token returns a token for agentID, reusing one signed less than
// tokenReuse ago.
func (c *Client) token(agentID int64) (string, error) {
	now := c.now()
	c.tokenMu.Lock()
	defer c.tokenMu.Unlock()
	if t, ok := c.tokens[agentID]; ok && now.Sub(t.signedAt) < tokenReuse && !now.Before(t.signedAt) {
		return t.token, nil
	}
	token, err := signToken(c.Secret, agentID, now)
	if err != nil {
		return "", err
	}
	if c.tokens == nil || len(c.tokens) >= maxCachedTokens {
		c.tokens = make(map[int64]signedToken)
	}
	c.tokens[agentID] = signedToken{token: token, signedAt: now}
	return token, nil
}

func (c *Client) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

// transport returns the HTTP/2 transport for a node URL and the base URL
// requests go to. Node URLs: grpc:// or http:// (HTTP/2 without TLS),
// grpcs:// or https:// (TLS), unix:///path or unix:/path (HTTP/2 without TLS
// on a unix socket). There is one transport, with its connection, per node.
func (c *Client) transport(nodeURL string) (*http2.Transport, string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if t := c.transports[nodeURL]; t != nil {
		return t, baseURL(nodeURL), nil
	}
	u, err := url.Parse(nodeURL)
	if err != nil {
		return nil, "", fmt.Errorf("node URL %q: %w", nodeURL, err)
	}
	d := &net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}
	t := &http2.Transport{ReadIdleTimeout: readIdleTimeout, PingTimeout: pingTimeout, IdleConnTimeout: idleConnTimeout}
	switch u.Scheme {
	case "grpc", "http":
		t.AllowHTTP = true
		t.DialTLSContext = func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		}
	case "grpcs", "https":
		cfg := &tls.Config{MinVersion: tls.VersionTLS12}
		if c.TLS != nil {
			cfg = c.TLS.Clone()
		}
		cfg.NextProtos = []string{"h2"}
		t.TLSClientConfig = cfg
		t.DialTLSContext = func(ctx context.Context, network, addr string, cfg *tls.Config) (net.Conn, error) {
			td := &tls.Dialer{NetDialer: d, Config: cfg}
			return td.DialContext(ctx, network, addr)
		}
	case "unix":
		path := u.Path
		if path == "" {
			path = u.Opaque
		}
		if path == "" {
			return nil, "", fmt.Errorf("node URL %q: no socket path", nodeURL)
		}
		t.AllowHTTP = true
		t.DialTLSContext = func(ctx context.Context, _, _ string, _ *tls.Config) (net.Conn, error) {
			return d.DialContext(ctx, "unix", path)
		}
	default:
		return nil, "", fmt.Errorf("node URL %q: scheme must be grpc, grpcs, http, https or unix", nodeURL)
	}
	if c.transports == nil {
		c.transports = make(map[string]*http2.Transport)
	}
	c.transports[nodeURL] = t
	return t, baseURL(nodeURL), nil
}

// baseURL is the http(s) URL requests to a node go to.
func baseURL(nodeURL string) string {
	scheme, rest, _ := strings.Cut(nodeURL, "://")
	switch scheme {
	case "grpcs", "https":
		return "https://" + strings.TrimSuffix(rest, "/")
	case "unix":
		return "http://node"
	}
	if strings.HasPrefix(nodeURL, "unix:") {
		return "http://node"
	}
	return "http://" + strings.TrimSuffix(rest, "/")
}

// CloseIdleConnections closes the connections to nodes that carry no
// stream.
func (c *Client) CloseIdleConnections() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, t := range c.transports {
		t.CloseIdleConnections()
	}
}

// Open asks the node at nodeURL for a tunnel of agentID. It returns a
// [Remote] ready to carry one request once the node said it has one, or an
// error wrapping [ErrNoTunnel] if it has none. ctx bounds the asking; the
// Remote, once returned, lives until its request is done or it is closed.
func (c *Client) Open(ctx context.Context, nodeURL string, agentID int64) (*Remote, error) {
	t, base, err := c.transport(nodeURL)
	if err != nil {
		return nil, err
	}
	token, err := c.token(agentID)
	if err != nil {
		return nil, err
	}
	streamCtx, cancel := context.WithCancel(context.Background())
	stopCancelOnCtx := context.AfterFunc(ctx, cancel)
	pr, pw := io.Pipe()
	req, err := http.NewRequestWithContext(streamCtx, http.MethodPost, base+Path, pr)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("node %s: %w", nodeURL, err)
	}
	req.ContentLength = -1
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set(headerAgentID, strconv.FormatInt(agentID, 10))
	resp, err := t.RoundTrip(req)
	if !stopCancelOnCtx() {
		// ctx ended while asking: the stream is cancelled.
		if err == nil {
			resp.Body.Close()
		}
		pw.Close()
		return nil, fmt.Errorf("node %s: %w", nodeURL, context.Cause(ctx))
	}
	if err != nil {
		cancel()
		pw.Close()
		return nil, fmt.Errorf("node %s: %w", nodeURL, err)
	}
	if resp.StatusCode != http.StatusOK || resp.Header.Get(headerTunnel) != "ready" {
		resp.Body.Close()
		cancel()
		pw.Close()
		if resp.StatusCode == http.StatusNotFound && resp.Header.Get(headerTunnel) == "none" {
			return nil, fmt.Errorf("node %s: %w", nodeURL, ErrNoTunnel)
		}
		return nil, fmt.Errorf("node %s refused: %s", nodeURL, resp.Status)
	}
	r := &Remote{agentID: agentID, node: nodeURL, pw: pw, stream: resp, cancel: cancel,
		connectedAt: time.Now(), done: make(chan struct{})}
	r.unused = time.AfterFunc(unusedTimeout, func() { r.closeWith(errUnused) })
	return r, nil
}

var (
	errUnused      = errors.New("remote tunnel not used")
	errUsed        = errors.New("a remote tunnel carries one request")
	errRemoteClose = errors.New("remote tunnel closed")
)

// Remote is a stream to another node that holds a tunnel of the agent,
// ready to carry one request ([tunnel.Tunnel]).
type Remote struct {
	agentID     int64
	node        string
	pw          *io.PipeWriter // the stream's request body
	stream      *http.Response // the stream's response: the node's answer
	cancel      context.CancelFunc
	connectedAt time.Time
	unused      *time.Timer
	used        atomic.Bool

	mu        sync.Mutex // guards err and afterDone
	err       error
	afterDone []func()
	done      chan struct{}
}

var _ tunnel.Tunnel = (*Remote)(nil)

// Node is the URL of the node the request goes to.
func (r *Remote) Node() string { return r.node }

// Agent implements [tunnel.Tunnel]; only the agent's id is known here.
func (r *Remote) Agent() tunnel.AgentInfo { return tunnel.AgentInfo{ID: r.agentID, RemoteAddr: r.node} }

// ConnectedAt implements [tunnel.Tunnel].
func (r *Remote) ConnectedAt() time.Time { return r.connectedAt }

// Load implements [tunnel.Tunnel].
func (r *Remote) Load() int64 {
	if r.used.Load() {
		return 1
	}
	return 0
}

// Done implements [tunnel.Tunnel].
func (r *Remote) Done() <-chan struct{} { return r.done }

// Err implements [tunnel.Tunnel].
func (r *Remote) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

// AfterDone implements [tunnel.Tunnel].
func (r *Remote) AfterDone(f func()) {
	r.mu.Lock()
	if r.err == nil {
		r.afterDone = append(r.afterDone, f)
		r.mu.Unlock()
		return
	}
	r.mu.Unlock()
	go f()
}

// Close implements [tunnel.Tunnel]: it cancels the stream.
func (r *Remote) Close() error {
	r.closeWith(errRemoteClose)
	return nil
}

func (r *Remote) closeWith(err error) {
	r.mu.Lock()
	if r.err != nil {
		r.mu.Unlock()
		return
	}
	r.err = err
	fs := r.afterDone
	r.afterDone = nil
	r.mu.Unlock()
	r.unused.Stop()
	r.cancel()
	r.pw.CloseWithError(err)
	r.stream.Body.Close()
	close(r.done)
	for _, f := range fs {
		go f()
	}
}

// RoundTrip implements [tunnel.Tunnel]: it sends the request to the node,
// which sends it on its tunnel, and returns the cluster's answer. A Remote
// carries one request.
func (r *Remote) RoundTrip(req *tunnel.Request) (*http.Response, error) {
	if !r.used.CompareAndSwap(false, true) {
		return nil, errUsed
	}
	r.unused.Stop()
	if err := r.Err(); err != nil {
		return nil, fmt.Errorf("node %s: %w", r.node, err)
	}
	ctx := req.HTTP.Context()
	stop := context.AfterFunc(ctx, func() { r.closeWith(context.Cause(ctx)) })
	go r.writeRequest(req) // ends with the body, or when the stream is cancelled

	br := bufio.NewReader(r.stream.Body)
	resp, err := http.ReadResponse(br, &http.Request{Method: req.HTTP.Method})
	if err != nil {
		stop()
		if cerr := r.Err(); cerr != nil {
			err = cerr
		}
		r.closeWith(err)
		return nil, fmt.Errorf("node %s: reading the forwarded response: %w", r.node, err)
	}
	body := resp.Body
	if resp.StatusCode == http.StatusSwitchingProtocols {
		// The cluster's raw bytes follow the head.
		body = io.NopCloser(io.MultiReader(br, r.stream.Body))
	}
	resp.Body = &remoteBody{r: r, body: body, stop: stop}
	resp.Request = req.HTTP
	return resp, nil
}

// writeRequest writes the request's head and body into the stream.
func (r *Remote) writeRequest(req *tunnel.Request) {
	err := writeRequest(r.pw, req)
	if err != nil {
		r.pw.CloseWithError(err)
		return
	}
	r.pw.Close() // the end of the body, or the client's half-close
}

// writeRequest writes req to w in HTTP/1.1 form (see the package doc).
func writeRequest(w io.Writer, req *tunnel.Request) error {
	hr := req.HTTP
	bw := bufio.NewWriterSize(w, 4096)
	uri := hr.URL.RequestURI()
	if _, err := fmt.Fprintf(bw, "%s %s HTTP/1.1\r\nHost: agent\r\n", hr.Method, uri); err != nil {
		return err
	}
	h := hr.Header.Clone()
	if h == nil {
		h = http.Header{}
	}
	for _, k := range []string{"Host", "Content-Length", "Transfer-Encoding", "Connection", headerIdentity, headerUpgrade} {
		h.Del(k)
	}
	if req.Identity != nil {
		b, err := json.Marshal(req.Identity)
		if err != nil {
			return err
		}
		h.Set(headerIdentity, string(b))
	}
	body := hr.Body
	chunked := false
	switch {
	case req.Upgrade != "":
		h.Set(headerUpgrade, req.Upgrade)
	case body == nil || body == http.NoBody:
		body = nil
	case hr.ContentLength > 0:
		h.Set("Content-Length", strconv.FormatInt(hr.ContentLength, 10))
	default:
		chunked = true
		h.Set("Transfer-Encoding", "chunked")
	}
	if err := h.Write(bw); err != nil {
		return err
	}
	if _, err := bw.WriteString("\r\n"); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	if body == nil {
		return nil
	}
	defer body.Close()
	if chunked {
		cw := httputil.NewChunkedWriter(w)
		if _, err := io.Copy(cw, body); err != nil {
			return err
		}
		if err := cw.Close(); err != nil {
			return err
		}
		_, err := io.WriteString(w, "\r\n") // the empty trailer
		return err
	}
	_, err := io.Copy(w, body)
	return err
}

// remoteBody is the body of a forwarded answer; closing it ends the
// stream.
type remoteBody struct {
	r    *Remote
	body io.ReadCloser
	stop func() bool
}

func (b *remoteBody) Read(p []byte) (int, error) {
	n, err := b.body.Read(p)
	if err != nil && err != io.EOF {
		if cerr := b.r.Err(); cerr != nil {
			err = fmt.Errorf("node %s: %w", b.r.node, cerr)
		}
	}
	return n, err
}

func (b *remoteBody) Close() error {
	b.stop()
	// The stream first: closing a body that http.ReadResponse made reads
	// it to its end, which a watch never reaches.
	b.r.closeWith(errRemoteClose)
	b.body.Close()
	return nil
}
