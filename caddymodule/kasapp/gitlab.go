package kasapp

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/caddy-kas/caddy-kas/agentconfig"
	"github.com/caddy-kas/caddy-kas/caddymodule/internal/metrics"
	"github.com/caddy-kas/caddy-kas/configwatch"
	"github.com/caddy-kas/caddy-kas/gitaly"
	"github.com/caddy-kas/caddy-kas/gitlab"
	"github.com/caddy-kas/caddy-kas/internal/buildinfo"
	"github.com/caddy-kas/caddy-kas/railsapi"
	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentcfg"
)

// GitLab puts the agent server in front of a GitLab instance: agents,
// CI jobs and users are authenticated by GitLab's internal API, exactly as
// GitLab's own agent server does, and GitLab Rails reaches the agent
// server's gRPC API.
type GitLab struct {
	// URL is GitLab's internal URL, the address the agent server calls
	// GitLab's API at: usually GitLab Workhorse, for example
	// "http://127.0.0.1:8181" (gitlab.address in GitLab's KAS). Required.
	URL string `json:"url"`

	// SecretFile is the path of the secret shared with GitLab Rails
	// (gitlab_kas.secret_file in gitlab.yml): the base64 encoding of
	// exactly 32 bytes. It signs the calls to GitLab and verifies Rails'
	// calls to the gRPC API. Required.
	SecretFile string `json:"secret_file"`

	// CAFile is the path of a PEM file of certificate authorities to
	// trust, in addition to the system's, when URL is https. Default:
	// the system's only.
	CAFile string `json:"ca_file,omitempty"`

	// ExternalURL is GitLab's external URL, for example
	// "https://gitlab.example.com". Browsers on GitLab's pages call the
	// Kubernetes API proxy from this origin, and only from it (CORS).
	// Default: none, and the proxy refuses every request with an Origin.
	ExternalURL string `json:"external_url,omitempty"`

	// APIListen is the network address of the gRPC API GitLab Rails
	// calls (gitlab_kas.internal_url in gitlab.yml, without its grpc://
	// or grpcs:// scheme), for example "127.0.0.1:8153". Default: no
	// listener, and GitLab's agent pages cannot list connections.
	APIListen string `json:"api_listen,omitempty"`

	// APICertFile and APIKeyFile, if both set, are the PEM certificate
	// and key with which the gRPC API serves TLS (grpcs:// in
	// gitlab.yml). Default: plain HTTP/2 (grpc://).
	APICertFile string `json:"api_cert_file,omitempty"`
	APIKeyFile  string `json:"api_key_file,omitempty"`

	// AgentInfoCacheTTL is how long an agent token's check by GitLab is
	// reused. A connected agent's token is checked again every half of it
	// (see agentRecheck). Default: 5m, as GitLab's agent_info_cache_ttl.
	AgentInfoCacheTTL caddy.Duration `json:"agent_info_cache_ttl,omitempty"`

	// AgentInfoCacheErrorTTL is how long a failed agent token check is
	// reused, so that a reconnecting agent with a bad token cannot hammer
	// GitLab. Default: 1m, as GitLab's agent_info_cache_error_ttl.
	AgentInfoCacheErrorTTL caddy.Duration `json:"agent_info_cache_error_ttl,omitempty"`

	// AllowedAgentsCacheTTL is how long the agents a CI job token may
	// reach are reused. Default: 1m, as GitLab's allowed_agent_cache_ttl.
	AllowedAgentsCacheTTL caddy.Duration `json:"allowed_agents_cache_ttl,omitempty"`

	// AllowedAgentsCacheErrorTTL is how long a failed CI job token check
	// is reused. Default: 10s, as GitLab's allowed_agent_cache_error_ttl.
	AllowedAgentsCacheErrorTTL caddy.Duration `json:"allowed_agents_cache_error_ttl,omitempty"`

	// UsageReportingPeriod is how often usage counters are sent to
	// GitLab's usage_metrics API. Zero disables reporting. Default: 1m,
	// as GitLab's observability.usage_reporting_period.
	UsageReportingPeriod *caddy.Duration `json:"usage_reporting_period,omitempty"`

	// APIRateLimit bounds the rate of calls to GitLab's internal API, so
	// that clients with made-up tokens cannot make the agent server flood
	// GitLab with checks. Only calls count: answers the caches give are
	// free. A check the limit has no room for is not made, and its client
	// is told to retry later (429 with Retry-After). Default: 50 calls a
	// second, in bursts of up to 250, as GitLab's gitlab.api_rate_limit.
	APIRateLimit *RateLimit `json:"api_rate_limit,omitempty"`

	// AgentConfigurationPollPeriod is how often the configuration project
	// of each agent with a tunnel on this node is polled through Gitaly
	// for a new .gitlab/agents/<name>/config.yaml, which is then handed to
	// GitLab so that it grants CI and user access from it. A push that
	// GitLab reports through the gRPC API (api_listen) makes the poll
	// happen at once. Default: 5m, as GitLab's agent.configuration.
	// poll_period (GitLab's Linux package sets 20s; every poll is a call
	// to Gitaly, whose per-server rate limit 20s polls of 300 agents
	// fill).
	AgentConfigurationPollPeriod caddy.Duration `json:"agent_configuration_poll_period,omitempty"`

	// GitalyCAFile is the path of a PEM file of certificate authorities
	// to trust, in addition to the system's, for Gitaly servers at tls://
	// addresses (GitLab names each agent's Gitaly server). Default: the
	// system's only.
	GitalyCAFile string `json:"gitaly_ca_file,omitempty"`

	// GitalyGlobalRateLimit bounds the calls to all Gitaly servers
	// together, and GitalyPerServerRateLimit those to each Gitaly server;
	// a call waits for room. Default: 30 calls a second in bursts of up
	// to 70, and 15 a second in bursts of up to 40, as GitLab's
	// gitaly.global_api_rate_limit and gitaly.per_server_api_rate_limit.
	GitalyGlobalRateLimit    *RateLimit `json:"gitaly_global_rate_limit,omitempty"`
	GitalyPerServerRateLimit *RateLimit `json:"gitaly_per_server_rate_limit,omitempty"`
}

