package nodetunnel

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/internal/copybuf"
	"github.com/caddy-kas/caddy-kas/internal/httpheader"
	"github.com/caddy-kas/caddy-kas/internal/logthrottle"
	"github.com/caddy-kas/caddy-kas/tunnel"
)

// Path is where a node's private listener takes forwarded requests.
const Path = "/v1/tunnel"

// Headers of the wire (see the package documentation).
const (
	headerAgentID  = "Kas-Agent-Id"
	headerTunnel   = "Kas-Tunnel"
	headerIdentity = "Kas-Node-Identity"
	headerUpgrade  = "Kas-Node-Upgrade"
)

// maxHeadSize bounds the head of a forwarded request or response.
const maxHeadSize = 1 << 20

// findWait is how long a node looks for a tunnel of its own once it said it
// has one: the tunnel may have closed in between, and another of the agent's
// may be just reconnecting.
const findWait = 2 * time.Second

// Server serves the private listener: requests forwarded by other nodes,
// sent only to this node's own tunnels. It is an http.Handler for HTTP/2.
type Server struct {
	// Secret is the private secret shared by the nodes (SecretSize
	// bytes).
	Secret []byte
	// Local holds this node's tunnels.
	Local *tunnel.Store
	// Logger receives refusals and failures; never a token.
	Logger *zap.Logger
	// Now tells the time for tokens; nil means time.Now.
	Now func() time.Time

	refusals logthrottle.Limiter // log lines of refusals, per reason

	verifiedMu sync.Mutex // guards verified
	verified   map[string]verifiedToken
}

// verifiedToken is a token found valid, kept until it expires: the
// forwarding node reuses a token for a while, and checking one costs a
// tenth of the receiving node's CPU per request (docs/benchmarks.md).
type verifiedToken struct {
	agentID int64
	expires time.Time
}

// maxVerifiedTokens bounds the tokens kept.
const maxVerifiedTokens = 10_000

// verify checks a token, from the tokens verified before if it is one.
func (s *Server) verify(token string) (int64, error) {
	now := s.now()
	s.verifiedMu.Lock()
	v, ok := s.verified[token]
	s.verifiedMu.Unlock()
	if ok && now.Before(v.expires) {
		return v.agentID, nil
	}
	agentID, expires, err := verifyToken(s.Secret, token, now)
	if err != nil {
		return 0, err
	}
	s.verifiedMu.Lock()
	if s.verified == nil || len(s.verified) >= maxVerifiedTokens {
		s.verified = make(map[string]verifiedToken)
	}
	s.verified[token] = verifiedToken{agentID: agentID, expires: expires}
	s.verifiedMu.Unlock()
	return agentID, nil
}

func (s *Server) now() time.Time {
	if s.Now != nil {
		return s.Now()
	}
	return time.Now()
}

func (s *Server) log() *zap.Logger {
	if s.Logger == nil {
		return zap.NewNop()
	}
	return s.Logger
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != Path || r.Method != http.MethodPost {
		http.NotFound(w, r)
		return
	}
	if r.ProtoMajor != 2 {
		s.refuse(w, r, http.StatusHTTPVersionNotSupported, "not HTTP/2", "the private API speaks HTTP/2 only")
		return
	}
	token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || token == "" {
		s.refuse(w, r, http.StatusUnauthorized, "no token", "unauthenticated")
		return
	}
	agentID, err := s.verify(token)
	if err != nil {
		s.refuse(w, r, http.StatusUnauthorized, "invalid token", "unauthenticated")
		return
	}
	if h := r.Header.Get(headerAgentID); h != strconv.FormatInt(agentID, 10) {
		s.refuse(w, r, http.StatusBadRequest, "agent id does not match the token", "the agent id does not match the token")
		return
	}
	var buf [8]tunnel.Tunnel
	if len(s.Local.Tunnels(agentID, buf[:0])) == 0 {
		// Not an error: the registry said this node had one, and the
		// agent moved. The forwarding node tries elsewhere.
		w.Header().Set(headerTunnel, "none")
		w.WriteHeader(http.StatusNotFound)
		return
	}
	w.Header().Set(headerTunnel, "ready")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	if err := rc.Flush(); err != nil {
		return
	}
	s.serveForwarded(w, r, rc, agentID)
}

// serveForwarded reads the forwarded request from r's body, sends it on a
// tunnel of this node, and writes the answer to w.
func (s *Server) serveForwarded(w http.ResponseWriter, r *http.Request, rc *http.ResponseController, agentID int64) {
	log := s.log().With(zap.Int64("agent_id", agentID), zap.String("remote_addr", r.RemoteAddr))
	lh := &limitedHead{r: r.Body, left: maxHeadSize}
	br := bufio.NewReader(lh)
	fwd, err := http.ReadRequest(br)
	lh.headDone = true
	if err != nil {
		if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
			log.Warn("forwarded request unreadable", zap.Error(err))
		}
		// EOF before a request: the forwarding node chose another node.
		return
	}
	req := &tunnel.Request{HTTP: fwd.WithContext(r.Context())}
	req.HTTP.RequestURI = ""
	req.HTTP.URL.Scheme, req.HTTP.URL.Host = "http", "agent"
	if v := fwd.Header.Get(headerIdentity); v != "" {
		id := new(identity.Identity)
		if err := json.Unmarshal([]byte(v), id); err != nil {
			log.Warn("forwarded request with an unreadable identity", zap.Error(err))
			panic(http.ErrAbortHandler)
		}
		req.Identity = id
	}
	req.Upgrade = fwd.Header.Get(headerUpgrade)
	req.HTTP.Header.Del(headerIdentity)
	req.HTTP.Header.Del(headerUpgrade)
	if req.Upgrade != "" {
		// After the head, the stream carries the client's raw bytes.
		req.HTTP.Body = io.NopCloser(io.MultiReader(br, r.Body))
		req.HTTP.ContentLength = -1
	} else if fwd.ContentLength == 0 {
		req.HTTP.Body = nil
	} else {
		// The body is framed; what follows it in br is nothing.
		req.HTTP.Body = fwd.Body
	}
	t, err := s.localTunnel(r.Context(), agentID)
	if err != nil {
		// The head went out as ready: tell the forwarding node by
		// resetting the stream; it answers its client 502.
		log.Info("forwarded request: the tunnel went away", zap.Error(err))
		panic(http.ErrAbortHandler)
	}
	resp, err := t.RoundTrip(req)
	if err != nil {
		log.Info("forwarded request failed", zap.Error(err))
		panic(http.ErrAbortHandler)
	}
	defer resp.Body.Close()
	if err := writeResponse(w, rc, resp, fwd.Method); err != nil {
		if r.Context().Err() == nil {
			log.Info("forwarded response cut short", zap.Error(err))
		}
		panic(http.ErrAbortHandler)
	}
}

