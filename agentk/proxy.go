package agentk

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/internal/copybuf"
	"github.com/caddy-kas/caddy-kas/kubestatus"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
)

// proxy answers the requests KAS sends through a tunnel by forwarding them
// to the kube-apiserver as agentk, impersonating the identity KAS chose.
type proxy struct {
	cluster *Cluster
	log     *zap.Logger
	metrics *metrics
	rp      *httputil.ReverseProxy
}

// identityKey carries the decoded identity from ServeHTTP to rewrite.
type identityKey struct{}

func newProxy(c *Cluster, log *zap.Logger, m *metrics) *proxy {
	p := &proxy{cluster: c, log: log, metrics: m}
	p.rp = &httputil.ReverseProxy{
		Rewrite:   p.rewrite,
		Transport: c.RoundTripper(),
		// Zero: the reverse proxy flushes every write of a response of
		// unknown length (watches and `kubectl logs -f` are chunked, so
		// their lines never sit in a buffer) and of an event stream, and
		// writes a response of known length through the tunnel's buffer,
		// so that a small answer leaves as HEADERS and one DATA frame with
		// END_STREAM instead of a flush per write and an empty DATA frame
		// to end the stream: one write to the tunnel fewer per request.
		FlushInterval: 0,
		// Without a pool the reverse proxy allocates 32 KiB per request
		// to copy the body through.
		BufferPool:   copybuf.ReverseProxyPool{},
		ErrorLog:     zap.NewStdLog(log.Named("reverseproxy")),
		ErrorHandler: p.upstreamError,
		// See releaseAtEOF.
		ModifyResponse: func(resp *http.Response) error {
			if release, ok := resp.Request.Context().Value(releaseKey{}).(context.CancelFunc); ok {
				resp.Body = &releaseAtEOF{ReadCloser: resp.Body, release: release}
			}
			return nil
		},
	}
	return p
}

// releaseKey carries the function that ends the upstream request once its
// response has been read.
type releaseKey struct{}

// releaseAtEOF ends the upstream request as soon as its response body has
// been read to the end. Without it a refused write deadlocks three hops:
// the apiserver answers 403 before reading the body; KAS's HTTP/2 client,
// seeing a status above 299, stops sending the rest of the body (Go's
// heuristic, which counts on the server to reset the stream); and the
// reverse proxy here cannot return to reset it, because closing the
// response body waits for the upstream request to finish sending a body
// that will never come. Ending the request's context is one of the ways
// out of that wait.
type releaseAtEOF struct {
	io.ReadCloser
	release context.CancelFunc
}

func (b *releaseAtEOF) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.release()
	}
	return n, err
}

// ServeHTTP checks the identity header, then forwards the request.
func (p *proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.metrics.inFlight.Add(1)
	rec := &statusRecorder{ResponseWriter: w}
	defer func() {
		p.metrics.inFlight.Add(-1)
		code := rec.code
		if code == 0 {
			// Nothing written: the handler panicked (net/http aborts the
			// stream) or the client went away first.
			code = http.StatusOK
		}
		p.metrics.requestDone(code)
	}()

	req, err := h2tunnel.DecodeRequest(r)
	if err != nil {
		kubestatus.Error(rec, http.StatusBadRequest, "agentk: "+err.Error())
		return
	}
	if req.Identity != nil {
		// KAS asks agentk to impersonate, so the client's own
		// impersonation would be nested impersonation, which Kubernetes
		// cannot express. GitLab agentk answers 400 (gitlab#338664).
		if identity.HasImpersonation(r.Header) {
			kubestatus.Error(rec, http.StatusBadRequest, "nested impersonation is not supported")
			return
		}
		r = r.WithContext(context.WithValue(r.Context(), identityKey{}, req.Identity))
	}
	if req.Upgrade != "" {
		p.serveUpgrade(rec, r, req.Upgrade, req.Identity)
		return
	}
	ctx, release := context.WithCancel(r.Context())
	defer release()
	p.rp.ServeHTTP(rec, r.WithContext(context.WithValue(ctx, releaseKey{}, release)))
}

// rewrite turns the request from KAS into one for the apiserver. The
// reverse proxy has already removed hop-by-hop and X-Forwarded-* headers.
func (p *proxy) rewrite(pr *httputil.ProxyRequest) {
	h := pr.Out.Header
	// The caller's credentials are for KAS, never for the cluster: the
	// request goes out with agentk's own (set by the transport).
	h.Del("Authorization")
	h.Del("Cookie")
	if id, ok := pr.In.Context().Value(identityKey{}).(*identity.Identity); ok {
		id.SetImpersonation(h)
	}
	// Without an identity, the client's Impersonate-* headers pass
	// unchanged: KAS has already decided that this user may send them.
	pr.SetURL(p.cluster.server)
}

// upstreamError answers 502 when the apiserver could not be reached.
func (p *proxy) upstreamError(w http.ResponseWriter, r *http.Request, err error) {
	if r.Context().Err() != nil {
		// The caller (KAS, or the user behind it) went away; nobody
		// reads the answer and it is not the apiserver's fault.
		p.log.Debug("request cancelled", zap.String("path", r.URL.Path), zap.Error(err))
		w.WriteHeader(http.StatusBadGateway)
		return
	}
	p.log.Error("cannot reach the Kubernetes API server",
		zap.String("apiserver", p.cluster.Server()),
		zap.String("method", r.Method),
		zap.String("path", r.URL.Path),
		zap.Error(err))
	kubestatus.Error(w, http.StatusBadGateway, fmt.Sprintf("agentk cannot reach the Kubernetes API server at %s: %v", p.cluster.Server(), err))
}

// statusRecorder remembers the response status code for the metrics.
type statusRecorder struct {
	http.ResponseWriter
	code int // first status code written, 0 before
}

func (s *statusRecorder) WriteHeader(code int) {
	// 1xx responses (100 Continue, 103 Early Hints) are interim: the
	// final code follows, except 101 which ends the exchange.
	if s.code == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		s.code = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.code == 0 {
		s.code = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController (which the reverse proxy uses to
// flush every write) reach the tunnel's response writer.
func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// Flush is there for code that checks for http.Flusher directly.
func (s *statusRecorder) Flush() {
	if s.code == 0 {
		s.code = http.StatusOK
	}
	_ = http.NewResponseController(s.ResponseWriter).Flush()
}
