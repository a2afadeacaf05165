package fakecluster

import (
	"context"
	"slices"
	"strings"
	"sync"
)

// Subresource names a pod subresource that the Cluster serves itself.
type Subresource string

const (
	Exec        Subresource = "exec"
	Attach      Subresource = "attach"
	PortForward Subresource = "portforward"
	Log         Subresource = "log"
)

// StreamCounts counts the streams of one subresource that reached the fake
// runtime: an exec or attach session, one forwarded connection of a
// port-forward, one log request. Ended counts those that are over on the
// upstream side, whatever ended them.
type StreamCounts struct {
	Started int
	Ended   int
}

// Active is the number of streams that started and did not end yet.
func (c StreamCounts) Active() int { return c.Started - c.Ended }

// Request is what the Cluster saw of one request for a pod subresource.
type Request struct {
	Subresource Subresource
	Namespace   string
	Pod         string
	Method      string
	RawQuery    string
	// Upgrade is the request's Upgrade header: "websocket", "SPDY/3.1" or
	// empty.
	Upgrade string
	// Protocols are the protocols the client offered: the
	// Sec-WebSocket-Protocol list of a WebSocket upgrade, the
	// X-Stream-Protocol-Version values of a SPDY one.
	Protocols []string
	// Status is the status code the Cluster answered with through the
	// ResponseWriter (0 if none, such as after an upgrade).
	Status int
	// Upgraded is true when the handler took the connection over for an
	// upgrade (whatever the upgrade's outcome).
	Upgraded bool
	// Done is true once the Cluster's handler returned; Status and Upgraded
	// are final then. The handler of an upgraded request returns when its
	// streams are over.
	Done bool
}

// IsWebSocket reports whether the request asked for a WebSocket upgrade.
func (r Request) IsWebSocket() bool { return strings.EqualFold(r.Upgrade, "websocket") }

// IsSPDY reports whether the request asked for a SPDY/3.1 upgrade.
func (r Request) IsSPDY() bool { return strings.EqualFold(r.Upgrade, "SPDY/3.1") }

// stats keeps the StreamCounts and Requests; changed is closed and replaced
// at every change, so waiters need no polling.
type stats struct {
	mu       sync.Mutex
	counts   map[Subresource]StreamCounts
	requests []Request
	changed  chan struct{}
}

func newStats() *stats {
	return &stats{counts: make(map[Subresource]StreamCounts), changed: make(chan struct{})}
}

func (s *stats) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// start counts a stream of kind as started and returns the function that
// counts it as ended.
func (s *stats) start(kind Subresource) (end func()) {
	s.mu.Lock()
	c := s.counts[kind]
	c.Started++
	s.counts[kind] = c
	s.notifyLocked()
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			c := s.counts[kind]
			c.Ended++
			s.counts[kind] = c
			s.notifyLocked()
			s.mu.Unlock()
		})
	}
}

// recordStart notes a request as it arrives and returns its index for
// recordEnd.
func (s *stats) recordStart(r Request) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests = append(s.requests, r)
	s.notifyLocked()
	return len(s.requests) - 1
}

// recordEnd notes how the request at index was answered.
func (s *stats) recordEnd(index, status int, upgraded bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests[index].Status = status
	s.requests[index].Upgraded = upgraded
	s.requests[index].Done = true
	s.notifyLocked()
}

func (s *stats) snapshot(kind Subresource) (StreamCounts, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.counts[kind], s.changed
}

// Streams returns the StreamCounts of kind so far.
func (c *Cluster) Streams(kind Subresource) StreamCounts {
	counts, _ := c.stats.snapshot(kind)
	return counts
}

// LogStreamsEnded is the number of log requests whose response ended on the
// upstream side, such as a `kubectl logs -f` that was interrupted.
func (c *Cluster) LogStreamsEnded() int { return c.Streams(Log).Ended }

// WaitStreams waits until cond holds for the StreamCounts of kind, or ctx
// ends; it returns the last counts it saw and ctx's error, if any.
func (c *Cluster) WaitStreams(ctx context.Context, kind Subresource, cond func(StreamCounts) bool) (StreamCounts, error) {
	for {
		counts, changed := c.stats.snapshot(kind)
		if cond(counts) {
			return counts, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return counts, ctx.Err()
		}
	}
}

// Requests returns the pod subresource requests the Cluster received so far,
// oldest first.
func (c *Cluster) Requests() []Request {
	requests, _ := c.stats.requestsSnapshot()
	return requests
}

func (s *stats) requestsSnapshot() ([]Request, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := slices.Clone(s.requests)
	for i := range out {
		out[i].Protocols = slices.Clone(out[i].Protocols)
	}
	return out, s.changed
}

// WaitRequests waits until cond holds for the Requests so far, or ctx ends;
// it returns the last Requests it saw and ctx's error, if any.
func (c *Cluster) WaitRequests(ctx context.Context, cond func([]Request) bool) ([]Request, error) {
	for {
		requests, changed := c.stats.requestsSnapshot()
		if cond(requests) {
			return requests, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return requests, ctx.Err()
		}
	}
}
