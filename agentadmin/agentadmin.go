// Package agentadmin is what the admin API tells and does about the agents
// connected to this node: it lists their tunnels from a [tunnel.Store],
// grouped per agent, and closes an agent's tunnels on request (after a
// token rotation, say; agentk reconnects by itself).
//
// The JSON shapes here are the admin API's answers. Every connection names
// the node that holds it, so that once several nodes share a registry of
// agents, a listing that merges theirs keeps the same shape.
//
// It imports no Caddy package.
package agentadmin

import (
	"cmp"
	"slices"
	"time"

	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/redisregistry"
)

// Listing answers GET /kas/agents: every agent with a live tunnel to
// this node.
type Listing struct {
	// Node is the node that answered.
	Node string `json:"node"`
	// Agents are sorted by id; never null.
	Agents []Agent `json:"agents"`
}

// AgentAnswer answers GET /kas/agents/<id>.
type AgentAnswer struct {
	// Node is the node that answered.
	Node  string `json:"node"`
	Agent Agent  `json:"agent"`
}

// Agent is one agent and its live tunnels.
type Agent struct {
	ID   int64  `json:"id"`
	Name string `json:"name"`
	// ProjectID is the agent's configuration project in GitLab mode;
	// left out in standalone mode.
	ProjectID int64 `json:"project_id,omitempty"`
	// Connections are sorted by connection time, then connection id;
	// never empty.
	Connections []Connection `json:"connections"`
}

// Connection is one tunnel of an agent.
type Connection struct {
	// Node is the node the tunnel is connected to.
	Node string `json:"node"`
	// ConnectionID is the number agentk picked for this tunnel; for
	// GitLab's agentk, which sends none, the one the agent server picked
	// for its connection.
	ConnectionID int64 `json:"connection_id"`
	// Pod is the agentk process at the other end.
	Pod Pod `json:"pod"`
	// AgentkVersion and AgentkCommit identify the agentk build.
	AgentkVersion string `json:"agentk_version"`
	AgentkCommit  string `json:"agentk_commit,omitempty"`
	// KubernetesVersion and KubernetesPlatform are what the cluster told
	// agentk about itself; empty if agentk could not ask.
	KubernetesVersion  string `json:"kubernetes_version"`
	KubernetesPlatform string `json:"kubernetes_platform,omitempty"`
	// RemoteAddr is the address the tunnel came from, as this node sees
	// it.
	RemoteAddr string `json:"remote_addr"`
	// ConnectedAt is when the tunnel was established (RFC 3339 in JSON).
	ConnectedAt time.Time `json:"connected_at"`
	// RequestsInFlight counts the requests using or waiting for the
	// tunnel.
	RequestsInFlight int64 `json:"requests_in_flight"`
}

// Pod is where agentk runs, from its downward API environment.
type Pod struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// ID is the number agentk picked once at start; all tunnels of one
	// agentk process share it. GitLab's agent tracker calls it the
	// connection id of the agentk pod.
	ID int64 `json:"id"`
}

// Disconnected answers POST /kas/agents/<id>/disconnect.
type Disconnected struct {
	// Node is the node that answered, and whose tunnels were closed.
	Node    string `json:"node"`
	AgentID int64  `json:"agent_id"`
	// Closed counts the tunnels closed; zero if the agent had none here.
	Closed int `json:"closed"`
	// ConnectionIDs are the closed tunnels' connection ids; never null.
	ConnectionIDs []int64 `json:"connection_ids"`
}

// List returns the live tunnels of store, grouped per agent.
func List(store *tunnel.Store, node string) Listing {
	l := Listing{Node: node, Agents: []Agent{}}
	if store == nil {
		return l
	}
	byID := make(map[int64][]tunnel.Tunnel)
	for _, t := range store.All() {
		id := t.Agent().ID
		byID[id] = append(byID[id], t)
	}
	for _, tunnels := range byID {
		l.Agents = append(l.Agents, agentOf(tunnels, node))
	}
	slices.SortFunc(l.Agents, func(a, b Agent) int { return cmp.Compare(a.ID, b.ID) })
	return l
}

