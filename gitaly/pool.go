package gitaly

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"

	gitalypb "github.com/caddy-kas/caddy-kas/gitaly/pb"
)

// DefaultIdleTimeout is how long a [Pool] keeps a connection that no
// [Client] uses, so that the next poll of an agent finds it still open.
const DefaultIdleTimeout = 30 * time.Second

// keepaliveTime is how often an idle connection is pinged. Gitaly refuses
// pings more frequent than every 20 seconds.
const keepaliveTime = 30 * time.Second

// Info says how to reach the Gitaly server of a repository: gitaly_info of
// agent_info (kas-spec §2.1) or of ListAgentConfigFiles (gitlab-wire §A.5).
type Info struct {
	// Address is tcp://host:port, tls://host:port, unix:/path,
	// unix:///path or dns:[//authority/]host:port.
	Address string
	// Token is Gitaly's shared secret. Never log it. An empty one still
	// makes a v2 token, as KAS does, which a Gitaly without
	// authentication ignores.
	Token string
	// Features are sent as they are as metadata of every call, e.g.
	// "gitaly-feature-foo-bar": "true".
	Features map[string]string
}

// String describes i without its token.
func (i Info) String() string {
	return fmt.Sprintf("{Address:%s Token:[redacted] Features:%v}", i.Address, i.Features)
}

// Options configure a [Pool]. The zero value is GitLab's KAS defaults.
type Options struct {
	// ExtraRootCAs are trusted for tls:// addresses besides the system's
	// roots; nil trusts the system's roots only.
	ExtraRootCAs *x509.CertPool
	// UserAgent identifies the agent server, as GitLab's KAS does with
	// "gitlab-kas/<version>/<commit>"; empty means "caddy-kas".
	UserAgent string
	// IdleTimeout is how long an unused connection stays open; zero means
	// DefaultIdleTimeout.
	IdleTimeout time.Duration
	// GlobalRateLimit bounds the calls to all Gitaly servers together and
	// PerServerRateLimit those to each address. A zero RateLimit means
	// the default (DefaultGlobalRateLimit, DefaultPerServerRateLimit); a
	// PerSecond of +Inf turns the limit off.
	GlobalRateLimit, PerServerRateLimit RateLimit
	// Now tells the time for Gitaly tokens; nil means time.Now.
	Now func() time.Time
	// DialOptions are added to those of every connection, after the
	// Pool's own.
	DialOptions []grpc.DialOption
}

// Pool hands out [Client]s and shares one gRPC connection among the
// Clients of the same address and token. It is safe for concurrent use.
type Pool struct {
	opts   Options
	global *rate.Limiter

	mu      sync.Mutex // guards closed, conns, servers and the refs and idle of every sharedConn
	closed  bool
	conns   map[connKey]*sharedConn
	servers map[string]*serverLimiter // by address
}

type connKey struct{ address, token string }

// sharedConn is a connection and the number of Clients using it.
type sharedConn struct {
	key    connKey
	cc     *grpc.ClientConn
	server *serverLimiter
	smart  gitalypb.SmartHTTPServiceClient
	commit gitalypb.CommitServiceClient

	// Guarded by Pool.mu.
	refs int
	idle *time.Timer // set while refs == 0
}

// serverLimiter is the rate limit of one address, shared by the
// connections to it (one per token).
type serverLimiter struct {
	limiter *rate.Limiter
	conns   int // guarded by Pool.mu
}

// NewPool returns a Pool; Close it when done.
func NewPool(opts Options) (*Pool, error) {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.UserAgent == "" {
		opts.UserAgent = "caddy-kas"
	}
	if opts.IdleTimeout <= 0 {
		opts.IdleTimeout = DefaultIdleTimeout
	}
	if opts.GlobalRateLimit == (RateLimit{}) {
		opts.GlobalRateLimit = DefaultGlobalRateLimit
	}
	if opts.PerServerRateLimit == (RateLimit{}) {
		opts.PerServerRateLimit = DefaultPerServerRateLimit
	}
	if err := opts.GlobalRateLimit.validate(); err != nil {
		return nil, fmt.Errorf("gitaly global rate limit: %w", err)
	}
	if err := opts.PerServerRateLimit.validate(); err != nil {
		return nil, fmt.Errorf("gitaly per-server rate limit: %w", err)
	}
	return &Pool{
		opts:    opts,
		global:  newLimiter(opts.GlobalRateLimit),
		conns:   make(map[connKey]*sharedConn),
		servers: make(map[string]*serverLimiter),
	}, nil
}

