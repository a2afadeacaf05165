package agentserver

import (
	"crypto/sha256"
	"net/http"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/wsconn"
)

// prefaceTimeout is how long agentk may take, after the WebSocket
// handshake, to start HTTP/2 on the tunnel. agentk sends its SETTINGS at
// once; a peer that has not within this time is closed, never admitted.
const prefaceTimeout = 10 * time.Second

// serveH2Tunnel serves the handshake of our own agentk (package h2tunnel):
// the token and the agent's metadata come with the WebSocket handshake, and
// the connection becomes one tunnel. The handler returns at once: the
// tunnel owns the hijacked connection from then on, and is admitted once
// agentk's HTTP/2 SETTINGS show it is alive ([h2tunnel.Conn.AfterReady]).
func (e *Endpoint) serveH2Tunnel(hs *handshake) {
	token, ok := bearerToken(hs.r.Header)
	if !ok {
		hs.refuse(http.StatusUnauthorized, "no agent token", "missing agent token")
		return
	}
	agent, ok := hs.authenticate(token)
	if !ok || !hs.countConnection(token) {
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
	log := hs.log.With(zap.String("protocol", h2tunnel.Subprotocol))
	timer := time.AfterFunc(prefaceTimeout, func() {
		if conn.Err() == nil {
			log.Warn("agent handshake failed", zap.String("reason", "no HTTP/2 settings from agentk"), zap.Duration("waited", prefaceTimeout))
		}
		conn.Close()
	})
	conn.AfterReady(func() {
		if timer.Stop() { // else the timer closed the connection
			e.admit(conn, token, log)
		}
	})
	conn.AfterDone(func() { timer.Stop() })
}
