package tunnel

import (
	"context"
	"fmt"
	"net"
	"net/http"

	"github.com/coder/websocket"

	"github.com/caddy-kas/caddy-kas/internal/httpheader"
)

// IsWebSocketUpgrade reports whether r asks to open a WebSocket
// (RFC 6455 §4.1: "Upgrade: websocket" and "Connection: Upgrade").
func IsWebSocketUpgrade(r *http.Request) bool {
	return httpheader.HasToken(r.Header, "Connection", "upgrade") && httpheader.HasToken(r.Header, "Upgrade", "websocket")
}

// OffersSubprotocol reports whether a WebSocket handshake request lists
// [Subprotocol] in Sec-WebSocket-Protocol.
func OffersSubprotocol(r *http.Request) bool {
	return httpheader.HasToken(r.Header, "Sec-WebSocket-Protocol", Subprotocol)
}

// Accept completes the WebSocket handshake of a tunnel and returns the
// byte stream it carries. The caller has already authenticated the agent and
// checked [OffersSubprotocol]. The returned conn is independent of the
// request: it lives until it is closed, so a handler must either block
// until then or hand the conn to an owner.
func Accept(w http.ResponseWriter, r *http.Request) (net.Conn, error) {
	ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{
		Subprotocols: []string{Subprotocol},
		// The origin check protects browsers' cookies against cross-site
		// WebSockets. A tunnel is authenticated with a bearer token that
		// a browser cannot attach to a WebSocket, so there is nothing to
		// protect, and agentk sends no Origin header at all.
		InsecureSkipVerify: true,
		// Compression would cost CPU on every frame of every stream and
		// open the door to compression side channels; cluster traffic
		// that is worth compressing already is (gzip from the apiserver).
		CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil {
		return nil, fmt.Errorf("accepting tunnel websocket: %w", err)
	}
	if ws.Subprotocol() != Subprotocol {
		ws.Close(websocket.StatusProtocolError, fmt.Sprintf("expecting %q subprotocol", Subprotocol))
		return nil, fmt.Errorf("accepting tunnel websocket: client did not agree to subprotocol %q", Subprotocol)
	}
	return newWSConn(ws), nil
}

// DialOptions configure [Dial].
type DialOptions struct {
	// HTTPClient makes the handshake request; its transport decides TLS
	// settings and proxies. Nil means http.DefaultClient.
	HTTPClient *http.Client
	// Header is sent with the handshake: the agent token in Authorization,
	// the agent's metadata and any extra headers.
	Header http.Header
}

// Dial opens a tunnel to KAS at url (ws:// or wss://) and returns the byte
// stream it carries. On a refused handshake it also returns KAS's response,
// whose status tells why (401: the token was refused).
func Dial(ctx context.Context, url string, o DialOptions) (net.Conn, *http.Response, error) {
	ws, resp, err := websocket.Dial(ctx, url, &websocket.DialOptions{
		HTTPClient:      o.HTTPClient,
		HTTPHeader:      o.Header,
		Subprotocols:    []string{Subprotocol},
		CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil {
		return nil, resp, fmt.Errorf("dialing %s: %w", url, err)
	}
	if ws.Subprotocol() != Subprotocol {
		ws.CloseNow()
		return nil, resp, fmt.Errorf("dialing %s: server did not agree to subprotocol %q", url, Subprotocol)
	}
	return newWSConn(ws), resp, nil
}

// wsConn is the byte stream of a tunnel WebSocket.
type wsConn struct {
	net.Conn
	ws *websocket.Conn
}

func newWSConn(ws *websocket.Conn) *wsConn {
	// The stream's lifetime is managed by Close, not by a context.
	return &wsConn{Conn: websocket.NetConn(context.Background(), ws, websocket.MessageBinary), ws: ws}
}

// Close closes the WebSocket at once. net.Conn's Close from the websocket
// package would wait for the peer's close frame, for up to five seconds;
// by the time a tunnel is closed the HTTP/2 layer above has already said
// goodbye (GOAWAY) or found the peer dead, so waiting buys nothing.
func (c *wsConn) Close() error {
	err := c.ws.CloseNow()
	c.Conn.Close() // releases the adapter's timers; the socket is already closed
	return err
}