// localTunnel returns the least loaded tunnel of the agent on this node.
// A forwarded request usually finds one connected, and then needs no
// deadline, a timer per request (as [tunnel.Router.Connected] explains);
// only if the tunnel went away since this node said it had one does it
// wait up to findWait for one to come back.
func (s *Server) localTunnel(ctx context.Context, agentID int64) (tunnel.Tunnel, error) {
	router := tunnel.NewRouter(s.Local)
	if t := router.Connected(agentID); t != nil {
		return t, nil
	}
	ctx, cancel := context.WithTimeout(ctx, findWait)
	defer cancel()
	return router.Find(ctx, agentID)
}

// limitedHead reads from r, failing once more than left bytes were read
// before headDone is set, so that a request head cannot grow without bound;
// the body that follows the head is not limited.
type limitedHead struct {
	r        io.Reader
	left     int64
	headDone bool
}

var errHeadTooLarge = errors.New("forwarded request head too large")

func (l *limitedHead) Read(p []byte) (int, error) {
	if !l.headDone && l.left <= 0 {
		return 0, errHeadTooLarge
	}
	n, err := l.r.Read(p)
	l.left -= int64(n)
	return n, err
}

// writeResponse writes resp in HTTP/1.1 form: the status line and headers,
// then the body, chunked unless its length is known; after a 101 the
// body's raw bytes. A streamed answer (see [httpheader.Streamed]) and a
// 101 are flushed after every read, their headers at once; an answer of
// known length goes through the stream's buffer, so that a small one
// leaves in one piece when the handler returns.
func writeResponse(w io.Writer, rc *http.ResponseController, resp *http.Response, method string) error {
	bw := bufio.NewWriterSize(w, 4096)
	h := resp.Header.Clone()
	if h == nil {
		h = http.Header{}
	}
	h.Del("Content-Length")
	h.Del("Transfer-Encoding")
	chunked := false
	switch {
	case resp.StatusCode == http.StatusSwitchingProtocols, resp.StatusCode == http.StatusNoContent,
		resp.StatusCode == http.StatusNotModified, method == http.MethodHead:
	case resp.ContentLength >= 0:
		h.Set("Content-Length", strconv.FormatInt(resp.ContentLength, 10))
	default:
		chunked = true
		h.Set("Transfer-Encoding", "chunked")
	}
	if _, err := fmt.Fprintf(bw, "HTTP/1.1 %03d %s\r\n", resp.StatusCode, http.StatusText(resp.StatusCode)); err != nil {
		return err
	}
	if err := h.Write(bw); err != nil {
		return err
	}
	if _, err := bw.WriteString("\r\n"); err != nil {
		return err
	}
	flushEach := resp.StatusCode == http.StatusSwitchingProtocols || httpheader.Streamed(resp.Header, resp.ContentLength)
	flush := func() error {
		if err := bw.Flush(); err != nil {
			return err
		}
		if flushEach {
			return rc.Flush()
		}
		return nil
	}
	if err := flush(); err != nil {
		return err
	}
	if resp.Body == nil || resp.Body == http.NoBody {
		return nil
	}
	if method == http.MethodHead || resp.StatusCode == http.StatusNoContent || resp.StatusCode == http.StatusNotModified {
		return nil
	}
	bufp := copybuf.Get()
	defer copybuf.Put(bufp)
	buf := *bufp
	for {
		n, readErr := resp.Body.Read(buf)
		if n > 0 {
			if chunked {
				fmt.Fprintf(bw, "%x\r\n", n)
				bw.Write(buf[:n])
				bw.WriteString("\r\n")
			} else {
				bw.Write(buf[:n])
			}
			if err := flush(); err != nil {
				return err
			}
		}
		if readErr == io.EOF {
			if chunked {
				bw.WriteString("0\r\n\r\n")
			}
			return flush()
		}
		if readErr != nil {
			return readErr
		}
	}
}

// refuse answers a request that is not a valid forwarded request, and logs
// it once per reason a minute with the count left out since, so that a
// misconfigured or hostile peer cannot flood the log.
func (s *Server) refuse(w http.ResponseWriter, r *http.Request, code int, reason, message string) {
	if ok, suppressed := s.refusals.Allow(reason); ok {
		s.log().Warn("private API request refused", zap.String("reason", reason), zap.String("remote_addr", r.RemoteAddr), zap.Int("suppressed", suppressed))
	}
	http.Error(w, message, code)
}
