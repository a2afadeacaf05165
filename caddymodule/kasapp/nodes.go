package kasapp

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"

	"github.com/caddy-kas/caddy-kas/gitlab"
	"github.com/caddy-kas/caddy-kas/tunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/nodetunnel"
	"github.com/caddy-kas/caddy-kas/tunnel/redisregistry"
)

// Redis is the Redis that several agent server nodes share their tunnel
// registry through (kas-spec §5): which node holds a tunnel of which agent,
// the agent tracker, and the per-token connection counter. One client
// serves a single Redis, Redis Sentinel and Redis Cluster.
type Redis struct {
	// Addresses are host:port addresses: of the Redis server; of the
	// Sentinels, with MasterName; or of nodes of a Redis Cluster (two or
	// more, or one with Cluster). Required.
	Addresses []string `json:"addresses,omitempty"`

	// MasterName is the name of the master the Sentinels at Addresses
	// watch (sentinel.master_name in GitLab's KAS). Default: no Sentinel.
	MasterName string `json:"master_name,omitempty"`

	// Cluster makes a single address a Redis Cluster node (a cluster's
	// configuration endpoint). Default: a single address is one server.
	Cluster bool `json:"cluster,omitempty"`

	// Username and PasswordFile authenticate to Redis (ACL user and the
	// path of a file holding the password, trailing newline ignored).
	// Default: no authentication.
	Username     string `json:"username,omitempty"`
	PasswordFile string `json:"password_file,omitempty"`

	// SentinelUsername and SentinelPasswordFile authenticate to the
	// Sentinels, when they need it. Default: none.
	SentinelUsername     string `json:"sentinel_username,omitempty"`
	SentinelPasswordFile string `json:"sentinel_password_file,omitempty"`

	// DatabaseIndex is the Redis database (not with Redis Cluster).
	// Default: 0.
	DatabaseIndex int `json:"database_index,omitempty"`

	// TLS, if set, connects to Redis with TLS. Default: plain TCP.
	TLS *RedisTLS `json:"tls,omitempty"`

	// KeyPrefix starts every key. Default: "caddy-kas" (not GitLab's
	// "gitlab-kas": the values are our own, and the two must not mix in
	// one Redis while moving from GitLab's KAS).
	KeyPrefix string `json:"key_prefix,omitempty"`

	// TunnelTTL is how long a node's entries live in Redis without being
	// refreshed, so that a node that died drops out. Default: 5m, as
	// GitLab's agent.redis_conn_info_ttl.
	TunnelTTL caddy.Duration `json:"tunnel_ttl,omitempty"`

	// TunnelRefresh is how often a node rewrites its entries; less than
	// TunnelTTL. Default: 4m, as GitLab's redis_conn_info_refresh.
	TunnelRefresh caddy.Duration `json:"tunnel_refresh,omitempty"`
}

// RedisTLS configures TLS to Redis.
type RedisTLS struct {
	// CAFile is a PEM file of the authorities to trust besides the
	// system's. Default: the system's only.
	CAFile string `json:"ca_file,omitempty"`
	// CertFile and KeyFile are a client certificate and key, for Redis
	// that asks for one. Default: none.
	CertFile string `json:"cert_file,omitempty"`
	KeyFile  string `json:"key_file,omitempty"`
	// ServerName is the name to verify the server's certificate for.
	// Default: the host of the address.
	ServerName string `json:"server_name,omitempty"`
}

