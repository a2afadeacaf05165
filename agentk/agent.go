package agentk

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/internal/buildinfo"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/h2tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/wsconn"
)

// Defaults of [Config].
const (
	// DefaultShutdownGrace is how long requests in flight may run on after
	// agentk was told to stop.
	DefaultShutdownGrace = 5 * time.Second
	// MaxConnections bounds Config.Connections. Every tunnel is one
	// HTTP/2 connection that carries thousands of concurrent requests;
	// more than a few only help to spread load over KAS replicas.
	MaxConnections = 100
	// DefaultAPIServerCheckInterval is how often agentk checks that the
	// apiserver answers, for /readiness: as often as kubelet probes the
	// readiness of GitLab's Helm chart (periodSeconds 10). The probe only
	// reads the last result, because kubelet gives it one second by
	// default.
	DefaultAPIServerCheckInterval = 10 * time.Second
	// observabilityShutdownTimeout bounds how long the probes and metrics
	// server waits for its requests when agentk stops.
	observabilityShutdownTimeout = 2 * time.Second
)

// Config configures an [Agent].
type Config struct {
	// KASAddress is the ws:// or wss:// URL of KAS's agent endpoint; see
	// [ParseKASAddress].
	KASAddress string
	// KASClient makes the tunnel handshakes (TLS, proxies). Nil means
	// NewKASClient with zero options.
	KASClient *http.Client
	// Token returns the agent token; it is called before every connection
	// attempt, so that a rotated token file is picked up. Required.
	Token TokenSource
	// KASHeader holds extra handshake headers (--kas-header).
	KASHeader http.Header
	// Connections is how many tunnels to keep open; zero means one.
	Connections int

	// Cluster is the kube-apiserver that requests are forwarded to.
	// Required.
	Cluster *Cluster

	// PodNamespace and PodName say where agentk runs (downward API);
	// they are reported to KAS.
	PodNamespace string
	PodName      string

	// Logger receives agentk's logs. Nil means none.
	Logger *zap.Logger
	// Backoff paces reconnects; zero fields mean GitLab's values.
	Backoff Backoff
	// ShutdownGrace is how long requests in flight may finish when Run's
	// context ends. Zero means DefaultShutdownGrace, negative none.
	ShutdownGrace time.Duration
	// APIServerCheckInterval is how often agentk checks that the
	// apiserver answers, for /readiness. Zero means
	// DefaultAPIServerCheckInterval.
	APIServerCheckInterval time.Duration
	// TunnelOptions tune the HTTP/2 connections of the tunnels.
	TunnelOptions h2tunnel.Options
	// ObservabilityListener, if not nil, serves /liveness, /readiness and
	// /metrics while Run runs. Run closes it.
	ObservabilityListener net.Listener

	// Version and Commit identify this build to KAS; empty means
	// buildinfo.Version() and buildinfo.Commit(). A build without a
	// recorded commit sends none.
	Version string
	Commit  string
}

// Agent keeps tunnels to KAS open and serves the requests KAS sends
// through them. Make one with [New] and start it with [Agent.Run].
type Agent struct {
	cfg        Config
	kasAddress *url.URL
	kasURL     string // redacted form, for logs
	log        *zap.Logger
	httpLog    *log.Logger
	metrics    *metrics
	handler    http.Handler
	podID      int64
	version    string
	commit     string
	userAgent  string
	started    atomic.Bool

	mu         sync.Mutex        // guards k8sVersion, versionOK and versionErr
	k8sVersion KubernetesVersion // last version the apiserver reported, values KAS would refuse emptied
	versionOK  *bool             // whether the last GET /version worked; nil before the first
	versionErr error             // why the last GET /version failed, if it did
}