// Client returns a Client for the Gitaly server info names, on the
// connection shared with the other Clients of the same address and token,
// dialling it if there is none. Release the Client when done with it. The
// connection is made lazily: an unreachable server shows as
// [ErrUnavailable] from the calls, not here.
func (p *Pool) Client(info Info) (*Client, error) {
	features, err := featureMetadata(info.Features)
	if err != nil {
		return nil, err
	}
	key := connKey{info.Address, info.Token}

	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, fmt.Errorf("gitaly: %w", ErrClosed)
	}
	sc := p.conns[key]
	if sc == nil {
		if sc, err = p.dial(key); err != nil {
			return nil, err
		}
		p.conns[key] = sc
	}
	sc.refs++
	if sc.idle != nil {
		sc.idle.Stop()
		sc.idle = nil
	}
	return &Client{pool: p, conn: sc, features: features}, nil
}

// Close closes every connection; Clients still in use fail with
// [ErrClosed] from then on.
func (p *Pool) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	var errs []error
	for key, sc := range p.conns {
		if sc.idle != nil {
			sc.idle.Stop()
		}
		errs = append(errs, sc.cc.Close())
		delete(p.conns, key)
	}
	clear(p.servers)
	return errors.Join(errs...)
}

// Conns is the number of open connections, idle ones included.
func (p *Pool) Conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns)
}

// release drops one use of sc and, when it was the last, closes sc after
// the idle timeout unless a Client takes it up again before.
func (p *Pool) release(sc *sharedConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.conns[sc.key] != sc {
		return
	}
	sc.refs--
	if sc.refs > 0 {
		return
	}
	var t *time.Timer
	t = time.AfterFunc(p.opts.IdleTimeout, func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		// A Client may have taken sc up, or the Pool closed it, meanwhile.
		if sc.idle != t || p.conns[sc.key] != sc {
			return
		}
		p.dropLocked(sc)
	})
	sc.idle = t
}

// dropLocked closes sc and forgets it. p.mu must be held.
func (p *Pool) dropLocked(sc *sharedConn) {
	delete(p.conns, sc.key)
	_ = sc.cc.Close() // the connection is unused; nothing to report to
	sc.server.conns--
	if sc.server.conns == 0 {
		delete(p.servers, sc.key.address)
	}
}

// dial makes the connection for key. p.mu must be held.
func (p *Pool) dial(key connKey) (*sharedConn, error) {
	target, creds, extra, err := dialTarget(key.address, p.opts.ExtraRootCAs)
	if err != nil {
		return nil, err
	}
	server := p.servers[key.address]
	if server == nil {
		server = &serverLimiter{limiter: newLimiter(p.opts.PerServerRateLimit)}
	}
	limit := func(ctx context.Context) error {
		if err := waitLimit(ctx, p.global); err != nil {
			return err
		}
		return waitLimit(ctx, server.limiter)
	}
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithPerRPCCredentials(tokenCredentials{token: []byte(key.token), now: p.opts.Now}),
		grpc.WithUserAgent(p.opts.UserAgent),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: keepaliveTime, PermitWithoutStream: true}),
		grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			if err := limit(ctx); err != nil {
				return err
			}
			return invoker(ctx, method, req, reply, cc, opts...)
		}),
		grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			if err := limit(ctx); err != nil {
				return nil, err
			}
			return streamer(ctx, desc, cc, method, opts...)
		}),
	}
	opts = append(opts, extra...)
	opts = append(opts, p.opts.DialOptions...)
	cc, err := grpc.NewClient(target, opts...)
	if err != nil {
		return nil, fmt.Errorf("gitaly: connecting to %s: %w", key.address, err)
	}
	server.conns++
	p.servers[key.address] = server
	return &sharedConn{
		key:    key,
		cc:     cc,
		server: server,
		smart:  gitalypb.NewSmartHTTPServiceClient(cc),
		commit: gitalypb.NewCommitServiceClient(cc),
	}, nil
}

