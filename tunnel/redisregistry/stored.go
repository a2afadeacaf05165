package redisregistry

import (
	"encoding/json"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-kas/caddy-kas/tunnel"
)

// Connection is one agent connection (tunnel) of any node, as the agent
// tracker lists it.
type Connection struct {
	AgentID, ProjectID int64
	AgentName          string
	Meta               tunnel.AgentMeta
	ConnectedAt        time.Time
	// Node is the first own URL of the node that holds it.
	Node string
}

// storedConnection is the JSON value of a tracker field.
type storedConnection struct {
	// ExpiresAt is in Unix milliseconds.
	ExpiresAt   int64      `json:"expires_at"`
	AgentID     int64      `json:"agent_id"`
	ProjectID   int64      `json:"project_id,omitempty"`
	AgentName   string     `json:"agent_name,omitempty"`
	Meta        storedMeta `json:"meta"`
	ConnectedAt time.Time  `json:"connected_at"`
	Node        string     `json:"node"`
}

// storedMeta is [tunnel.AgentMeta] with stable JSON names.
type storedMeta struct {
	Version            string `json:"version,omitempty"`
	CommitID           string `json:"commit_id,omitempty"`
	PodNamespace       string `json:"pod_namespace,omitempty"`
	PodName            string `json:"pod_name,omitempty"`
	PodID              int64  `json:"pod_id,omitempty"`
	ConnectionID       int64  `json:"connection_id,omitempty"`
	KubernetesVersion  string `json:"kubernetes_version,omitempty"`
	KubernetesPlatform string `json:"kubernetes_platform,omitempty"`
}

func storedConnectionOf(w tunnelWrite, node string, expires time.Time) storedConnection {
	m := w.agent.Meta
	return storedConnection{
		ExpiresAt: expires.UnixMilli(),
		AgentID:   w.agent.ID,
		ProjectID: w.agent.ProjectID,
		AgentName: w.agent.Name,
		Meta: storedMeta{
			Version: m.Version, CommitID: m.CommitID, PodNamespace: m.PodNamespace, PodName: m.PodName,
			PodID: m.PodID, ConnectionID: m.ConnectionID,
			KubernetesVersion: m.KubernetesVersion, KubernetesPlatform: m.KubernetesPlatform,
		},
		ConnectedAt: w.connectedAt,
		Node:        node,
	}
}

func (s storedConnection) connection() Connection {
	m := s.Meta
	return Connection{
		AgentID:   s.AgentID,
		ProjectID: s.ProjectID,
		AgentName: s.AgentName,
		Meta: tunnel.AgentMeta{
			Version: m.Version, CommitID: m.CommitID, PodNamespace: m.PodNamespace, PodName: m.PodName,
			PodID: m.PodID, ConnectionID: m.ConnectionID,
			KubernetesVersion: m.KubernetesVersion, KubernetesPlatform: m.KubernetesPlatform,
		},
		ConnectedAt: s.ConnectedAt,
		Node:        s.Node,
	}
}

// parseConnection decodes a tracker value; ok is false if it is
// malformed.
func parseConnection(value string) (storedConnection, bool) {
	var s storedConnection
	if err := json.Unmarshal([]byte(value), &s); err != nil || s.ExpiresAt == 0 {
		return s, false
	}
	return s, true
}

// expiryOf returns the expiry of any field's value: decimal Unix
// milliseconds, or a JSON tracker value. ok is false if it is malformed;
// such a field counts as expired.
func expiryOf(value string) (time.Time, bool) {
	if strings.HasPrefix(value, "{") {
		s, ok := parseConnection(value)
		return time.UnixMilli(s.ExpiresAt), ok
	}
	ms, err := strconv.ParseInt(value, 10, 64)
	if err != nil {
		return time.Time{}, false
	}
	return time.UnixMilli(ms), true
}

// event is the message of the events channel: the agents whose tunnels on
// Node changed.
type event struct {
	Node   string  `json:"node"`
	Agents []int64 `json:"agents"`
}