// RateLimit is a token bucket: it holds up to BucketSize calls, and
// regains RefillRatePerSecond calls a second. The names are those of
// GitLab's agent server configuration.
type RateLimit struct {
	// RefillRatePerSecond is how many calls the bucket regains each
	// second, in calls per second; it may be a fraction, such as 0.5 for
	// one call every two seconds. Zero means the default, 50.
	RefillRatePerSecond float64 `json:"refill_rate_per_second,omitempty"`

	// BucketSize is the most calls that can be made at once after a
	// quiet time, in calls; the bucket starts full. Zero means the
	// default, 250.
	BucketSize int `json:"bucket_size,omitempty"`
}

// limiter returns the token bucket r describes, with GitLab's defaults
// for what r (which may be nil) leaves out.
func (r *RateLimit) limiter() (*gitlab.RateLimiter, error) {
	rate, size := float64(gitlab.DefaultAPIRefillRatePerSecond), gitlab.DefaultAPIBucketSize
	if r != nil {
		if r.RefillRatePerSecond != 0 {
			rate = r.RefillRatePerSecond
		}
		if r.BucketSize != 0 {
			size = r.BucketSize
		}
	}
	return gitlab.NewRateLimiter(rate, size)
}

// gitaly returns the Gitaly rate limit r describes, with def for what r
// (which may be nil) leaves out.
func (r *RateLimit) gitaly(def gitaly.RateLimit) gitaly.RateLimit {
	if r != nil {
		if r.RefillRatePerSecond != 0 {
			def.PerSecond = r.RefillRatePerSecond
		}
		if r.BucketSize != 0 {
			def.Burst = r.BucketSize
		}
	}
	return def
}

// Defaults of the GitLab settings, as GitLab's own agent server has them
// (kas-spec §2.1, §2.5, §7).
const (
	defaultAgentInfoCacheTTL          = 5 * time.Minute
	defaultAgentInfoCacheErrorTTL     = time.Minute
	defaultAllowedAgentsCacheTTL      = time.Minute
	defaultAllowedAgentsCacheErrorTTL = 10 * time.Second
	defaultUsageReportingPeriod       = time.Minute
	// apiStopGrace bounds how long Stop waits for Rails' calls in flight;
	// Rails gives each call 5 s at most.
	apiStopGrace = 5 * time.Second
)

