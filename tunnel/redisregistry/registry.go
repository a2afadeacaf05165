package redisregistry

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/tunnel"
)

// ErrUnavailable is wrapped by the errors of reads and counts when Redis
// cannot be reached or does not answer in time, and once the registry is
// closed.
var ErrUnavailable = errors.New("redis unavailable")

// Defaults of [Options].
const (
	// DefaultKeyPrefix starts every key and the events channel.
	DefaultKeyPrefix = "caddy-kas"
	// DefaultTTL is GitLab's agent.redis_conn_info_ttl (kas-spec §5.1).
	DefaultTTL = 5 * time.Minute
	// DefaultRefresh is GitLab's agent.redis_conn_info_refresh.
	DefaultRefresh = 4 * time.Minute
)

// Options configure a Registry.
type Options struct {
	// Client is the Redis client: single, Sentinel (failover) or Cluster.
	// Required. The registry never closes it.
	Client redis.UniversalClient
	// KeyPrefix starts every key and the events channel; default
	// "caddy-kas".
	KeyPrefix string
	// OwnURLs are this node's private API URLs as other nodes reach it;
	// required, non-empty. The first names the node in the tracker.
	OwnURLs []string
	// TTL is how long an entry lives without refresh; default 5 minutes.
	TTL time.Duration
	// Refresh is how often this node rewrites its entries; default 4
	// minutes; must be less than TTL.
	Refresh time.Duration
	// Logger receives the registry's logs; default none.
	Logger *zap.Logger
}

// tuning holds the registry's fixed intervals, which tests shorten.
type tuning struct {
	// opTimeout bounds each Redis operation, so that a Redis that does not
	// answer costs a caller a bounded wait.
	opTimeout time.Duration
	// wakeInterval is the longest a waiter of Nodes waits before its
	// channel closes, so that it never depends on pub/sub alone; it also
	// bounds how long an answer of Nodes is cached.
	wakeInterval time.Duration
	// retryInterval is how soon a failed write is retried (as a rewrite
	// of everything this node holds).
	retryInterval time.Duration
	// logInterval is how often a repeating error is logged at most.
	logInterval time.Duration
	// pingInterval is how long the subscriber waits for a message before
	// it checks the subscription's connection with a PING.
	pingInterval time.Duration
}

var defaultTuning = tuning{
	opTimeout:     2 * time.Second,
	wakeInterval:  10 * time.Second,
	retryInterval: time.Second,
	logInterval:   30 * time.Second,
	pingInterval:  5 * time.Second,
}

// Registry shares this node's tunnels and agent connections with the other
// nodes through Redis, and tells which other nodes hold tunnels of an
// agent. It is safe for concurrent use.
type Registry struct {
	client  redis.UniversalClient
	log     *zap.Logger
	keys    keys
	ownURLs []string
	own     map[string]bool
	// node names this node in the tracker: its first own URL.
	node string
	// instance tells this registry's connection fields apart from those
	// of any other registry, also of an earlier run of this node.
	instance     string
	ttl, refresh time.Duration
	gcInterval   time.Duration
	tuning

	mu sync.Mutex // guards held, perAgent, seq, pendingWrite, removals, announce and closed
	// held are this node's published tunnels, by sequence number.
	held map[uint64]*heldTunnel
	// perAgent counts held tunnels per agent; this node's URLs leave an
	// agent's entry when its count drops to zero.
	perAgent map[int64]int
	seq      uint64
	// pendingWrite are held tunnels not yet written.
	pendingWrite map[uint64]bool
	// removals are unpublished connections not yet deleted from Redis.
	removals []removal
	// announce are the agents whose tunnels on this node changed since
	// the last event.
	announce map[int64]bool
	closed   bool

	waitMu sync.Mutex // guards waits
	// waits are, per agent asked about, the cached answer of Nodes and
	// the channel closed when it may have changed. An entry lives at most
	// wakeInterval, so agent ids asked about leave nothing behind.
	waits map[int64]*agentWait

	// kick wakes the writer for pending writes; rewrite makes it rewrite
	// everything (the subscription was re-established: Redis may have
	// lost our entries).
	kick, rewrite chan struct{}
	// stop is closed by Close to stop the goroutines; cancel cancels
	// ctx, the context of their Redis operations.
	stop   chan struct{}
	ctx    context.Context
	cancel context.CancelFunc
	pubsub *redis.PubSub
	wg     sync.WaitGroup // the writer, subscriber and waker goroutines

	writeErrs, readErrs, subErrs *errorLog
}

type heldTunnel struct {
	t     tunnel.Tunnel
	field string
}

type removal struct {
	agentID, projectID int64
	field              string
	at                 time.Time
}

type agentWait struct {
	changed chan struct{}
	urls    []string
	fetched bool
}

// New checks opts and returns a Registry whose goroutines (writer,
// subscriber, waker) run until Close.
func New(opts Options) (*Registry, error) {
	return newRegistry(opts, defaultTuning)
}

