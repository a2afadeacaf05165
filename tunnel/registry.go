package tunnel

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// Registry keeps the live tunnel connections of agents, by agent id.
type Registry interface {
	// Register makes c available for requests to its agent until c is done
	// or the returned function is called (which may happen more than
	// once).
	Register(c *Conn) (unregister func())
	// Find returns a live connection of the agent, the least loaded one if
	// there are several. If there is none, Find waits for one until ctx is
	// done and then returns an error wrapping [ErrNoConnection].
	Find(ctx context.Context, agentID int64) (*Conn, error)
}

// ErrNoConnection is wrapped by errors of [Registry.Find] when the agent has
// no live connection.
var ErrNoConnection = errors.New("agent is not connected")

// ErrRegistryClosed is wrapped by errors of [MemoryRegistry.Find] after the
// registry was closed.
var ErrRegistryClosed = errors.New("registry closed")

// MemoryRegistry is a [Registry] for one KAS process.
type MemoryRegistry struct {
	mu     sync.Mutex // guards the fields below
	agents map[int64]*agentEntry
	closed bool
}

// agentEntry is the registry's state for one agent. It exists while the
// agent has connections or someone waits for one, and no longer, so that
// requests for made-up agent ids leave nothing behind.
type agentEntry struct {
	conns   []*Conn
	waiters int
	// arrived is closed (and replaced) when a connection registers, to
	// wake the waiters.
	arrived chan struct{}
}

// NewMemoryRegistry returns an empty registry.
func NewMemoryRegistry() *MemoryRegistry {
	return &MemoryRegistry{agents: make(map[int64]*agentEntry)}
}

// Register implements [Registry]. Registering with a closed registry closes
// c.
func (r *MemoryRegistry) Register(c *Conn) (unregister func()) {
	id := c.Agent().ID
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		c.Close()
		return func() {}
	}
	e := r.entryLocked(id)
	e.conns = append(e.conns, c)
	close(e.arrived)
	e.arrived = make(chan struct{})
	r.mu.Unlock()

	var once sync.Once
	return func() { once.Do(func() { r.remove(id, c) }) }
}

func (r *MemoryRegistry) entryLocked(id int64) *agentEntry {
	e := r.agents[id]
	if e == nil {
		e = &agentEntry{arrived: make(chan struct{})}
		r.agents[id] = e
	}
	return e
}

func (r *MemoryRegistry) remove(id int64, c *Conn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.agents[id]
	if e == nil {
		return
	}
	for i, x := range e.conns {
		if x == c {
			e.conns = append(e.conns[:i], e.conns[i+1:]...)
			break
		}
	}
	r.dropIfUnusedLocked(id, e)
}

func (r *MemoryRegistry) dropIfUnusedLocked(id int64, e *agentEntry) {
	if len(e.conns) == 0 && e.waiters == 0 {
		delete(r.agents, id)
	}
}

// Find implements [Registry].
func (r *MemoryRegistry) Find(ctx context.Context, agentID int64) (*Conn, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		if r.closed {
			return nil, fmt.Errorf("agent %d: %w", agentID, ErrRegistryClosed)
		}
		e := r.entryLocked(agentID)
		if c := leastLoaded(e.conns); c != nil {
			return c, nil
		}
		arrived := e.arrived
		e.waiters++
		r.mu.Unlock()
		var ctxErr error
		select {
		case <-arrived:
		case <-ctx.Done():
			ctxErr = context.Cause(ctx)
		}
		r.mu.Lock()
		e.waiters--
		if ctxErr != nil {
			r.dropIfUnusedLocked(agentID, e)
			return nil, fmt.Errorf("agent %d: %w: %w", agentID, ErrNoConnection, ctxErr)
		}
	}
}

// leastLoaded returns the live connection with the fewest requests, or nil.
func leastLoaded(conns []*Conn) *Conn {
	var best *Conn
	for _, c := range conns {
		if c.Err() != nil {
			continue // dead; its owner unregisters it shortly
		}
		if best == nil || c.Load() < best.Load() {
			best = c
		}
	}
	return best
}

// Close closes every registered connection and makes Find fail from then
// on. It is for process shutdown; a configuration reload keeps the
// registry.
func (r *MemoryRegistry) Close() error {
	r.mu.Lock()
	r.closed = true
	var all []*Conn
	for _, e := range r.agents {
		all = append(all, e.conns...)
		close(e.arrived) // wake waiters, who then see closed
		e.arrived = make(chan struct{})
	}
	r.mu.Unlock()
	for _, c := range all {
		c.Close()
	}
	return nil
}

// Conns returns the live connections of the agent.
func (r *MemoryRegistry) Conns(agentID int64) []*Conn {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*Conn
	if e := r.agents[agentID]; e != nil {
		for _, c := range e.conns {
			if c.Err() == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

// All returns the live connections of every agent.
func (r *MemoryRegistry) All() []*Conn {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*Conn
	for _, e := range r.agents {
		for _, c := range e.conns {
			if c.Err() == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

var _ Registry = (*MemoryRegistry)(nil)