// PrivateAPI is each node's private listener, where the other nodes send
// the requests for agents whose tunnels this node holds (kas-spec §1.4).
type PrivateAPI struct {
	// Listen is the network address to listen on, as Caddy writes them:
	// "10.0.0.5:8155", ":8155" (every interface), "tcp4/:8155" or
	// "unix//run/caddy-kas/private.sock". Required.
	Listen string `json:"listen,omitempty"`

	// SecretFile is the path of the secret the nodes share, the base64 of
	// exactly 32 bytes, separate from GitLab's secret (GitLab's
	// private_api_secret_key). Required.
	SecretFile string `json:"secret_file,omitempty"`

	// CertFile and KeyFile, if set, serve the listener with TLS (grpcs://
	// in the URL other nodes use). Default: HTTP/2 without TLS.
	CertFile string `json:"cert_file,omitempty"`
	KeyFile  string `json:"key_file,omitempty"`

	// CAFile is a PEM file of the authorities that sign the other nodes'
	// certificates, for grpcs:// nodes. Default: the system's.
	CAFile string `json:"ca_file,omitempty"`

	// OwnURL, OwnCIDRs, OwnScheme, OwnPort and OwnHost say how the other
	// nodes reach this one, as GitLab's OWN_PRIVATE_API_URL,
	// OWN_PRIVATE_API_CIDR, _SCHEME, _PORT and _HOST, which, set in the
	// environment, take precedence. Default: the listen address; a
	// wildcard publishes every address of this machine but loopback and
	// link-local ones.
	OwnURL    string   `json:"own_url,omitempty"`
	OwnCIDRs  []string `json:"own_cidrs,omitempty"`
	OwnScheme string   `json:"own_scheme,omitempty"`
	OwnPort   string   `json:"own_port,omitempty"`
	OwnHost   string   `json:"own_host,omitempty"`
}

// sharedNodes is what outlives a reload when several nodes share a
// registry: the Redis client, the registry (whose Close removes this node
// from Redis, which only a stop may do), the private listener's server and
// the client of the other nodes' (whose connections a reload must not
// multiply).
type sharedNodes struct {
	key      string
	client   redis.UniversalClient
	registry *redisregistry.Registry
	ownURLs  []string
	secret   []byte
	peers    *nodetunnel.Client

	mu     sync.Mutex // guards server and served
	server *http.Server
	served chan struct{} // closed when server's Serve returns
}

var nodePools = caddy.NewUsagePool()

// Destruct stops the private listener and takes this node out of the
// registry, then closes the Redis client.
func (n *sharedNodes) Destruct() error {
	n.mu.Lock()
	srv, served := n.server, n.served
	n.mu.Unlock()
	var errs []error
	if srv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := srv.Shutdown(ctx); err != nil {
			srv.Close()
		}
		cancel()
		<-served
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := n.registry.Close(ctx); err != nil {
		errs = append(errs, err)
	}
	if err := n.client.Close(); err != nil {
		errs = append(errs, err)
	}
	n.peers.CloseIdleConnections()
	return errors.Join(errs...)
}

