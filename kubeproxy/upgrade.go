package kubeproxy

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/internal/httpheader"
	"github.com/caddy-kas/caddy-kas/kubestatus"
	"github.com/caddy-kas/caddy-kas/tunnel"
)

// upgradeDrainTimeout is how long the client may keep its side open after
// the cluster ended its side of a switched connection. SPDY and WebSocket
// end sessions inside the protocol, so a client that neither sends nor
// closes by then is gone or stuck.
const upgradeDrainTimeout = time.Minute

// halfCloseGrace is how long the cluster may keep its side of a switched
// connection open after the client ended its own. kubectl never
// half-closes while it works (stdin's end travels inside SPDY and
// WebSocket); the end of its connection means it is gone. The half-close
// is passed on, and an agent that passes it to the cluster (ours) ends
// the session at once; one that does not (GitLab's agentk v16.5 ignores
// the end of what KAS sends on a switched connection) would leave the
// session running at the source, a shell waiting for input, say. After
// this grace the request is cancelled, which ends it in either agent.
const halfCloseGrace = 10 * time.Second

// upgradeRequested returns the protocol a request asks to switch to
// (RFC 9110 §7.8: "Connection: Upgrade" and an Upgrade header), or "".
func upgradeRequested(h http.Header) string {
	if !httpheader.HasToken(h, "Connection", "upgrade") {
		return ""
	}
	return h.Get("Upgrade")
}

// serveUpgrade proxies a request that asks to switch protocols (kubectl
// exec, attach, port-forward) as [tunnel.Request.Upgrade] describes: the
// client's bytes in the request body, the cluster's in the response body.
func (p *Proxy) serveUpgrade(w http.ResponseWriter, r *http.Request, req *tunnel.Request, access *Access) {
	clientBytes, toAgent := io.Pipe()
	req.HTTP.Body = clientBytes
	req.HTTP.ContentLength = -1
	resp, err := p.roundTrip(req, access)
	if err != nil {
		toAgent.Close()
		p.roundTripFailed(w, r, err, access)
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusSwitchingProtocols {
		// The cluster refused (an old apiserver refusing WebSockets, say):
		// pass its answer on unchanged, so the client can fall back.
		toAgent.Close()
		p.copyResponse(w, r, resp, access)
		return
	}

	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		toAgent.CloseWithError(err)
		p.log().Warn("cannot switch protocols: the client connection cannot be taken over",
			zap.Int64("agent_id", access.AgentID), zap.String("proto", r.Proto), zap.Error(err))
		kubestatus.Error(w, http.StatusInternalServerError, "cannot switch protocols on this connection")
		return
	}
	defer conn.Close()
	switched := make(http.Header, len(resp.Header))
	p.copyAllowedResponseHeader(switched, resp.Header, access.AgentID)
	switched.Set("Upgrade", resp.Header.Get("Upgrade"))
	p.addVia(switched, r)
	if err := writeSwitchingProtocols(brw.Writer, switched); err != nil {
		toAgent.CloseWithError(err)
		return
	}

	// Client to cluster. brw.Reader may hold bytes the client sent right
	// after its request; they come first, then the connection itself. Not
	// brw.Reader to the end: it reads through net/http's connection
	// reader, which cancels the request's context (and with it the tunnel
	// stream) when the client half-closes.
	buffered, _ := brw.Reader.Peek(brw.Reader.Buffered())
	fromClient := io.MultiReader(bytes.NewReader(buffered), conn)
	clientDone := make(chan struct{})
	clusterDone := make(chan struct{}) // closed once the cluster's side is copied
	go func() {
		defer close(clientDone)
		_, err := io.Copy(toAgent, fromClient)
		toAgent.CloseWithError(err) // nil: EOF, the half-close reaches the cluster
		if err != nil {
			// The agent side is gone (or the client broke). Keep reading
			// what the client still sends (SPDY window updates, say) until
			// it closes: closing a socket with unread input makes the
			// kernel reset the connection and drop what is still queued
			// for the client, the end of the cluster's output
			// (RFC 9293 §3.6; "lingering close").
			io.Copy(io.Discard, fromClient)
			return
		}
		grace := time.NewTimer(halfCloseGrace)
		defer grace.Stop()
		select {
		case <-clusterDone:
		case <-grace.C:
			p.log().Debug("cancelling a switched connection the client has left", zap.Int64("agent_id", access.AgentID))
			resp.Body.Close() // cancels the request at the agent
		}
	}()

	// Cluster to client, in this goroutine; every write goes straight to
	// the socket.
	_, err = io.Copy(conn, resp.Body)
	close(clusterDone)
	switch {
	case err != nil:
		if r.Context().Err() == nil {
			p.log().Debug("switched connection ended by the agent side", zap.Int64("agent_id", access.AgentID), zap.Error(err))
		}
		conn.Close() // unblocks the client copy
	case closeWrite(conn) != nil:
		conn.Close()
	}
	select {
	case <-clientDone:
	case <-time.After(upgradeDrainTimeout):
		conn.Close()
		<-clientDone
	}
}

// writeSwitchingProtocols writes the 101 response with the allowed headers
// of the cluster's 101 and its Upgrade.
func writeSwitchingProtocols(w *bufio.Writer, clusterHeader http.Header) error {
	h := clusterHeader.Clone()
	upgrade := h.Get("Upgrade")
	httpheader.RemoveHopByHop(h)
	h.Set("Connection", "Upgrade")
	h.Set("Upgrade", upgrade)
	w.WriteString("HTTP/1.1 101 Switching Protocols\r\n")
	h.Write(w)
	w.WriteString("\r\n")
	return w.Flush()
}

// closeWrite half-closes conn (TCP FIN, or a TLS close_notify), telling the
// client the cluster has nothing more to say while it may still send.
func closeWrite(conn net.Conn) error {
	cw, ok := conn.(interface{ CloseWrite() error })
	if !ok {
		return errors.ErrUnsupported
	}
	return cw.CloseWrite()
}
