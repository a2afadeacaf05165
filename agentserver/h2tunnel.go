package agentserver

import (
	"crypto/sha256"
	"net/http"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/wsconn"
)

// serveH2Tunnel serves the handshake of our own agentk (package h2tunnel):
// the token and the agent's metadata come with the WebSocket handshake, and
// the connection becomes one tunnel. The handler returns once the tunnel
// is admitted: the tunnel owns the hijacked connection from then on.
func (e *Endpoint) serveH2Tunnel(hs *handshake) {
	token, ok := bearerToken(hs.r.Header)
	if !ok {
		hs.refuse(http.StatusUnauthorized, "no agent token", "missing agent token")
		return
	}
	agent, ok := hs.authenticate(token)
	if !ok {
		return
	}
	meta, err := h2tunnel.MetaFromHeaders(hs.r.Header)
	if err != nil {
		hs.refuse(http.StatusBadRequest, "malformed agent metadata", "malformed agent metadata", zap.Error(err))
		return
	}
	nc, err := wsconn.Accept(hs.w, hs.r, h2tunnel.Subprotocol)
	if err != nil {
		hs.log.Warn("agent handshake failed", zap.Error(err))
		return
	}
	info := tunnel.AgentInfo{ID: agent.ID, Name: agent.Name, ProjectID: agent.ProjectID, Meta: meta,
		RemoteAddr: hs.r.RemoteAddr, Credential: sha256.Sum256([]byte(token))}
	conn, err := h2tunnel.NewConn(nc, info, e.H2Tunnel)
	if err != nil {
		hs.log.Warn("agent handshake failed", zap.Error(err))
		return
	}
	e.admit(conn, token, hs.log.With(zap.String("protocol", h2tunnel.Subprotocol)))
}