// provisionNodes sets up several-node mode: the registry, the private
// listener's server and the router that looks on other nodes.
func (a *App) provisionNodes() error {
	if (a.Redis == nil) != (a.PrivateAPI == nil) {
		return errors.New("redis and private_api go together: several nodes share their tunnels through Redis and reach each other through the private API")
	}
	r, p := a.Redis, a.PrivateAPI
	repl := caddy.NewReplacer()
	for _, f := range []*string{&r.PasswordFile, &r.SentinelPasswordFile, &p.Listen, &p.SecretFile, &p.CertFile, &p.KeyFile, &p.CAFile} {
		*f = repl.ReplaceKnown(*f, "")
	}
	if len(r.Addresses) == 0 {
		return errors.New("redis: addresses are required")
	}
	if r.TunnelTTL < 0 || r.TunnelRefresh < 0 {
		return errors.New("redis: tunnel_ttl and tunnel_refresh must not be negative")
	}
	if p.Listen == "" || p.SecretFile == "" {
		return errors.New("private_api: listen and secret_file are required")
	}
	secret, err := gitlab.LoadBase64SecretFile(p.SecretFile, "private API secret", nodetunnel.SecretSize)
	if err != nil {
		return fmt.Errorf("private_api: %w (make one with: head -c %d /dev/urandom | base64)", err, nodetunnel.SecretSize)
	}
	addr, err := caddy.ParseNetworkAddress(p.Listen)
	if err != nil {
		return fmt.Errorf("private_api: listen: %w", err)
	}
	if addr.PortRangeSize() > 1 {
		return fmt.Errorf("private_api: listen %q: one port, not a range", p.Listen)
	}
	settings := nodetunnel.OwnURLSettingsFromEnv(nodetunnel.OwnURLSettings{
		URL: p.OwnURL, CIDRs: p.OwnCIDRs, Scheme: p.OwnScheme, Port: p.OwnPort, Host: p.OwnHost,
	}, os.Getenv)
	if settings.Scheme == "" && p.CertFile != "" {
		settings.Scheme = "grpcs"
	}
	listenAddr := addr.JoinHostPort(0)
	if addr.IsUnixNetwork() {
		listenAddr = addr.Host
	}
	network := addr.Network
	if network == "" {
		network = "tcp"
	}
	ownURLs, err := nodetunnel.OwnURLs(settings, network, listenAddr, nil)
	if err != nil {
		return fmt.Errorf("private_api: %w", err)
	}

	keyBytes, _ := json.Marshal(struct {
		R *Redis
		P *PrivateAPI
		U []string
		S [32]byte
	}{r, p, ownURLs, sha256.Sum256(secret)})
	sum := sha256.Sum256(keyBytes)
	key := "nodes " + hex.EncodeToString(sum[:])
	log := a.logger.Named("nodes")
	v, _, err := nodePools.LoadOrNew(key, func() (caddy.Destructor, error) {
		return newSharedNodes(key, r, p, settings.Host, ownURLs, secret, a.tunnels.store, log)
	})
	if err != nil {
		return err
	}
	a.nodes = v.(*sharedNodes)
	finder := &nodetunnel.Finder{
		Nodes:  a.nodes.registry,
		Client: a.nodes.peers,
		Logger: log,
	}
	a.router = &tunnel.Router{Local: a.tunnels.store, Remote: finder.Find}
	log.Info("several-node mode", zap.Strings("own_urls", ownURLs), zap.Strings("redis", r.Addresses))
	return nil
}

// newSharedNodes makes the Redis client and registry and starts the
// private listener. ownHost is the TLS server name of the nodes, own_host
// or OWN_PRIVATE_API_HOST as [nodetunnel.OwnURLSettingsFromEnv] resolved it.
func newSharedNodes(key string, r *Redis, p *PrivateAPI, ownHost string, ownURLs []string, secret []byte, store *tunnel.Store, log *zap.Logger) (*sharedNodes, error) {
	opts := &redis.UniversalOptions{
		Addrs:                 r.Addresses,
		MasterName:            r.MasterName,
		IsClusterMode:         r.Cluster,
		Username:              r.Username,
		SentinelUsername:      r.SentinelUsername,
		DB:                    r.DatabaseIndex,
		DialTimeout:           5 * time.Second,
		ReadTimeout:           3 * time.Second,
		WriteTimeout:          3 * time.Second,
		ContextTimeoutEnabled: true,
		ClientName:            "caddy-kas",
	}
	var err error
	if r.PasswordFile != "" {
		if opts.Password, err = readPasswordFile(r.PasswordFile); err != nil {
			return nil, fmt.Errorf("redis: password_file: %w", err)
		}
	}
	if r.SentinelPasswordFile != "" {
		if opts.SentinelPassword, err = readPasswordFile(r.SentinelPasswordFile); err != nil {
			return nil, fmt.Errorf("redis: sentinel_password_file: %w", err)
		}
	}
	if r.TLS != nil {
		cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: r.TLS.ServerName}
		if r.TLS.CAFile != "" {
			if cfg.RootCAs, err = systemRootsWith(r.TLS.CAFile); err != nil {
				return nil, fmt.Errorf("redis: tls ca_file: %w", err)
			}
		}
		if r.TLS.CertFile != "" || r.TLS.KeyFile != "" {
			cert, err := tls.LoadX509KeyPair(r.TLS.CertFile, r.TLS.KeyFile)
			if err != nil {
				return nil, fmt.Errorf("redis: tls client certificate: %w", err)
			}
			cfg.Certificates = []tls.Certificate{cert}
		}
		opts.TLSConfig = cfg
	}
	client := redis.NewUniversalClient(opts)
	registry, err := redisregistry.New(redisregistry.Options{
		Client:    client,
		KeyPrefix: r.KeyPrefix,
		OwnURLs:   ownURLs,
		TTL:       time.Duration(r.TunnelTTL),
		Refresh:   time.Duration(r.TunnelRefresh),
		Logger:    log.Named("registry"),
	})
	if err != nil {
		client.Close()
		return nil, fmt.Errorf("redis: %w", err)
	}
	n := &sharedNodes{key: key, client: client, registry: registry, ownURLs: ownURLs, secret: secret,
		peers: &nodetunnel.Client{Secret: secret}}
	if p.CAFile != "" || strings.HasPrefix(ownURLs[0], "grpcs://") {
		cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: ownHost}
		if p.CAFile != "" {
			if cfg.RootCAs, err = systemRootsWith(p.CAFile); err != nil {
				n.Destruct()
				return nil, fmt.Errorf("private_api: ca_file: %w", err)
			}
		}
		n.peers.TLS = cfg // for grpcs:// peers; without it, the system's roots
	}
	if err := n.serve(p, store, log); err != nil {
		n.Destruct()
		return nil, err
	}
	return n, nil
}

