package tunnel

import (
	"context"
	"sync"
	"time"
)

// Store keeps the tunnels connected to this node, of every protocol, by
// agent id. It is what the agent tracker lists and what [Router] picks
// from; it does no selection and no waiting of its own. It plays the part
// of konnectivity's BackendStorage, and [Router] that of its
// BackendManager.
type Store struct {
	// created is when the store was made: for an agent that has not
	// connected since, the start of its absence.
	created time.Time

	mu     sync.Mutex // guards agents, lastConnected, closed and drain
	agents map[int64]*agentEntry
	// lastConnected holds, for every agent that has had a tunnel here and
	// has none now, when its last tunnel was removed. One entry per agent
	// that ever connected: agents are authenticated before they are
	// added, so made-up ids cannot grow it.
	lastConnected map[int64]time.Time
	closed        bool
	// drain is set while the node stops: every tunnel, also one added
	// from then on, is drained with it.
	drain *storeDrain
}

// storeDrain is the state of [Store.Drain]; the Store's mu guards its
// pending and over.
type storeDrain struct {
	ctx     context.Context // ends at the end of the grace period
	grace   time.Duration
	pending int           // tunnels being drained
	over    chan struct{} // closed once pending dropped to zero
}

// agentEntry is the store's state for one agent. It exists while the agent
// has tunnels or someone watches for one, and no longer, so that requests
// for made-up agent ids leave nothing behind.
type agentEntry struct {
	tunnels  []Tunnel
	watchers int
	// added is closed (and replaced) when a tunnel is added or the store
	// closes, to wake the watchers.
	added chan struct{}
}

// NewStore returns an empty store.
func NewStore() *Store {
	return &Store{created: time.Now(), agents: make(map[int64]*agentEntry), lastConnected: make(map[int64]time.Time)}
}

// Add makes t available for requests to its agent until t is done or the
// returned function is called (which may happen more than once). Adding to
// a closed store closes t.
func (s *Store) Add(t Tunnel) (remove func()) {
	id := t.Agent().ID
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		t.Close()
		return func() {}
	}
	e := s.entryLocked(id)
	e.tunnels = append(e.tunnels, t)
	delete(s.lastConnected, id)
	close(e.added)
	e.added = make(chan struct{})
	if d := s.drain; d != nil {
		// It got through the handshake as the node began to stop.
		s.drainLocked(d, t)
	}
	s.mu.Unlock()

	var once sync.Once
	return func() { once.Do(func() { s.remove(id, t) }) }
}

func (s *Store) entryLocked(id int64) *agentEntry {
	e := s.agents[id]
	if e == nil {
		e = &agentEntry{added: make(chan struct{})}
		s.agents[id] = e
	}
	return e
}

func (s *Store) remove(id int64, t Tunnel) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.agents[id]
	if e == nil {
		return
	}
	for i, x := range e.tunnels {
		if x == t {
			e.tunnels = append(e.tunnels[:i], e.tunnels[i+1:]...)
			if len(e.tunnels) == 0 {
				s.lastConnected[id] = time.Now()
			}
			break
		}
	}
	s.dropIfUnusedLocked(id, e)
}

func (s *Store) dropIfUnusedLocked(id int64, e *agentEntry) {
	if len(e.tunnels) == 0 && e.watchers == 0 {
		delete(s.agents, id)
	}
}

// Tunnels appends the live tunnels of the agent to dst and returns the
// result. With a dst of enough capacity it allocates nothing, which keeps
// the lookup of every proxied request cheap.
func (s *Store) Tunnels(agentID int64, dst []Tunnel) []Tunnel {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.agents[agentID]; e != nil {
		dst = appendLive(dst, e.tunnels)
	}
	return dst
}

// LastConnected returns when the agent last had a tunnel here: now while
// it has one (live or still listed), else when its last tunnel was
// removed. For an agent that has had none since the store was made, it
// returns when the store was made, and seen false.
func (s *Store) LastConnected(agentID int64) (at time.Time, seen bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.agents[agentID]; e != nil && len(e.tunnels) > 0 {
		return time.Now(), true
	}
	if at, ok := s.lastConnected[agentID]; ok {
		return at, true
	}
	return s.created, false
}

