package agentk

import (
	"errors"
	"fmt"
	"io"
	"net/http"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/internal/copybuf"
	"github.com/caddy-kas/caddy-kas/internal/httpheader"
	"github.com/caddy-kas/caddy-kas/kubestatus"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
)

// serveUpgrade makes the upgrade request KAS sent (kubectl exec, attach,
// port-forward) to the apiserver over HTTP/1.1 and, once the apiserver
// switched protocols, copies bytes both ways: the request body from KAS to
// the apiserver, the apiserver's bytes into the response, flushed at once.
// The protocol is described in package h2tunnel.
func (p *proxy) serveUpgrade(w http.ResponseWriter, r *http.Request, upgrade string, id *identity.Identity) {
	out, err := http.NewRequestWithContext(r.Context(), r.Method, p.cluster.server.JoinPath(r.URL.EscapedPath()).String(), nil)
	if err != nil {
		kubestatus.Error(w, http.StatusBadRequest, "agentk: "+err.Error())
		return
	}
	out.URL.RawQuery = r.URL.RawQuery
	out.Header = r.Header.Clone()
	httpheader.RemoveHopByHop(out.Header)
	out.Header.Del("Authorization") // the cluster transport sets agentk's own
	out.Header.Del("Cookie")
	if id != nil {
		id.SetImpersonation(out.Header)
	}
	out.Header.Set("Connection", "Upgrade")
	out.Header.Set("Upgrade", upgrade)

	resp, err := p.cluster.UpgradeRoundTripper().RoundTrip(out)
	if err != nil {
		p.upstreamError(w, out, err)
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusSwitchingProtocols {
		// Refused: the client (kubectl) decides what to do, for example
		// fall back from WebSocket to SPDY.
		httpheader.CopyEndToEnd(w.Header(), resp.Header)
		w.WriteHeader(resp.StatusCode)
		copyFlushing(w, resp.Body)
		return
	}
	upstream, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		kubestatus.Error(w, http.StatusBadGateway, "agentk: the apiserver switched protocols but the connection cannot be written")
		return
	}

	h := w.Header()
	httpheader.CopyEndToEnd(h, resp.Header)
	h2tunnel.SetSwitched(h, resp.Header.Get("Upgrade"))
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	if err := rc.Flush(); err != nil {
		return
	}

	// KAS to apiserver. It ends when KAS ends the request body (the
	// client half-closed) or the stream dies; the stream dies at the
	// latest when this handler returns, so the goroutine cannot outlive it
	// by more than that.
	go func() {
		_, err := io.Copy(upstream, r.Body)
		if err == nil {
			closeWrite(upstream)
		} else {
			upstream.Close()
		}
	}()
	// Apiserver to KAS.
	if err := copyFlushing(w, upstream); err != nil && r.Context().Err() == nil {
		p.log.Debug("switched connection to the apiserver ended", zap.String("path", r.URL.Path), zap.Error(err))
	}
}

// copyFlushing copies src to w and flushes after every read, so that
// nothing waits in a buffer (interactive exec, port-forward).
func copyFlushing(w http.ResponseWriter, src io.Reader) error {
	rc := http.NewResponseController(w)
	bufp := copybuf.Get()
	defer copybuf.Put(bufp)
	buf := *bufp
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return fmt.Errorf("writing to the tunnel: %w", werr)
			}
			if ferr := rc.Flush(); ferr != nil {
				return fmt.Errorf("flushing to the tunnel: %w", ferr)
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// closeWrite half-closes the connection to the apiserver if it can, so the
// apiserver sees the client's end of input; otherwise it leaves it open
// for the apiserver to finish (SPDY and WebSocket end sessions inside the
// protocol anyway).
func closeWrite(c io.Closer) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}