// serve starts the private listener.
func (n *sharedNodes) serve(p *PrivateAPI, store *tunnel.Store, log *zap.Logger) error {
	addr, err := caddy.ParseNetworkAddress(p.Listen)
	if err != nil {
		return fmt.Errorf("private_api: listen: %w", err)
	}
	ln, err := addr.Listen(context.Background(), 0, net.ListenConfig{})
	if err != nil {
		return fmt.Errorf("private_api: listen %s: %w", p.Listen, err)
	}
	l, ok := ln.(net.Listener)
	if !ok {
		return fmt.Errorf("private_api: listen %s: not a stream listener", p.Listen)
	}
	handler := &nodetunnel.Server{Secret: n.secret, Local: store, Logger: log.Named("private_api")}
	h2s := &http2.Server{}
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, ErrorLog: nil}
	if p.CertFile != "" || p.KeyFile != "" {
		cert, err := tls.LoadX509KeyPair(p.CertFile, p.KeyFile)
		if err != nil {
			l.Close()
			return fmt.Errorf("private_api: tls: %w", err)
		}
		srv.Handler = handler
		srv.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2"}}
		if err := http2.ConfigureServer(srv, h2s); err != nil {
			l.Close()
			return fmt.Errorf("private_api: %w", err)
		}
		l = tls.NewListener(l, srv.TLSConfig)
	} else {
		srv.Handler = h2c.NewHandler(handler, h2s)
	}
	n.mu.Lock()
	n.server, n.served = srv, make(chan struct{})
	served := n.served
	n.mu.Unlock()
	go func() { // owned by sharedNodes; Destruct waits for it
		defer close(served)
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("private API server stopped", zap.Error(err))
		}
	}()
	log.Info("serving the private API", zap.String("address", l.Addr().String()), zap.Bool("tls", p.CertFile != ""))
	return nil
}

func readPasswordFile(file string) (string, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return "", err
	}
	return strings.TrimRight(string(b), "\r\n"), nil
}

// systemRootsWith returns the system's roots with the PEM certificates of
// file added.
func systemRootsWith(file string) (*x509.CertPool, error) {
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	return addPEMFile(pool, file)
}

// addPEMFile adds the PEM certificates of file to pool, failing for a
// file that holds none.
func addPEMFile(pool *x509.CertPool, file string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no PEM certificate in it", file)
	}
	return pool, nil
}
