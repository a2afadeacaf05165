package tunnel

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
)

// Subprotocol is the WebSocket subprotocol (RFC 6455 §1.9) that names
// version 1 of the tunnel protocol: one HTTP/2 connection with prior
// knowledge, carried in binary messages, KAS being the HTTP/2 client.
// A future incompatible version gets a new name, so that KAS can serve old
// and new agents side by side and refuse unknown ones with a clear error.
const Subprotocol = "caddy-kas.tunnel.v1"

// Handshake headers in which agentk describes itself when it connects.
// KAS reports them to admins (and, in GitLab mode, to GitLab's agent
// tracker, which shows one connection per agentk pod).
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

// maxMetaValueLen bounds each metadata value, so that an agent cannot make
// KAS keep arbitrary amounts of memory per connection. Kubernetes names are
// at most 253 bytes.
const maxMetaValueLen = 253

// AgentMeta is what agentk tells KAS about itself in the handshake.
type AgentMeta struct {
	// Version and CommitID identify the agentk build.
	Version  string
	CommitID string
	// PodNamespace and PodName are where agentk runs (from the downward
	// API's POD_NAMESPACE and POD_NAME).
	PodNamespace string
	PodName      string
	// PodID is a random number agentk picks once at start; all connections
	// of one agentk process share it. GitLab calls it the connection id of
	// an agentk pod.
	PodID int64
	// ConnectionID is a random number agentk picks per tunnel connection.
	ConnectionID int64
	// KubernetesVersion is the gitVersion the cluster reported to agentk
	// (for example "v1.32.13"), empty if agentk could not ask.
	KubernetesVersion string
	// KubernetesPlatform is the platform the cluster reported (for
	// example "linux/amd64"); GitLab's agent tracker shows it.
	KubernetesPlatform string
}

// SetHeaders writes m into the handshake headers h.
func (m AgentMeta) SetHeaders(h http.Header) {
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

// ErrBadMeta is wrapped by errors about malformed handshake metadata.
var ErrBadMeta = errors.New("malformed agent metadata")

// MetaFromHeaders reads the metadata agentk sent in its handshake. Missing
// values stay empty or zero; values that are too long or not printable
// ASCII are an error wrapping [ErrBadMeta], because they can only come from
// a broken or hostile agent.
func MetaFromHeaders(h http.Header) (AgentMeta, error) {
	var m AgentMeta
	var errs []error
	get := func(k string) string {
		v := h.Get(k)
		if len(v) > maxMetaValueLen || strings.IndexFunc(v, notPrintableASCII) >= 0 {
			errs = append(errs, fmt.Errorf("%w: header %s", ErrBadMeta, k))
			return ""
		}
		return v
	}
	getInt := func(k string) int64 {
		v := get(k)
		if v == "" {
			return 0
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			errs = append(errs, fmt.Errorf("%w: header %s is not an integer", ErrBadMeta, k))
		}
		return n
	}
	m.Version = get(HeaderAgentVersion)
	m.CommitID = get(HeaderAgentCommit)
	m.PodNamespace = get(HeaderPodNamespace)
	m.PodName = get(HeaderPodName)
	m.KubernetesVersion = get(HeaderKubernetesVersion)
	m.KubernetesPlatform = get(HeaderKubernetesPlatform)
	m.PodID = getInt(HeaderPodID)
	m.ConnectionID = getInt(HeaderConnectionID)
	return m, errors.Join(errs...)
}

func notPrintableASCII(r rune) bool { return r < 0x20 || r > 0x7e }
