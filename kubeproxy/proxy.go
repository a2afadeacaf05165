// Package kubeproxy is the user-facing Kubernetes API proxy of the agent
// server: it authenticates a request, turns it into the internal form of a
// proxied request ([tunnel.Request]), has the [tunnel.Router] find a tunnel
// of the agent the request names, and streams the request to it and the
// answer back. It knows no tunnel protocol. It imports no Caddy package.
package kubeproxy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/internal/copybuf"
	"github.com/caddy-kas/caddy-kas/internal/httpheader"
	"github.com/caddy-kas/caddy-kas/internal/logthrottle"
	"github.com/caddy-kas/caddy-kas/kubestatus"
	"github.com/caddy-kas/caddy-kas/tunnel"
)

// DefaultWaitForAgent is how long a request waits for a connection of its
// agent to appear, as GitLab's KAS does (routingTunnelFindTimeout,
// kas-spec §4.3): an agent that is reconnecting is back well within it.
const DefaultWaitForAgent = 20 * time.Second

// DefaultReconnectWindow is how long after an agent's last tunnel here
// closed, or after this server started for an agent not connected since,
// requests still wait for the agent. An agent that lost its connection is
// back within its reconnect backoff (at most 20 s plus 20 % jitter for
// GitLab's agentk, kas-spec §4.2, and ours); one away for longer is not
// reconnecting, and a request waiting for it would only keep its user
// waiting: kubectl, which retries discovery, waited 105 s to learn that
// the agent was not there.
const DefaultReconnectWindow = 30 * time.Second

// Proxy is an http.Handler for the Kubernetes API proxy.
type Proxy struct {
	// Prefix is the URL path the proxy is mounted at; it ends in "/" and is
	// removed before the request goes to the cluster.
	Prefix string
	// Auth authenticates requests.
	Auth Authenticator
	// Router finds a tunnel of the request's agent.
	Router *tunnel.Router
	// WaitForAgent is how long a request waits for its agent to connect;
	// zero means [DefaultWaitForAgent].
	WaitForAgent time.Duration
	// ReconnectWindow limits that wait to agents expected back: a request
	// waits only until this long after the agent's last tunnel here
	// closed, or after the tunnel store was made for an agent not
	// connected since; for any other agent it fails at once. Zero means
	// [DefaultReconnectWindow]; a negative window waits for every agent,
	// as GitLab's KAS does.
	ReconnectWindow time.Duration
	// Logger receives refusals and failures; it is never given a secret.
	Logger *zap.Logger
	// Observer, if set, is told how requests fared, for metrics.
	Observer Observer
	// Via names this proxy in the Via element it adds to proxied requests
	// and their responses (RFC 9110 §7.6.3; GitLab's KAS and agentk add
	// theirs), for example "caddy-kas/v1.2.3". Empty adds none.
	Via string
	// AllowedOrigin is the one browser origin that may call the proxy
	// with credentials (GitLab's external URL, as "https://host[:port]").
	// A request with any other Origin is refused with 403. Empty turns
	// CORS handling off: Origin is ignored and no CORS headers are set.
	AllowedOrigin string
	// ExtraAllowedResponseHeaders names headers of the cluster's answers
	// that reach the client besides [DefaultAllowedResponseHeaders]; every
	// other header is dropped and logged (see
	// [CheckExtraAllowedResponseHeaders] for names that cannot be
	// allowed). With AllowedOrigin set, the cluster's CORS headers are
	// dropped whatever this says.
	ExtraAllowedResponseHeaders []string

	responseHeadersOnce sync.Once
	responseHeaders     *responseHeaders
	// viaOnce makes viaElements, the Via elements of HTTP/1.0, 1.1, 2 and
	// 3, from Via.
	viaOnce     sync.Once
	viaElements [4]string

	refusals logthrottle.Limiter // log lines of refusals, per status and reason
}

// Observer is told how requests fared.
type Observer interface {
	// Routed reports how long finding a tunnel of the request's agent
	// took, and whether one was found.
	Routed(wait time.Duration, found bool)
	// Refused counts a request refused with an HTTP status code.
	Refused(code int)
}

