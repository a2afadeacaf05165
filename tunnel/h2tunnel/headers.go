package h2tunnel

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"

	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/internal/httpheader"
	"github.com/caddy-kas/caddy-kas/tunnel"
)

// Subprotocol is the WebSocket subprotocol (RFC 6455 §1.9) that names
// version 1 of this protocol: one HTTP/2 connection with prior knowledge,
// carried in binary messages, KAS being the HTTP/2 client. A future
// incompatible version gets a new name, so that KAS can serve old and new
// agents side by side and refuse unknown ones with a clear error.
const Subprotocol = "caddy-kas.tunnel.v1"

// reservedPrefix starts every header name of this protocol. KAS removes
// any copy of them from a request before it encodes its own, so that no
// client can forge one.
const reservedPrefix = "Kas-"

// Handshake headers in which agentk describes itself ([tunnel.AgentMeta])
// when it connects.
const (
	HeaderAgentVersion       = "Kas-Agent-Version"
	HeaderAgentCommit        = "Kas-Agent-Commit"
	HeaderPodNamespace       = "Kas-Agent-Pod-Namespace"
	HeaderPodName            = "Kas-Agent-Pod-Name"
	HeaderPodID              = "Kas-Agent-Pod-Id"
	HeaderConnectionID       = "Kas-Agent-Connection-Id"
	HeaderKubernetesVersion  = "Kas-Agent-Kubernetes-Version"
	HeaderKubernetesPlatform = "Kas-Agent-Kubernetes-Platform"
)

// Headers of proxied requests and their responses.
const (
	// IdentityHeader carries [tunnel.Request.Identity]: the base64url
	// (RFC 4648 §5, no padding) encoding of the JSON form of
	// [identity.Identity], so that usernames and groups with any
	// characters survive.
	IdentityHeader = "Kas-Impersonate"
	// UpgradeHeader carries the value of the Upgrade header: in a request
	// what the client asks for ([tunnel.Request.Upgrade]), in a switched
	// response what the cluster chose.
	UpgradeHeader = "Kas-Upgrade"
	// UpgradeStatusHeader is "101" in agentk's answer when the cluster
	// switched protocols.
	UpgradeStatusHeader = "Kas-Upgrade-Status"
	// MoveHeader marks a request of KAS's own, not a proxied one: KAS
	// asks agentk to move, because the node stops or the tunnel reached
	// its maximum age. agentk answers 204 and opens a new tunnel at once,
	// to whichever node its KAS address leads to now, while it keeps
	// serving this one until KAS closes it: requests in flight finish, and
	// the agent is never without a tunnel.
	MoveHeader = "Kas-Move"
)

// SetMetaHeaders writes m into the handshake headers h.
func SetMetaHeaders(h http.Header, m tunnel.AgentMeta) {
	set := func(k, v string) {
		if v != "" {
			h.Set(k, v)
		}
	}
	set(HeaderAgentVersion, m.Version)
	set(HeaderAgentCommit, m.CommitID)
	set(HeaderPodNamespace, m.PodNamespace)
	set(HeaderPodName, m.PodName)
	set(HeaderKubernetesVersion, m.KubernetesVersion)
	set(HeaderKubernetesPlatform, m.KubernetesPlatform)
	h.Set(HeaderPodID, strconv.FormatInt(m.PodID, 10))
	h.Set(HeaderConnectionID, strconv.FormatInt(m.ConnectionID, 10))
}

// MetaFromHeaders reads the metadata agentk sent in its handshake. Missing
// values stay empty or zero; values that fail [tunnel.AgentMeta.Validate]
// or numbers that do not parse are an error wrapping [tunnel.ErrBadMeta].
func MetaFromHeaders(h http.Header) (tunnel.AgentMeta, error) {
	var errs []error
	getInt := func(k string) int64 {
		v := h.Get(k)
		if v == "" {
			return 0
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			errs = append(errs, fmt.Errorf("%w: header %s is not an integer", tunnel.ErrBadMeta, k))
		}
		return n
	}
	m := tunnel.AgentMeta{
		Version:            h.Get(HeaderAgentVersion),
		CommitID:           h.Get(HeaderAgentCommit),
		PodNamespace:       h.Get(HeaderPodNamespace),
		PodName:            h.Get(HeaderPodName),
		KubernetesVersion:  h.Get(HeaderKubernetesVersion),
		KubernetesPlatform: h.Get(HeaderKubernetesPlatform),
		PodID:              getInt(HeaderPodID),
		ConnectionID:       getInt(HeaderConnectionID),
	}
	if err := errors.Join(append(errs, m.Validate())...); err != nil {
		return tunnel.AgentMeta{}, err
	}
	return m, nil
}

