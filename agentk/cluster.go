package agentk

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"
)

// Timeouts of the connections to the kube-apiserver. There is no overall
// request timeout: watches and `kubectl logs -f` last as long as the
// client wants.
const (
	apiserverDialTimeout         = 30 * time.Second
	apiserverTLSHandshakeTimeout = 10 * time.Second
	apiserverIdleConnTimeout     = 90 * time.Second
	// apiserverMaxIdleConnsPerHost keeps enough HTTP/1.1 connections for
	// bursts of concurrent requests when the apiserver does not speak
	// HTTP/2 (net/http's default of 2 would close and reopen them).
	apiserverMaxIdleConnsPerHost = 100
	// versionTimeout bounds the best-effort GET /version, which comes
	// before every tunnel handshake: a healthy apiserver answers in
	// milliseconds, and a missing version must not hold up the tunnel.
	versionTimeout = 5 * time.Second
)

// Cluster is how agentk reaches a kube-apiserver: its URL, the TLS settings
// and agentk's credential. Make one with [LoadKubeconfig] or [InCluster].
type Cluster struct {
	server    *url.URL
	base      *http.Transport // connections; closed idle by CloseIdleConnections
	transport http.RoundTripper
	// upgrades sends protocol upgrades (exec, attach, port-forward) over
	// HTTP/1.1 only: Go's transport keeps HTTP/2 for every upgrade but
	// "websocket", and HTTP/2 cannot carry an Upgrade (RFC 9113 §8.6), so
	// SPDY/3.1 would fail on the apiserver's HTTP/2 connection.
	upgrades http.RoundTripper
}

// clusterSpec is what a kubeconfig or the in-cluster environment says about
// the apiserver, before it becomes a transport.
type clusterSpec struct {
	server *url.URL
	tls    *tls.Config
	cred   credential
	// proxy is the kubeconfig's proxy-url; nil means the environment's
	// HTTPS_PROXY and NO_PROXY, as client-go does.
	proxy *url.URL
}

// parseServerURL checks the apiserver URL of a kubeconfig or of the
// in-cluster environment.
func parseServerURL(s string) (*url.URL, error) {
	if s == "" {
		return nil, errors.New("no server URL")
	}
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("parsing server URL: %w", err)
	}
	if u.Scheme != "https" && u.Scheme != "http" {
		return nil, fmt.Errorf("server URL %q: scheme must be https or http", s)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("server URL %q has no host", s)
	}
	if u.User != nil {
		return nil, fmt.Errorf("server URL %q: credentials in the URL are not supported", u.Redacted())
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("server URL %q: a query or fragment is not allowed", s)
	}
	return u, nil
}

func newCluster(s clusterSpec) *Cluster {
	proxy := http.ProxyFromEnvironment
	if s.proxy != nil {
		proxy = http.ProxyURL(s.proxy)
	}
	tlsConfig := s.tls
	if tlsConfig == nil {
		tlsConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	base := &http.Transport{
		Proxy: proxy,
		DialContext: (&net.Dialer{
			Timeout:   apiserverDialTimeout,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		TLSClientConfig:     tlsConfig,
		TLSHandshakeTimeout: apiserverTLSHandshakeTimeout,
		// The apiserver multiplexes HTTP/2 when it can; one connection
		// then carries every watch.
		ForceAttemptHTTP2:     true,
		MaxIdleConnsPerHost:   apiserverMaxIdleConnsPerHost,
		IdleConnTimeout:       apiserverIdleConnTimeout,
		ExpectContinueTimeout: time.Second,
		// A proxy must pass bodies as the apiserver sent them; the
		// caller's Accept-Encoding decides about compression.
		DisableCompression: true,
	}
	cred := s.cred
	if cred == nil {
		cred = noCredential{}
	}
	h1 := base.Clone()
	h1.ForceAttemptHTTP2 = false
	h1.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{} // non-nil and empty: no HTTP/2
	h1.TLSClientConfig.NextProtos = []string{"http/1.1"}
	// A switched connection is never reused, so keeping idle ones is moot.
	h1.DisableKeepAlives = true
	return &Cluster{
		server:    s.server,
		base:      base,
		transport: &authTransport{base: base, cred: cred},
		upgrades:  &authTransport{base: h1, cred: cred},
	}
}

// Server returns the apiserver's base URL; request paths are appended to
// its path.
func (c *Cluster) Server() string { return c.server.String() }

// RoundTripper returns a transport that sends requests to the apiserver
// with agentk's credential, replacing any Authorization they carry.
func (c *Cluster) RoundTripper() http.RoundTripper { return c.transport }

// UpgradeRoundTripper returns a transport for requests that switch
// protocols: HTTP/1.1 only, with agentk's credential. A 101's body is the
// switched connection (an io.ReadWriteCloser).
func (c *Cluster) UpgradeRoundTripper() http.RoundTripper { return c.upgrades }

// CloseIdleConnections closes the idle connections to the apiserver.
func (c *Cluster) CloseIdleConnections() { c.base.CloseIdleConnections() }

// maxVersionBody bounds how much of the /version answer is read.
const maxVersionBody = 1 << 20

// KubernetesVersion is what the apiserver says of itself in GET /version.
type KubernetesVersion struct {
	// GitVersion is such as "v1.32.13" or "v1.30.5-gke.1014001".
	GitVersion string `json:"gitVersion"`
	// Platform is such as "linux/amd64".
	Platform string `json:"platform"`
}

// ServerVersion asks the apiserver for its version (GET /version).
func (c *Cluster) ServerVersion(ctx context.Context) (KubernetesVersion, error) {
	ctx, cancel := context.WithTimeout(ctx, versionTimeout)
	defer cancel()
	u := c.server.JoinPath("version")
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return KubernetesVersion{}, fmt.Errorf("getting kubernetes version: %w", err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.transport.RoundTrip(req)
	if err != nil {
		return KubernetesVersion{}, fmt.Errorf("getting kubernetes version: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return KubernetesVersion{}, fmt.Errorf("getting kubernetes version from %s: status %d", u.Redacted(), resp.StatusCode)
	}
	var v KubernetesVersion
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxVersionBody)).Decode(&v); err != nil {
		return KubernetesVersion{}, fmt.Errorf("decoding kubernetes version from %s: %w", u.Redacted(), err)
	}
	if v.GitVersion == "" {
		return KubernetesVersion{}, fmt.Errorf("kubernetes version from %s: no gitVersion", u.Redacted())
	}
	return v, nil
}