// dialTarget turns a gitaly_info address into a gRPC target and its
// transport credentials.
func dialTarget(address string, extraRoots *x509.CertPool) (target string, creds credentials.TransportCredentials, extra []grpc.DialOption, err error) {
	scheme, rest, ok := strings.Cut(address, ":")
	if !ok {
		return "", nil, nil, fmt.Errorf("gitaly address %q has no scheme (tcp://, tls://, unix: or dns:)", address)
	}
	switch scheme {
	case "tcp", "tls":
		hostport, ok := strings.CutPrefix(rest, "//")
		if !ok {
			return "", nil, nil, fmt.Errorf("gitaly address %q: want %s://host:port", address, scheme)
		}
		host, port, err := net.SplitHostPort(hostport)
		if err != nil || host == "" || port == "" {
			return "", nil, nil, fmt.Errorf("gitaly address %q: want %s://host:port", address, scheme)
		}
		// passthrough: the address is dialled as it is, as Gitaly's own
		// client does for these schemes.
		target = "passthrough:///" + hostport
		if scheme == "tcp" {
			return target, insecure.NewCredentials(), nil, nil
		}
		return target, credentials.NewTLS(tlsConfig(host, extraRoots)), nil, nil
	case "unix":
		path := rest
		if p, ok := strings.CutPrefix(rest, "//"); ok {
			// unix:///path: an empty authority and an absolute path.
			if !strings.HasPrefix(p, "/") {
				return "", nil, nil, fmt.Errorf("gitaly address %q: want unix:/path or unix:///path", address)
			}
			path = p
		}
		if path == "" {
			return "", nil, nil, fmt.Errorf("gitaly address %q has no socket path", address)
		}
		return "unix:" + path, insecure.NewCredentials(), nil, nil
	case "dns":
		// gRPC's DNS resolver, with the calls spread over the addresses
		// it finds, as Gitaly's client does.
		return address, insecure.NewCredentials(),
			[]grpc.DialOption{grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`)}, nil
	}
	return "", nil, nil, fmt.Errorf("gitaly address %q: unsupported scheme %q (want tcp, tls, unix or dns)", address, scheme)
}

// tlsConfig is TLS 1.2 or later to host, trusting the system's roots and,
// if not nil, extraRoots too.
func tlsConfig(host string, extraRoots *x509.CertPool) *tls.Config {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: host}
	if extraRoots == nil {
		return cfg
	}
	// A CertPool cannot be merged into the system's, so the chain is
	// verified here: against the system's roots, then against extraRoots.
	// InsecureSkipVerify only turns the built-in verification off in
	// favour of this one, which checks the chain and the name alike.
	cfg.InsecureSkipVerify = true
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("gitaly: the server sent no certificate")
		}
		intermediates := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			intermediates.AddCert(c)
		}
		opts := x509.VerifyOptions{DNSName: cs.ServerName, Intermediates: intermediates}
		if _, err := cs.PeerCertificates[0].Verify(opts); err == nil {
			return nil
		}
		opts.Roots = extraRoots
		_, err := cs.PeerCertificates[0].Verify(opts)
		return err
	}
	return cfg
}

// reservedMetadata are keys a feature flag must not set: gRPC's and the
// token's.
var reservedMetadata = map[string]bool{
	"authorization": true, "user-agent": true, "content-type": true, "te": true, "host": true,
}

// featureMetadata turns Info.Features into metadata pairs, sorted by key.
// gRPC metadata keys are lowercase; a key gRPC would refuse, one that would
// override the token, or two keys that differ only in case are an error
// rather than a failing call later.
func featureMetadata(features map[string]string) ([]string, error) {
	lowered := make(map[string]string, len(features))
	for k, v := range features {
		lk := strings.ToLower(k)
		if !validMetadataKey(lk) || reservedMetadata[lk] || strings.HasPrefix(lk, "grpc-") || strings.HasSuffix(lk, "-bin") {
			return nil, fmt.Errorf("gitaly: feature flag %q is not a metadata key KAS can send", k)
		}
		if _, dup := lowered[lk]; dup {
			return nil, fmt.Errorf("gitaly: feature flag %q given twice in different cases", lk)
		}
		for i := 0; i < len(v); i++ {
			if v[i] < 0x20 || v[i] > 0x7e {
				return nil, fmt.Errorf("gitaly: feature flag %q has a value that is not printable ASCII", k)
			}
		}
		lowered[lk] = v
	}
	keys := make([]string, 0, len(lowered))
	for k := range lowered {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	pairs := make([]string, 0, 2*len(keys))
	for _, k := range keys {
		pairs = append(pairs, k, lowered[k])
	}
	return pairs, nil
}

func validMetadataKey(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' && c != '_' && c != '.' {
			return false
		}
	}
	return true
}