// ServeHTTP implements http.Handler.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path, rawPath, ok := p.stripPrefix(r.URL)
	if !ok {
		p.refuse(w, r, &Error{Code: http.StatusBadRequest, Message: "URL does not start with expected prefix", Reason: "path outside prefix"})
		return
	}
	if p.handleCORS(w, r) {
		return
	}
	access, err := p.Auth.Authenticate(r)
	if err != nil {
		var e *Error
		if !errors.As(err, &e) {
			p.log().Error("authenticating k8s proxy request", zap.Error(err), zap.String("remote_addr", r.RemoteAddr))
			p.writeStatus(w, r, kubestatus.New(http.StatusInternalServerError, "authentication failed"))
			return
		}
		p.refuse(w, r, e)
		return
	}
	if identity.HasImpersonation(r.Header) {
		switch {
		case access.Identity != nil:
			// GitLab's agentk refuses this combination (gitlab#338664).
			p.refuse(w, r, &Error{Code: http.StatusBadRequest, Message: "nested impersonation is not supported",
				Reason: access.Principal + " sent impersonation headers but is impersonated already", AgentID: access.AgentID})
			return
		case !access.AllowClientImpersonation:
			p.refuse(w, r, &Error{Code: http.StatusForbidden, Message: "Forbidden: impersonation is not allowed for this token",
				Reason: access.Principal + " may not impersonate", AgentID: access.AgentID})
			return
		}
	}

	out := r.WithContext(r.Context()) // shallow: fields are replaced below, the body is shared
	out.URL = &url.URL{Scheme: "http", Host: "agent", Path: path, RawPath: rawPath, RawQuery: sanitizeQuery(r.URL.RawQuery)}
	out.Host = ""
	out.RequestURI = ""
	out.Header = outboundHeader(r.Header, access.AllowClientImpersonation)
	p.addVia(out.Header, r)
	// An HTTP/1.1 client's trailers are not forwarded; the Kubernetes API
	// does not use request trailers.
	out.Trailer = nil
	req := &tunnel.Request{HTTP: out, Identity: access.Identity}
	if upgrade := upgradeRequested(r.Header); upgrade != "" {
		req.Upgrade = upgrade
		p.serveUpgrade(w, r, req, access)
		return
	}
	if r.ContentLength == 0 {
		out.Body = nil // nothing to stream: lets a failed request be retried
	}

	resp, err := p.roundTrip(req, access)
	if err != nil {
		p.roundTripFailed(w, r, err, access)
		return
	}
	defer resp.Body.Close()
	p.copyResponse(w, r, resp, access)
}

// roundTripFailed answers a request that got no response from the agent.
func (p *Proxy) roundTripFailed(w http.ResponseWriter, r *http.Request, err error, access *Access) {
	if r.Context().Err() != nil {
		return // the client went away; nobody to answer
	}
	var e *Error
	if errors.As(err, &e) {
		p.refuse(w, r, e)
		return
	}
	p.log().Warn("k8s proxy request failed", zap.Int64("agent_id", access.AgentID), zap.Error(err))
	p.writeStatus(w, r, kubestatus.New(http.StatusBadGateway, fmt.Sprintf("agent %d: %v", access.AgentID, err)))
}

// stripPrefix returns the request path without the proxy's prefix, as a
// path beginning with "/", in decoded and (if the client used escapes)
// raw form.
func (p *Proxy) stripPrefix(u *url.URL) (path, rawPath string, ok bool) {
	prefix := p.Prefix
	bare := strings.TrimSuffix(prefix, "/")
	if u.Path == bare {
		return "/", "", true
	}
	if !strings.HasPrefix(u.Path, prefix) {
		return "", "", false
	}
	path = "/" + u.Path[len(prefix):]
	if u.RawPath != "" && strings.HasPrefix(u.RawPath, prefix) {
		rawPath = "/" + u.RawPath[len(prefix):]
	}
	return path, rawPath, true
}