// ErrBadIdentity is wrapped by errors about a malformed [IdentityHeader].
var ErrBadIdentity = errors.New("malformed identity header")

// EncodeIdentity returns the value of [IdentityHeader] for id.
func EncodeIdentity(id *identity.Identity) string {
	b, err := json.Marshal(id)
	if err != nil {
		// Only strings, slices and maps of strings: cannot fail.
		panic(fmt.Sprintf("encoding identity: %v", err))
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

// DecodeIdentity parses a value of [IdentityHeader].
func DecodeIdentity(v string) (*identity.Identity, error) {
	b, err := base64.RawURLEncoding.DecodeString(v)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadIdentity, err)
	}
	var id identity.Identity
	if err := json.Unmarshal(b, &id); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadIdentity, err)
	}
	if id.Username == "" {
		return nil, fmt.Errorf("%w: empty username", ErrBadIdentity)
	}
	return &id, nil
}

// encodeRequest turns req into the HTTP/2 request KAS sends: req.HTTP with
// this protocol's headers, any client copy of them removed first. The
// header is changed in place, as [tunnel.Request] allows.
func encodeRequest(req *tunnel.Request) *http.Request {
	r := req.HTTP
	if r.Close || r.Header == nil {
		// "Connection: close" (or Request.Close) asks Go's HTTP/2 client
		// to retire the connection after this request. The tunnel is
		// shared by every request of the agent and connection headers are
		// hop-by-hop (RFC 9110 §7.6.1), so neither may pass.
		c := *r
		c.Close = false
		if c.Header == nil {
			c.Header = make(http.Header)
		}
		r = &c
	}
	h := r.Header
	deleteReserved(h)
	h.Del("Connection")
	if req.Identity != nil {
		h.Set(IdentityHeader, EncodeIdentity(req.Identity))
	}
	if req.Upgrade != "" {
		h.Set(UpgradeHeader, req.Upgrade)
	}
	return r
}

// deleteReserved removes every header of this protocol from h.
func deleteReserved(h http.Header) {
	for k := range h {
		if len(k) >= len(reservedPrefix) && strings.EqualFold(k[:len(reservedPrefix)], reservedPrefix) {
			delete(h, k)
		}
	}
}

// decodeSwitched turns agentk's answer to an upgrade request into the form
// [tunnel.Request] describes: a 101 with the cluster's Upgrade if the
// cluster switched protocols, else the cluster's answer unchanged.
func decodeSwitched(resp *http.Response) {
	h := resp.Header
	if h.Get(UpgradeStatusHeader) != "101" {
		return
	}
	upgrade := h.Get(UpgradeHeader)
	deleteReserved(h)
	httpheader.RemoveHopByHop(h)
	h.Set("Upgrade", upgrade)
	resp.StatusCode = http.StatusSwitchingProtocols
	resp.Status = "101 Switching Protocols"
}

// DecodeRequest is the agent's side of encodeRequest: it reads what KAS
// encoded into r, removes this protocol's headers from r and returns the
// request in its internal form. A malformed identity is an error wrapping
// [ErrBadIdentity].
func DecodeRequest(r *http.Request) (*tunnel.Request, error) {
	req := &tunnel.Request{HTTP: r}
	switch vs := r.Header.Values(IdentityHeader); len(vs) {
	case 0:
	case 1:
		id, err := DecodeIdentity(vs[0])
		if err != nil {
			return nil, err
		}
		req.Identity = id
	default:
		return nil, fmt.Errorf("%w: more than one %s header", ErrBadIdentity, IdentityHeader)
	}
	req.Upgrade = r.Header.Get(UpgradeHeader)
	deleteReserved(r.Header)
	return req, nil
}

// SetSwitched marks the agent's answer to an upgrade request as switched:
// the cluster answered 101 and chose upgrade. The answer itself goes out
// as a 200, since HTTP/2 has no 101 (RFC 9113 §8.6).
func SetSwitched(h http.Header, upgrade string) {
	h.Set(UpgradeHeader, upgrade)
	h.Set(UpgradeStatusHeader, "101")
}