// All returns the live tunnels of every agent.
func (s *Store) All() []Tunnel {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Tunnel
	for _, e := range s.agents {
		out = appendLive(out, e.tunnels)
	}
	return out
}

// Replaced reports whether t's agent has a live tunnel here besides t
// that is not moving: once it has, t may close without a request for the
// agent finding none.
func (s *Store) Replaced(t Tunnel) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.agents[t.Agent().ID]; e != nil {
		for _, x := range e.tunnels {
			if x != t && x.Err() == nil && !isMoving(x) {
				return true
			}
		}
	}
	return false
}

// appendLive appends the tunnels that are not done. A done tunnel is
// still listed for a moment, until its owner removes it.
func appendLive(dst, tunnels []Tunnel) []Tunnel {
	for _, t := range tunnels {
		if t.Err() == nil {
			dst = append(dst, t)
		}
	}
	return dst
}

// Watch returns a channel that is closed when a tunnel of the agent is
// added or the store closes, and a function to call once the caller no
// longer waits (which may happen more than once). Watch before looking,
// then look, then wait: a tunnel added in between is not missed.
func (s *Store) Watch(agentID int64) (added <-chan struct{}, stop func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return closedChan, func() {}
	}
	e := s.entryLocked(agentID)
	e.watchers++
	var once sync.Once
	return e.added, func() {
		once.Do(func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			e.watchers--
			if s.agents[agentID] == e {
				s.dropIfUnusedLocked(agentID, e)
			}
		})
	}
}

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// Err returns an error wrapping [ErrStoreClosed] once the store is closed,
// else nil.
func (s *Store) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrStoreClosed
	}
	return nil
}

// Close closes every tunnel and wakes every watcher; nothing can be added
// from then on. It is for process shutdown: a configuration reload keeps
// the store, and with it the tunnels.
func (s *Store) Close() error {
	s.mu.Lock()
	s.closed = true
	var all []Tunnel
	for _, e := range s.agents {
		all = append(all, e.tunnels...)
		close(e.added)
		e.added = make(chan struct{})
	}
	s.mu.Unlock()
	for _, t := range all {
		t.Close()
	}
	return nil
}

// Drain is for a node that stops while agents can reach another: it asks
// every agent to move ([Movable]) and closes each tunnel once it carries no
// request, or when grace has passed since Drain began, or when ctx is
// done. A tunnel added meanwhile is drained too. Drain returns once every
// tunnel is closed; calling it again waits for the same drain. Tunnels that
// cannot move are closed once idle as well.
func (s *Store) Drain(ctx context.Context, grace time.Duration) {
	s.mu.Lock()
	d := s.drain
	if d == nil {
		dctx, cancel := context.WithTimeout(ctx, grace)
		defer cancel()
		d = &storeDrain{ctx: dctx, grace: grace, over: make(chan struct{})}
		s.drain = d
		for _, e := range s.agents {
			for _, t := range e.tunnels {
				s.drainLocked(d, t)
			}
		}
		if d.pending == 0 {
			close(d.over)
		}
	}
	s.mu.Unlock()
	<-d.over
}

// drainLocked drains t in a goroutine of its own, which d.ctx bounds and
// [Store.Drain] waits for; after the drain is over, t is closed at once.
func (s *Store) drainLocked(d *storeDrain, t Tunnel) {
	select {
	case <-d.over:
		go t.Close() // Close may call back into the store
		return
	default:
	}
	d.pending++
	go func() {
		Drain(d.ctx, t, DrainOptions{Grace: d.grace})
		s.mu.Lock()
		defer s.mu.Unlock()
		if d.pending--; d.pending == 0 {
			close(d.over)
		}
	}()
}

// Draining reports whether [Store.Drain] was called: the node is stopping,
// and an agent endpoint should send agents elsewhere.
func (s *Store) Draining() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.drain != nil
}