// GitLabMode is what a provisioned GitLab configuration gives the
// handlers.
type GitLabMode struct {
	// Agents authenticates agent tokens with GitLab.
	Agents *gitlab.AgentAuthenticator
	// Proxy authenticates Kubernetes API proxy requests with GitLab.
	Proxy *gitlab.ProxyAuthenticator
	// AgentRecheck is how often a connected agent's token is checked
	// again.
	AgentRecheck time.Duration
	// AllowedOrigin is GitLab's external origin, for CORS; empty if not
	// configured.
	AllowedOrigin string
	// Configs keeps the configuration of every agent with a tunnel on
	// this node current, and tells GitLab of it.
	Configs *configwatch.Watcher
	// ExternalURL is GitLab's external URL, as configured; empty if not.
	ExternalURL string
}

// gitlabRuntime is the running part of GitLab mode for one configuration:
// the gRPC API server and the usage reporter.
type gitlabRuntime struct {
	cfg      *GitLab
	secret   []byte
	mode     *GitLabMode
	client   *gitlab.Client
	usage    *gitlab.Usage
	api      *railsapi.Server
	apiCreds credentials.TransportCredentials // nil: plain HTTP/2
	configs  *pooledConfigs
	gitaly   *pooledGitaly
	// watchOptions are the options of configs' watcher under this
	// configuration, set when it starts.
	watchOptions configwatch.Options

	mu       sync.Mutex // guards the fields below
	grpc     *grpc.Server
	listener net.Listener
	stop     context.CancelFunc // stops the usage reporter
	wg       sync.WaitGroup     // the reporter and the gRPC server's Serve
}

// usages holds the usage counters across configuration reloads, so that
// counts of requests served by an old configuration's handlers are sent
// by the new one's reporter.
var usages = caddy.NewUsagePool()

const usageKey = "usage"

type pooledUsage struct{ *gitlab.Usage }

func (pooledUsage) Destruct() error { return nil }

// configWatchers holds the watcher of agent configurations across
// configuration reloads, like the tunnels whose agents it watches: a
// tunnel admitted under an old configuration keeps its watch. Each
// configuration hands it its own options when it starts.
var configWatchers = caddy.NewUsagePool()

const configWatcherKey = "configwatch"

type pooledConfigs struct{ *configwatch.Watcher }

func (p pooledConfigs) Destruct() error {
	p.Close()
	return nil
}

// gitalyPools holds the Gitaly connections across reloads, keyed by the
// settings they were made with: a reload that keeps them keeps the
// connections.
var gitalyPools = caddy.NewUsagePool()

type pooledGitaly struct {
	*gitaly.Pool
	key string
}

func (p *pooledGitaly) Destruct() error { return p.Close() }