// New checks cfg and returns an Agent.
func New(cfg Config) (*Agent, error) {
	u, err := ParseKASAddress(cfg.KASAddress)
	if err != nil {
		return nil, err
	}
	if cfg.Token == nil {
		return nil, errors.New("agentk: no agent token source")
	}
	if cfg.Cluster == nil {
		return nil, errors.New("agentk: no cluster")
	}
	if cfg.Connections == 0 {
		cfg.Connections = 1
	}
	if cfg.Connections < 1 || cfg.Connections > MaxConnections {
		return nil, fmt.Errorf("agentk: connections must be between 1 and %d, got %d", MaxConnections, cfg.Connections)
	}
	for name, v := range map[string]string{"pod namespace": cfg.PodNamespace, "pod name": cfg.PodName} {
		if !tunnel.ValidMetaValue(v) {
			return nil, fmt.Errorf("agentk: %s %q is not a valid Kubernetes name", name, v)
		}
	}
	if cfg.KASClient == nil {
		if cfg.KASClient, err = NewKASClient(KASClientOptions{}); err != nil {
			return nil, err
		}
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.APIServerCheckInterval <= 0 {
		cfg.APIServerCheckInterval = DefaultAPIServerCheckInterval
	}
	if cfg.ShutdownGrace == 0 {
		cfg.ShutdownGrace = DefaultShutdownGrace
	}
	a := &Agent{
		cfg:        cfg,
		kasAddress: u,
		kasURL:     u.Redacted(),
		log:        cfg.Logger,
		metrics:    newMetrics(),
		podID:      rand.Int64(),
		version:    cfg.Version,
		commit:     cfg.Commit,
	}
	if a.version == "" {
		a.version = buildinfo.Version()
	}
	if a.commit == "" {
		a.commit = buildinfo.Commit()
	}
	a.version, a.commit = metaOrEmpty(a.version), metaOrEmpty(a.commit)
	a.userAgent = "caddy-kas-agentk/" + a.version
	a.httpLog, _ = zap.NewStdLogAt(a.log.Named("http"), zap.WarnLevel) // fails only for invalid levels
	a.handler = newProxy(cfg.Cluster, a.log, a.metrics)
	return a, nil
}

// metaOrEmpty drops a value KAS would refuse: better a handshake without
// it than no tunnel.
func metaOrEmpty(v string) string {
	if tunnel.ValidMetaValue(v) {
		return v
	}
	return ""
}

// Ready reports whether agentk can serve KAS's requests: at least one
// tunnel to KAS is connected, and the apiserver answered the last check.
func (a *Agent) Ready() bool { return a.readiness() == nil }

// errNoTunnel is why agentk is not ready while no tunnel is up.
var errNoTunnel = errors.New("no tunnel to KAS is connected")

// readiness returns why agentk is not ready, or nil.
func (a *Agent) readiness() error {
	if a.metrics.tunnels.Load() == 0 {
		return errNoTunnel
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	switch {
	case a.versionOK == nil:
		return errors.New("the Kubernetes API server was not checked yet")
	case !*a.versionOK:
		return fmt.Errorf("the Kubernetes API server is not reachable: %w", a.versionErr)
	}
	return nil
}

// Handler returns the handler that serves requests from KAS (exposed for
// tests and embedding).
func (a *Agent) Handler() http.Handler { return a.handler }

// ObservabilityHandler returns the handler of /liveness, /readiness and
// /metrics.
func (a *Agent) ObservabilityHandler() http.Handler { return a.observabilityHandler() }

// Run keeps the tunnels open and serves the observability endpoints until
// ctx is done, then lets requests in flight finish (up to ShutdownGrace)
// and returns. It returns an error only if the observability server
// failed. Run may be called once.
func (a *Agent) Run(ctx context.Context) error {
	if !a.started.CompareAndSwap(false, true) {
		return errors.New("agentk: Run called twice")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	defer a.cfg.Cluster.CloseIdleConnections()

	errc := make(chan error, 1) // the observability server's failure
	if l := a.cfg.ObservabilityListener; l != nil {
		srv := &http.Server{
			Handler:           a.observabilityHandler(),
			ReadHeaderTimeout: 10 * time.Second,
			ErrorLog:          a.httpLog,
		}
		wg.Go(func() {
			if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("observability server: %w", err)
				cancel()
			}
		})
		wg.Go(func() {
			<-ctx.Done()
			sctx, scancel := context.WithTimeout(context.Background(), observabilityShutdownTimeout)
			defer scancel()
			_ = srv.Shutdown(sctx) // also closes l
		})
	}

	a.log.Info("agentk starting",
		zap.String("version", a.version),
		zap.String("commit", a.commit),
		zap.String("kas_url", a.kasURL),
		zap.String("apiserver", a.cfg.Cluster.Server()),
		zap.Int64("pod_id", a.podID),
		zap.String("pod_namespace", a.cfg.PodNamespace),
		zap.String("pod_name", a.cfg.PodName),
		zap.Int("connections", a.cfg.Connections))
	a.kubernetesVersion(ctx) // logs whether the apiserver answers
	wg.Go(func() { a.watchAPIServer(ctx) })

	for slot := range a.cfg.Connections {
		wg.Go(func() { a.runTunnel(ctx, slot) })
	}
	<-ctx.Done()
	wg.Wait()
	a.log.Info("agentk stopped")
	select {
	case err := <-errc:
		return err
	default:
		return nil
	}
}

// watchAPIServer checks the apiserver every APIServerCheckInterval until
// ctx is done, so that /readiness turns false while the apiserver cannot
// be reached: KAS would route requests to an agentk that can only fail
// them.
func (a *Agent) watchAPIServer(ctx context.Context) {
	t := time.NewTicker(a.cfg.APIServerCheckInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			a.kubernetesVersion(ctx)
		}
	}
}

// kubernetesVersion asks the apiserver for its version, best effort: on
// failure it returns the last version it learned, or "". A failure is
// logged as a warning once, not on every reconnect while it lasts.
func (a *Agent) kubernetesVersion(ctx context.Context) KubernetesVersion {
	v, err := a.cfg.Cluster.ServerVersion(ctx)
	a.mu.Lock()
	defer a.mu.Unlock()
	if err != nil {
		if ctx.Err() != nil {
			return a.k8sVersion
		}
		level := zap.WarnLevel
		if a.versionOK != nil && !*a.versionOK {
			level = zap.DebugLevel
		}
		a.versionOK, a.versionErr = new(false), err
		a.log.Log(level, "cannot get the Kubernetes version", zap.String("apiserver", a.cfg.Cluster.Server()), zap.Error(err))
		return a.k8sVersion
	}
	if a.versionOK == nil || !*a.versionOK {
		a.log.Info("kubernetes API server reachable", zap.String("apiserver", a.cfg.Cluster.Server()), zap.String("kubernetes_version", v.GitVersion))
	}
	a.versionOK, a.versionErr = new(true), nil
	a.k8sVersion = KubernetesVersion{GitVersion: metaOrEmpty(v.GitVersion), Platform: metaOrEmpty(v.Platform)}
	return a.k8sVersion
}

// attemptResult is how one connection attempt went.
type attemptResult struct {
	connectionID int64
	connected    bool
	uptime       time.Duration // how long the tunnel was up
	err          error         // why the attempt failed or the tunnel ended
	refusal      *refusal      // the answer to a refused handshake, else nil
}

// runTunnel keeps one tunnel open until ctx is done. When KAS asks the
// tunnel to move (its node stops, or the tunnel reached its maximum age),
// the slot dials a new tunnel at once, and the old one serves on, in a
// goroutine the slot waits for, until KAS closes it.
func (a *Agent) runTunnel(ctx context.Context, slot int) {
	backoff := a.cfg.Backoff // a copy: each tunnel has its own state
	tlog := a.log.With(zap.Int("slot", slot), zap.String("kas_url", a.kasURL))
	var moved sync.WaitGroup // tunnels that were asked to move and still serve
	defer moved.Wait()
	for {
		r, movedAway := a.attemptOrMove(ctx, tlog, &moved)
		if movedAway {
			continue // no backoff: the old tunnel still serves meanwhile
		}
		if ctx.Err() != nil {
			if r.connected {
				tlog.Info("tunnel disconnected", zap.Int64("connection", r.connectionID), zap.String("reason", "agentk is stopping"))
			}
			return
		}
		delay := backoff.Next(r.uptime)
		fields := []zap.Field{zap.Int64("connection", r.connectionID), zap.Duration("retry_in", delay)}
		if r.connected {
			tlog.Info("tunnel disconnected", append(fields, zap.String("reason", errString(r.err)), zap.Duration("connected_for", r.uptime))...)
		} else {
			a.logFailedHandshake(tlog, r, fields)
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// logFailedHandshake logs why a tunnel could not be opened and what to
// change about it. A refusal is logged at error level, as GitLab agentk
// logs a refused token: the agent cannot work until someone fixes the
// configuration.
func (a *Agent) logFailedHandshake(tlog *zap.Logger, r attemptResult, fields []zap.Field) {
	d := diagnose(a.kasAddress, r.err, r.refusal)
	fields = append(fields, zap.Error(r.err))
	if d.fix != "" {
		fields = append(fields, zap.String("fix", d.fix))
	}
	if r.refusal == nil {
		tlog.Warn(d.message, fields...)
		return
	}
	fields = append(fields, zap.Int("status_code", r.refusal.status), zap.String("response", r.refusal.body))
	tlog.Error(d.message, fields...)
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// attemptOrMove makes one attempt and returns its result once the tunnel
// ends; or, if KAS asks the tunnel to move first, returns movedAway at
// once and leaves the tunnel serving in a goroutine that moved tracks.
func (a *Agent) attemptOrMove(ctx context.Context, tlog *zap.Logger, moved *sync.WaitGroup) (r attemptResult, movedAway bool) {
	move := make(chan struct{})
	onMove := sync.OnceFunc(func() { close(move) })
	result := make(chan attemptResult, 1)
	moved.Go(func() { result <- a.attempt(ctx, tlog, onMove) })
	select {
	case r = <-result:
		return r, false
	case <-move:
	}
	a.metrics.moves.Add(1)
	tlog.Info("KAS asked the agent to move; opening a new tunnel while this one finishes its requests")
	moved.Go(func() {
		r := <-result
		tlog.Info("tunnel disconnected", zap.Int64("connection", r.connectionID),
			zap.String("reason", "moved"), zap.Duration("connected_for", r.uptime), zap.NamedError("last_error", r.err))
	})
	return attemptResult{}, true
}

// attempt opens one tunnel and serves it until it ends or ctx is done;
// onMove is called if KAS asks the agent to move.
func (a *Agent) attempt(ctx context.Context, tlog *zap.Logger, onMove func()) attemptResult {
	r := attemptResult{connectionID: rand.Int64()}
	token, err := a.cfg.Token()
	if err != nil {
		a.metrics.connectFailures.Add(1)
		r.err = fmt.Errorf("reading the agent token: %w", err)
		return r
	}
	kubeVersion := a.kubernetesVersion(ctx)

	h := make(http.Header, len(a.cfg.KASHeader)+10)
	for k, vs := range a.cfg.KASHeader {
		h[k] = append([]string(nil), vs...)
	}
	h.Set("Authorization", "Bearer "+token)
	h.Set("User-Agent", a.userAgent)
	h2tunnel.SetMetaHeaders(h, tunnel.AgentMeta{
		Version:            a.version,
		CommitID:           a.commit,
		PodNamespace:       a.cfg.PodNamespace,
		PodName:            a.cfg.PodName,
		PodID:              a.podID,
		ConnectionID:       r.connectionID,
		KubernetesVersion:  kubeVersion.GitVersion,
		KubernetesPlatform: kubeVersion.Platform,
	})

	dctx, cancel := context.WithTimeout(ctx, HandshakeTimeout)
	conn, resp, err := wsconn.Dial(dctx, a.cfg.KASAddress, wsconn.DialOptions{HTTPClient: a.cfg.KASClient, Header: h, Subprotocol: h2tunnel.Subprotocol})
	cancel() // the handshake is over; the tunnel does not depend on dctx
	if err != nil {
		if ctx.Err() != nil {
			return r // stopping; not a failure
		}
		a.metrics.connectFailures.Add(1)
		r.err = err
		if resp != nil {
			r.refusal = newRefusal(resp, token)
		}
		return r
	}

	a.metrics.connects.Add(1)
	a.metrics.tunnels.Add(1)
	r.connected = true
	start := time.Now()
	tlog.Info("tunnel connected",
		zap.Int64("connection", r.connectionID),
		zap.Int64("pod_id", a.podID),
		zap.String("kubernetes_version", kubeVersion.GitVersion))
	srv := &h2tunnel.Server{
		Handler:       a.handler,
		Options:       a.cfg.TunnelOptions,
		ErrorLog:      a.httpLog,
		ShutdownGrace: max(a.cfg.ShutdownGrace, 0),
		OnMove:        onMove,
	}
	r.err = srv.ServeConn(ctx, conn)
	r.uptime = time.Since(start)
	a.metrics.tunnels.Add(-1)
	return r
}

// maxExcerpt bounds the part of a refused handshake's body that is logged.
const maxExcerpt = 256

// responseExcerpt returns the start of a refused handshake's body for the
// log: KAS says why it refused there. The agent token is cut out in case
// something on the way (a misconfigured proxy, an echo server at the wrong
// address) reflects the request.
func responseExcerpt(body io.Reader, token string) string {
	if body == nil {
		return ""
	}
	b, _ := io.ReadAll(io.LimitReader(body, 1024)) // what is there is enough
	s := string(b)
	if token != "" {
		s = strings.ReplaceAll(s, token, "[redacted]")
		// The body may have been cut in the middle of the token.
		for k := len(token) - 1; k >= 4; k-- { // shorter prefixes reveal nothing
			if strings.HasSuffix(s, token[:k]) {
				s = s[:len(s)-k] + "[redacted]"
				break
			}
		}
	}
	s = strings.Map(func(r rune) rune {
		if unicode.IsPrint(r) {
			return r
		}
		return ' '
	}, strings.ToValidUTF8(s, "?"))
	s = strings.TrimSpace(s)
	if len(s) > maxExcerpt {
		s = strings.ToValidUTF8(s[:maxExcerpt], "") + "…"
	}
	return s
}