func newRegistry(opts Options, tn tuning) (*Registry, error) {
	if opts.Client == nil {
		return nil, errors.New("redis registry: a Redis client is required")
	}
	if len(opts.OwnURLs) == 0 {
		return nil, errors.New("redis registry: this node's own private API URLs are required")
	}
	own := make(map[string]bool, len(opts.OwnURLs))
	for _, u := range opts.OwnURLs {
		if u == "" {
			return nil, errors.New("redis registry: an own private API URL is empty")
		}
		own[u] = true
	}
	if opts.KeyPrefix == "" {
		opts.KeyPrefix = DefaultKeyPrefix
	}
	if opts.TTL == 0 {
		opts.TTL = DefaultTTL
	}
	if opts.Refresh == 0 {
		opts.Refresh = DefaultRefresh
	}
	if opts.TTL < 0 || opts.Refresh < 0 || opts.Refresh >= opts.TTL {
		return nil, fmt.Errorf("redis registry: the refresh interval (%v) must be positive and less than the TTL (%v)", opts.Refresh, opts.TTL)
	}
	log := opts.Logger
	if log == nil {
		log = zap.NewNop()
	}
	var id [8]byte
	_, _ = rand.Read(id[:]) // never fails (crypto/rand)
	ctx, cancel := context.WithCancel(context.Background())
	r := &Registry{
		client:       opts.Client,
		log:          log,
		keys:         keys{prefix: opts.KeyPrefix},
		ownURLs:      append([]string(nil), opts.OwnURLs...),
		own:          own,
		node:         opts.OwnURLs[0],
		instance:     hex.EncodeToString(id[:]),
		ttl:          opts.TTL,
		refresh:      opts.Refresh,
		gcInterval:   2 * opts.TTL,
		tuning:       tn,
		held:         make(map[uint64]*heldTunnel),
		perAgent:     make(map[int64]int),
		pendingWrite: make(map[uint64]bool),
		announce:     make(map[int64]bool),
		waits:        make(map[int64]*agentWait),
		kick:         make(chan struct{}, 1),
		rewrite:      make(chan struct{}, 1),
		stop:         make(chan struct{}),
		ctx:          ctx,
		cancel:       cancel,
	}
	r.writeErrs = newErrorLog(log, "cannot write the tunnel registry to redis",
		"writing the tunnel registry to redis works again", tn.logInterval)
	r.readErrs = newErrorLog(log, "cannot read the tunnel registry from redis",
		"reading the tunnel registry from redis works again", tn.logInterval)
	r.subErrs = newErrorLog(log, "cannot receive tunnel registry events from redis",
		"receiving tunnel registry events from redis works again", tn.logInterval)
	// Subscribe does not fail when Redis is down: the subscriber's
	// first receive connects, and so does every later one after an error.
	r.pubsub = r.client.Subscribe(ctx, r.keys.events())
	r.wg.Add(3)
	go r.writer()
	go r.subscriber()
	go r.waker()
	return r, nil
}

// Publish announces a tunnel of this node until t is done or the returned
// function is called (which may happen more than once): the agent's entry
// lists this node's URLs, the tracker lists the connection, and the nodes
// waiting for the agent learn it at once. It never blocks on Redis.
func (r *Registry) Publish(t tunnel.Tunnel) (unpublish func()) {
	agentID := t.Agent().ID
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return func() {}
	}
	r.seq++
	seq := r.seq
	r.held[seq] = &heldTunnel{t: t, field: r.instance + ":" + strconv.FormatUint(seq, 10)}
	r.perAgent[agentID]++
	r.pendingWrite[seq] = true
	r.announce[agentID] = true
	r.mu.Unlock()
	r.kickWriter()

	var once sync.Once
	unpublish = func() { once.Do(func() { r.unpublish(seq) }) }
	t.AfterDone(unpublish)
	return unpublish
}

func (r *Registry) unpublish(seq uint64) {
	r.mu.Lock()
	h := r.held[seq]
	if h == nil || r.closed {
		r.mu.Unlock()
		return
	}
	a := h.t.Agent()
	delete(r.held, seq)
	delete(r.pendingWrite, seq)
	if r.perAgent[a.ID]--; r.perAgent[a.ID] <= 0 {
		delete(r.perAgent, a.ID)
	}
	r.removals = append(r.removals, removal{agentID: a.ID, projectID: a.ProjectID, field: h.field, at: time.Now()})
	r.announce[a.ID] = true
	r.mu.Unlock()
	r.kickWriter()
}

func (r *Registry) kickWriter() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// Close stops the goroutines, removes this node's entries from Redis, so
// that other nodes stop routing here at once, and announces it. ctx
// bounds the removal. Tunnels published later are not announced.
func (r *Registry) Close(ctx context.Context) error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.mu.Unlock()
	if err := r.stopGoroutines(ctx); err != nil {
		return err
	}

	// The writer has stopped: what is held and pending now is final.
	// Every connection goes, and with it this node's URLs from every
	// agent's entry it touched.
	r.mu.Lock()
	b := &batch{removals: r.removals, dropNode: make(map[int64]bool)}
	r.removals = nil
	for _, h := range r.held {
		a := h.t.Agent()
		b.removals = append(b.removals, removal{agentID: a.ID, projectID: a.ProjectID, field: h.field})
	}
	for _, rm := range b.removals {
		r.announce[rm.agentID] = true
	}
	for id := range r.announce {
		b.dropNode[id] = true
		b.announce = append(b.announce, id)
	}
	clear(r.announce)
	r.mu.Unlock()
	if err := r.apply(ctx, b); err != nil {
		return fmt.Errorf("redis registry: removing this node's entries: %w", err)
	}
	return nil
}

// stopGoroutines stops the writer, subscriber and waker, and wakes every
// waiter of Nodes for the last time.
func (r *Registry) stopGoroutines(ctx context.Context) error {
	close(r.stop)
	r.cancel()
	_ = r.pubsub.Close()
	stopped := make(chan struct{})
	go func() { r.wg.Wait(); close(stopped) }()
	select {
	case <-stopped:
	case <-ctx.Done():
		return fmt.Errorf("redis registry: waiting for its goroutines to stop: %w", ctx.Err())
	}
	r.wakeAll()
	return nil
}