// loadGitalyPool takes a reference to the Gitaly pool of cfg's settings.
func loadGitalyPool(cfg *GitLab) (*pooledGitaly, error) {
	global := cfg.GitalyGlobalRateLimit.gitaly(gitaly.DefaultGlobalRateLimit)
	perServer := cfg.GitalyPerServerRateLimit.gitaly(gitaly.DefaultPerServerRateLimit)
	key := fmt.Sprintf("gitaly ca=%q global=%v per_server=%v", cfg.GitalyCAFile, global, perServer)
	v, _, err := gitalyPools.LoadOrNew(key, func() (caddy.Destructor, error) {
		opts := gitaly.Options{UserAgent: userAgent(), GlobalRateLimit: global, PerServerRateLimit: perServer}
		if cfg.GitalyCAFile != "" {
			roots, err := certPool(cfg.GitalyCAFile)
			if err != nil {
				return nil, fmt.Errorf("gitaly_ca_file: %w", err)
			}
			opts.ExtraRootCAs = roots
		}
		p, err := gitaly.NewPool(opts)
		if err != nil {
			return nil, err
		}
		return &pooledGitaly{Pool: p, key: key}, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*pooledGitaly), nil
}

// provisionGitLab checks and loads the GitLab configuration.
func (a *App) provisionGitLab(ctx caddy.Context) error {
	cfg := a.GitLab
	repl := caddy.NewReplacer()
	for _, f := range []*string{&cfg.URL, &cfg.SecretFile, &cfg.CAFile, &cfg.ExternalURL, &cfg.APIListen, &cfg.APICertFile, &cfg.APIKeyFile, &cfg.GitalyCAFile} {
		*f = repl.ReplaceKnown(*f, "")
	}
	base, err := url.Parse(cfg.URL)
	if err != nil || (base.Scheme != "http" && base.Scheme != "https") || base.Host == "" {
		return fmt.Errorf("gitlab: url %q must be an http:// or https:// URL", cfg.URL)
	}
	if cfg.SecretFile == "" {
		return errors.New("gitlab: secret_file is required (the file of gitlab_kas.secret_file in gitlab.yml)")
	}
	secret, err := gitlab.LoadSecretFile(cfg.SecretFile)
	if err != nil {
		return fmt.Errorf("gitlab: %w", err)
	}
	origin, err := externalOrigin(cfg.ExternalURL)
	if err != nil {
		return fmt.Errorf("gitlab: %w", err)
	}
	httpClient, err := gitlabHTTPClient(cfg.CAFile)
	if err != nil {
		return fmt.Errorf("gitlab: %w", err)
	}
	limiter, err := cfg.APIRateLimit.limiter()
	if err != nil {
		return fmt.Errorf("gitlab: api_rate_limit: %w", err)
	}
	client := &gitlab.Client{
		BaseURL:    base,
		HTTPClient: httpClient,
		Secret:     secret,
		UserAgent:  userAgent(),
		Observer:   metrics.GitLab{},
		Limiter:    limiter,
	}
	v, _, err := usages.LoadOrNew(usageKey, func() (caddy.Destructor, error) {
		return pooledUsage{gitlab.NewUsage()}, nil
	})
	if err != nil {
		return fmt.Errorf("gitlab: usage counters: %w", err)
	}
	usage := v.(pooledUsage).Usage
	a.usageTaken = true

	if cfg.AgentConfigurationPollPeriod < 0 {
		return errors.New("gitlab: agent_configuration_poll_period must not be negative")
	}
	gitalyPool, err := loadGitalyPool(cfg)
	if err != nil {
		return fmt.Errorf("gitlab: %w", err)
	}
	a.gitalyPool = gitalyPool
	v, _, err = configWatchers.LoadOrNew(configWatcherKey, func() (caddy.Destructor, error) {
		return pooledConfigs{configwatch.New(configwatch.Options{})}, nil
	})
	if err != nil {
		return fmt.Errorf("gitlab: configuration watcher: %w", err)
	}
	configs := v.(pooledConfigs)
	a.configsTaken = true

	agentTTL := durationOr(cfg.AgentInfoCacheTTL, defaultAgentInfoCacheTTL)
	proxyAuth := gitlab.NewProxyAuthenticator(client, usage, a.logger.Named("gitlab"))
	proxyAuth.AllowedAgentsCache = gitlab.NewCache[*gitlab.AllowedAgents](
		durationOr(cfg.AllowedAgentsCacheTTL, defaultAllowedAgentsCacheTTL),
		durationOr(cfg.AllowedAgentsCacheErrorTTL, defaultAllowedAgentsCacheErrorTTL))
	agents := gitlab.NewAgentAuthenticator(client, agentTTL, durationOr(cfg.AgentInfoCacheErrorTTL, defaultAgentInfoCacheErrorTTL))
	configLog := a.logger.Named("agent_configuration")
	rt := &gitlabRuntime{
		cfg:     cfg,
		secret:  secret,
		client:  client,
		usage:   usage,
		configs: &configs,
		gitaly:  gitalyPool,
		mode: &GitLabMode{
			Agents:        agents,
			Proxy:         proxyAuth,
			AgentRecheck:  agentRecheck(agentTTL),
			AllowedOrigin: origin,
			Configs:       configs.Watcher,
			ExternalURL:   cfg.ExternalURL,
		},
		watchOptions: configwatch.Options{
			Locate:     locator(agents),
			Publish:    publisher(client),
			Gitaly:     gitalyPool.Pool,
			PollPeriod: time.Duration(cfg.AgentConfigurationPollPeriod),
			Logger:     configLog,
		},
	}
	if cfg.APIListen != "" {
		rt.api = &railsapi.Server{
			Secret:      secret,
			Connections: a.trackerConnections(),
			Version:     buildinfo.Version(),
			GitRef:      buildinfo.Commit(),
			OnGitPush: func(projectID int64, fullPath string) {
				usage.GitPushNotification(projectID)
				configs.Poke(fullPath)
			},
			Gitaly: gitalyPool.Pool,
			Logger: a.logger.Named("rails_api"),
		}
		switch {
		case cfg.APICertFile != "" && cfg.APIKeyFile != "":
			cert, err := tls.LoadX509KeyPair(cfg.APICertFile, cfg.APIKeyFile)
			if err != nil {
				return fmt.Errorf("gitlab: api tls: %w", err)
			}
			rt.apiCreds = credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
		case cfg.APICertFile != "" || cfg.APIKeyFile != "":
			return errors.New("gitlab: api_cert_file and api_key_file go together")
		}
	}
	a.gitlab = rt
	return metrics.Register(ctx)
}

// trackerConnections are the connections the agent tracker reports: this
// node's, or every node's when they share a registry.
func (a *App) trackerConnections() railsapi.Connections {
	if a.nodes != nil {
		return railsapi.Shared{Registry: a.nodes.registry}
	}
	return railsapi.Local{Tunnels: a.tunnels.store}
}

// modeKey names the authentication mode of this configuration, so that a
// reload that changes it can close the tunnels authenticated under the
// old one. The secret is part of it (by digest): a new secret may mean
// another GitLab.
func (a *App) modeKey() string {
	if a.gitlab == nil {
		return "standalone"
	}
	sum := sha256.Sum256(a.gitlab.secret)
	return "gitlab " + a.gitlab.cfg.URL + " " + hex.EncodeToString(sum[:8])
}

// start starts the gRPC API and the usage reporter, and hands the
// configuration watcher this configuration's GitLab and Gitaly.
func (rt *gitlabRuntime) start(logger *zap.Logger) error {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	rt.configs.SetOptions(rt.watchOptions)
	if rt.api != nil {
		addr, err := caddy.ParseNetworkAddress(rt.cfg.APIListen)
		if err != nil {
			return fmt.Errorf("gitlab: api_listen: %w", err)
		}
		// Caddy's listeners are shared across reloads: the new
		// configuration listens on the same address while the old one
		// still serves.
		ln, err := addr.Listen(context.Background(), 0, net.ListenConfig{})
		if err != nil {
			return fmt.Errorf("gitlab: api_listen %s: %w", rt.cfg.APIListen, err)
		}
		l, ok := ln.(net.Listener)
		if !ok {
			return fmt.Errorf("gitlab: api_listen %s: not a stream listener", rt.cfg.APIListen)
		}
		opts := rt.api.ServerOptions()
		if rt.apiCreds != nil {
			opts = append(opts, grpc.Creds(rt.apiCreds))
		}
		srv := grpc.NewServer(opts...)
		rt.api.Register(srv)
		rt.grpc, rt.listener = srv, l
		rt.wg.Add(1)
		go func() {
			defer rt.wg.Done()
			if err := srv.Serve(l); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
				logger.Error("gitlab api server stopped", zap.Error(err))
			}
		}()
		logger.Info("serving GitLab's gRPC API", zap.String("address", l.Addr().String()), zap.Bool("tls", rt.apiCreds != nil))
	}
	period := defaultUsageReportingPeriod
	if p := rt.cfg.UsageReportingPeriod; p != nil {
		period = time.Duration(*p)
	}
	if period > 0 {
		ctx, cancel := context.WithCancel(context.Background())
		rt.stop = cancel
		reporter := &gitlab.Reporter{Client: rt.client, Usage: rt.usage, Period: period, Logger: logger.Named("usage")}
		rt.wg.Add(1)
		go func() {
			defer rt.wg.Done()
			reporter.Run(ctx)
		}()
	}
	return nil
}