// roundTrip finds a tunnel of the agent and sends the request on it. A
// request without a body that failed because its tunnel died before it
// was sent is tried once more on another tunnel; one with a body cannot be
// replayed.
func (p *Proxy) roundTrip(req *tunnel.Request, access *Access) (*http.Response, error) {
	out := req.HTTP
	wait := p.WaitForAgent
	if wait <= 0 {
		wait = DefaultWaitForAgent
	}
	window := cmp.Or(p.ReconnectWindow, DefaultReconnectWindow)
	for attempt := 0; ; attempt++ {
		// An agent connected here is found without a deadline to wait.
		var waited time.Duration
		var err error
		t := p.Router.Connected(access.AgentID)
		if t == nil {
			findCtx, cancel := context.WithTimeout(out.Context(), wait)
			start := time.Now()
			t, err = p.Router.FindExpected(findCtx, access.AgentID, window)
			cancel()
			waited = time.Since(start)
		}
		if p.Observer != nil {
			p.Observer.Routed(waited, err == nil)
		}
		if err != nil {
			if out.Context().Err() != nil {
				return nil, err
			}
			return nil, &Error{Code: http.StatusBadGateway, Message: notConnectedMessage(access.AgentID, waited, err),
				Reason: err.Error(), AgentID: access.AgentID}
		}
		resp, err := t.RoundTrip(req)
		if err == nil {
			return resp, nil
		}
		if attempt > 0 || out.Body != nil || t.Err() == nil || out.Context().Err() != nil {
			return nil, err
		}
		p.log().Debug("retrying request on another tunnel", zap.Int64("agent_id", access.AgentID), zap.Error(err))
	}
}

// notConnectedMessage tells the user that no tunnel of the agent was
// found, how long the request waited (less than configured when the
// agent's reconnect window ended, or the store closed, meanwhile), and,
// for an agent not expected back, since when it has been away.
func notConnectedMessage(agentID int64, waited time.Duration, err error) string {
	msg := fmt.Sprintf("agent %d is not connected", agentID)
	if waited >= 100*time.Millisecond {
		msg += fmt.Sprintf(" (waited %s)", waited.Round(100*time.Millisecond))
	}
	var absent *tunnel.AbsentError
	if errors.As(err, &absent) {
		ago := time.Since(absent.Since).Round(time.Second)
		if absent.Seen {
			msg += fmt.Sprintf(": its last connection to this server ended %s ago", ago)
		} else {
			msg += fmt.Sprintf(": it has not connected since this server started %s ago", ago)
		}
	}
	return msg + ". Is the agent up and connected?"
}

// copyResponse streams the agent's answer to the client. A response of
// unknown length (a watch, `kubectl logs -f`: the apiserver sends them
// chunked) or an event stream is flushed after every read so that each
// event and line arrives at once; a response of known length goes through
// the response writer's buffer, which sends a small one in one piece when
// the handler returns (over HTTP/2: HEADERS and one DATA frame ending the
// stream, instead of a flush per read and an empty DATA frame to end it).
func (p *Proxy) copyResponse(w http.ResponseWriter, r *http.Request, resp *http.Response, access *Access) {
	h := w.Header()
	p.copyAllowedResponseHeader(h, resp.Header, access.AgentID)
	p.addVia(h, r)
	w.WriteHeader(resp.StatusCode)
	rc := http.NewResponseController(w)
	if resp.Body == http.NoBody {
		return
	}
	flush := httpheader.Streamed(resp.Header, resp.ContentLength)
	bufp := copybuf.Get()
	defer copybuf.Put(bufp)
	buf := *bufp
	for {
		n, readErr := resp.Body.Read(buf)
		if n > 0 {
			if _, err := w.Write(buf[:n]); err != nil {
				return // the client went away; closing resp.Body resets the stream
			}
			if flush {
				if err := rc.Flush(); err != nil {
					return
				}
			}
		}
		if readErr == io.EOF {
			return
		}
		if readErr != nil {
			if r.Context().Err() == nil {
				p.log().Warn("agent connection lost mid-response", zap.Int64("agent_id", access.AgentID), zap.Error(readErr))
			}
			// The status line is out: the only honest signal left is to
			// abort, so the client sees a broken response instead of a
			// truncated one that looks complete.
			panic(http.ErrAbortHandler)
		}
	}
}