// Get returns the agent with this id and its live tunnels; ok is false if
// it has none in store.
func Get(store *tunnel.Store, node string, agentID int64) (answer AgentAnswer, ok bool) {
	if store == nil {
		return AgentAnswer{}, false
	}
	tunnels := store.Tunnels(agentID, nil)
	if len(tunnels) == 0 {
		return AgentAnswer{}, false
	}
	return AgentAnswer{Node: node, Agent: agentOf(tunnels, node)}, true
}

// Disconnect closes every live tunnel of the agent in store. Requests in
// flight on them fail; agentk reconnects by itself, with the token it
// reads then.
func Disconnect(store *tunnel.Store, node string, agentID int64) Disconnected {
	d := Disconnected{Node: node, AgentID: agentID, ConnectionIDs: []int64{}}
	if store == nil {
		return d
	}
	for _, t := range store.Tunnels(agentID, nil) {
		// Close's error reports how the underlying connection ended, which
		// changes nothing here: the tunnel is done either way and leaves
		// the store.
		_ = t.Close()
		d.Closed++
		d.ConnectionIDs = append(d.ConnectionIDs, t.Agent().Meta.ConnectionID)
	}
	return d
}

// agentOf describes one agent from its tunnels, which are not empty. The
// agent's name and project are the newest tunnel's: a reload may rename an
// agent, and tunnels accepted before keep the old name.
func agentOf(tunnels []tunnel.Tunnel, node string) Agent {
	conns := make([]Connection, 0, len(tunnels))
	newest := tunnels[0]
	for _, t := range tunnels {
		conns = append(conns, connectionOf(t, node))
		if t.ConnectedAt().After(newest.ConnectedAt()) {
			newest = t
		}
	}
	slices.SortFunc(conns, func(a, b Connection) int {
		return cmp.Or(a.ConnectedAt.Compare(b.ConnectedAt), cmp.Compare(a.ConnectionID, b.ConnectionID))
	})
	info := newest.Agent()
	return Agent{ID: info.ID, Name: info.Name, ProjectID: info.ProjectID, Connections: conns}
}

// connectionOf describes a live tunnel of this node, with what only the
// holding node knows.
func connectionOf(t tunnel.Tunnel, node string) Connection {
	info := t.Agent()
	c := newConnection(node, info.Meta, t.ConnectedAt())
	c.RemoteAddr = info.RemoteAddr
	c.RequestsInFlight = t.Load()
	return c
}

// newConnection describes a tunnel from what the agent said when it
// connected, as this node's tunnels and the shared registry both hold it.
func newConnection(node string, m tunnel.AgentMeta, connectedAt time.Time) Connection {
	return Connection{
		Node:               node,
		ConnectionID:       m.ConnectionID,
		Pod:                Pod{Namespace: m.PodNamespace, Name: m.PodName, ID: m.PodID},
		AgentkVersion:      m.Version,
		AgentkCommit:       m.CommitID,
		KubernetesVersion:  m.KubernetesVersion,
		KubernetesPlatform: m.KubernetesPlatform,
		ConnectedAt:        connectedAt.UTC(),
	}
}

// ListShared lists the connections of every node sharing a registry,
// grouped per agent, each naming the node (its private URL) that holds it.
// What only the holding node knows (remote address, requests in flight)
// is left empty; node is the node that answered.
func ListShared(conns []redisregistry.Connection, node string) Listing {
	l := Listing{Node: node, Agents: []Agent{}}
	byID := make(map[int64]*Agent)
	newest := make(map[int64]time.Time)
	for _, c := range conns {
		a := byID[c.AgentID]
		if a == nil {
			a = &Agent{ID: c.AgentID}
			byID[c.AgentID] = a
		}
		if !c.ConnectedAt.Before(newest[c.AgentID]) {
			newest[c.AgentID] = c.ConnectedAt
			a.Name, a.ProjectID = c.AgentName, c.ProjectID
		}
		a.Connections = append(a.Connections, newConnection(c.Node, c.Meta, c.ConnectedAt))
	}
	for _, a := range byID {
		slices.SortFunc(a.Connections, func(x, y Connection) int {
			return cmp.Or(x.ConnectedAt.Compare(y.ConnectedAt), cmp.Compare(x.Node, y.Node), cmp.Compare(x.ConnectionID, y.ConnectionID))
		})
		l.Agents = append(l.Agents, *a)
	}
	slices.SortFunc(l.Agents, func(a, b Agent) int { return cmp.Compare(a.ID, b.ID) })
	return l
}