// stopRuntime stops the gRPC API, letting calls in flight finish for a
// moment, and the usage reporter, which sends what it has counted.
func (rt *gitlabRuntime) stopRuntime() {
	rt.mu.Lock()
	srv, stop := rt.grpc, rt.stop
	rt.grpc, rt.stop = nil, nil
	rt.mu.Unlock()
	if srv != nil {
		done := make(chan struct{})
		go func() {
			srv.GracefulStop()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(apiStopGrace):
			srv.Stop()
			<-done
		}
	}
	if stop != nil {
		stop()
	}
	rt.wg.Wait()
}

// locator returns where an agent's configuration lives, from GitLab's
// agent_info for its token, through the authenticator's cache.
func locator(agents *gitlab.AgentAuthenticator) func(context.Context, string) (configwatch.Location, error) {
	return func(ctx context.Context, token string) (configwatch.Location, error) {
		info, err := agents.Info(ctx, token)
		if err != nil {
			return configwatch.Location{}, err
		}
		// GitLab's answer and the Gitaly client describe the server and
		// the repository with the same fields: a conversion carries them
		// all, and stops compiling should the two ever differ.
		return configwatch.Location{
			AgentID:       info.AgentID,
			AgentName:     info.AgentName,
			ProjectID:     info.ProjectID,
			ProjectPath:   info.GitalyRepository.GlProjectPath,
			Gitaly:        gitaly.Info(info.GitalyInfo),
			Repository:    gitaly.Repository(info.GitalyRepository),
			DefaultBranch: info.DefaultBranch,
		}, nil
	}
}