// copyAllowedResponseHeader adds to dst the headers of the cluster's answer
// h that may reach the client, and logs the others.
func (p *Proxy) copyAllowedResponseHeader(dst, h http.Header, agentID int64) {
	p.responseHeadersOnce.Do(func() {
		p.responseHeaders = newResponseHeaders(p.ExtraAllowedResponseHeaders, func(name string, agentID int64, count int) {
			// The name only: a value may be anything, a secret included.
			p.log().Warn("Blocked Kubernetes API proxy response header",
				zap.String("header", name), zap.Int64("agent_id", agentID), zap.Int("count", count))
		})
	})
	p.responseHeaders.copyAllowed(dst, h, agentID, p.AllowedOrigin != "")
}

// addVia appends this proxy's Via element to h, with the protocol the
// client spoke ("1.1", or "2" and "3": RFC 9110 §7.6.3 leaves out the
// "HTTP/" and a minor version of 0).
func (p *Proxy) addVia(h http.Header, client *http.Request) {
	if p.Via == "" {
		return
	}
	// The elements of the usual versions are made once, not twice per
	// request.
	p.viaOnce.Do(func() {
		p.viaElements = [...]string{"1.0 " + p.Via, "1.1 " + p.Via, "2 " + p.Via, "3 " + p.Via}
	})
	var v string
	switch {
	case client.ProtoMajor == 1 && client.ProtoMinor <= 1:
		v = p.viaElements[client.ProtoMinor]
	case client.ProtoMajor == 2 && client.ProtoMinor == 0:
		v = p.viaElements[2]
	case client.ProtoMajor == 3 && client.ProtoMinor == 0:
		v = p.viaElements[3]
	default:
		proto := strconv.Itoa(client.ProtoMajor)
		if client.ProtoMajor < 2 {
			proto += "." + strconv.Itoa(client.ProtoMinor)
		}
		v = proto + " " + p.Via
	}
	h.Add("Via", v)
}

func (p *Proxy) log() *zap.Logger {
	if p.Logger == nil {
		return nopLogger
	}
	return p.Logger
}

var nopLogger = zap.NewNop()

// logRefusal logs a refused request with its status and reason: the first
// of each status and reason at once, then one line a minute with the count
// left out since ("suppressed"), so that a client with a bad token cannot
// fill the log; the metrics count every refusal.
func (p *Proxy) logRefusal(code int, reason string, fields ...zap.Field) {
	ok, suppressed := p.refusals.Allow(strconv.Itoa(code) + " " + reason)
	if !ok {
		return
	}
	p.log().Info("k8s proxy request refused", append(fields,
		zap.Int("status", code), zap.String("reason", reason), zap.Int("suppressed", suppressed))...)
}

// refuse answers with a Kubernetes Status for e and logs why.
func (p *Proxy) refuse(w http.ResponseWriter, r *http.Request, e *Error) {
	fields := []zap.Field{zap.String("remote_addr", r.RemoteAddr)}
	if e.AgentID != 0 {
		fields = append(fields, zap.Int64("agent_id", e.AgentID))
	}
	p.logRefusal(e.Code, e.Reason, fields...)
	if p.Observer != nil {
		p.Observer.Refused(e.Code)
	}
	if e.Code == http.StatusUnauthorized {
		// Tells a KAS refusal from a 401 of the cluster (kas-spec §1.2).
		w.Header().Set("Gitlab-Unauthorized", "true")
	}
	s := kubestatus.New(e.Code, e.Message)
	if e.RetryAfter > 0 {
		s.Details = &kubestatus.StatusDetails{RetryAfterSeconds: httpheader.RetryAfterSeconds(e.RetryAfter)}
	}
	p.writeStatus(w, r, s)
}

// writeStatus answers r with s in the form its client can show (see
// [kubestatus.WriteFor]).
func (p *Proxy) writeStatus(w http.ResponseWriter, r *http.Request, s *kubestatus.Status) {
	path, _, _ := p.stripPrefix(r.URL)
	kubestatus.WriteFor(w, path, s)
}