// publisher returns what tells GitLab of an agent's new configuration.
func publisher(client *gitlab.Client) func(context.Context, int64, *agentcfg.ConfigurationFile) error {
	return func(ctx context.Context, agentID int64, f *agentcfg.ConfigurationFile) error {
		body, err := agentconfig.RailsBody(agentID, f)
		if err != nil {
			return err
		}
		return client.PostAgentConfiguration(ctx, body)
	}
}

// externalOrigin returns the browser origin of GitLab's external URL.
func externalOrigin(external string) (string, error) {
	if external == "" {
		return "", nil
	}
	u, err := url.Parse(external)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", fmt.Errorf("external_url %q must be an http:// or https:// URL", external)
	}
	// An origin is scheme://host[:port], lowercase, without a path
	// (RFC 6454 §6.2); browsers leave out the default port.
	host := strings.ToLower(u.Host)
	if (u.Scheme == "https" && strings.HasSuffix(host, ":443")) || (u.Scheme == "http" && strings.HasSuffix(host, ":80")) {
		host = host[:strings.LastIndexByte(host, ':')]
	}
	return u.Scheme + "://" + host, nil
}

// gitlabHTTPClient returns the client for GitLab's API, trusting caFile's
// authorities in addition to the system's.
func gitlabHTTPClient(caFile string) (*http.Client, error) {
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.Proxy = nil // an internal URL; do not send it to HTTP_PROXY
	transport.MaxIdleConnsPerHost = 32
	if caFile != "" {
		pool, err := systemRootsWith(caFile)
		if err != nil {
			return nil, fmt.Errorf("ca_file: %w", err)
		}
		transport.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return &http.Client{
		Transport: transport,
		Timeout:   30 * time.Second,
		// Never follow a redirect: it would carry agent tokens, job tokens
		// and the JWT to wherever GitLab (or something in front of it)
		// points. GitLab's internal API does not redirect.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}, nil
}

// certPool reads the PEM certificates of file (for Gitaly, which trusts
// them besides the system's roots).
func certPool(file string) (*x509.CertPool, error) {
	return addPEMFile(x509.NewCertPool(), file)
}

// agentRecheck is how often a connected agent's token is checked again for
// a cache TTL of ttl. GitLab shows an agent as connected while its token
// was used in the last 8 minutes (kas-spec §7), and only a check that
// misses the cache reaches GitLab: with re-checks every ttl (±10 %), one
// could land just before the cached answer expires and the next GitLab
// call come almost 2×ttl after the last, 10 minutes with the default. At
// half the TTL the longest gap is 1.55×ttl, under 8 minutes for the
// default 5; a revoked token closes its tunnels within that time too.
func agentRecheck(ttl time.Duration) time.Duration { return ttl / 2 }

// userAgent names this build in calls to GitLab, in the shape GitLab's own
// agent server uses ("gitlab-kas/<version>/<commit>", kas-spec §2.2).
func userAgent() string {
	ua := "caddy-kas/" + buildinfo.Version()
	if c := buildinfo.Commit(); c != "" {
		ua += "/" + c
	}
	return ua
}

func durationOr(d caddy.Duration, def time.Duration) time.Duration {
	if d > 0 {
		return time.Duration(d)
	}
	return def
}
