package agentk

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/textproto"
	"net/url"
	"os"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"
)

// Timeouts of the tunnel handshake with KAS; GitLab agentk uses the same
// (kas-address over WebSocket: dial 30 s, TLS 10 s, response 20 s).
const (
	kasDialTimeout         = 30 * time.Second
	kasTLSHandshakeTimeout = 10 * time.Second
	// HandshakeTimeout bounds a whole tunnel handshake, from dialing to
	// the 101 answer.
	HandshakeTimeout = 20 * time.Second
)

// ErrUnsupportedScheme is wrapped by [ParseKASAddress] errors about a
// scheme other than ws or wss.
var ErrUnsupportedScheme = errors.New("unsupported scheme")

// ParseKASAddress checks the --kas-address URL. Only ws:// and wss:// are
// supported (GitLab agentk's grpc:// and grpcs:// speak GitLab's gRPC
// tunnel, which caddy-kas does not implement); the URL is dialed as is,
// path included.
func ParseKASAddress(s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("parsing KAS address: %w", err)
	}
	switch u.Scheme {
	case "ws", "wss":
	default:
		return nil, fmt.Errorf("KAS address %q: %w %q: use ws:// or wss://", u.Redacted(), ErrUnsupportedScheme, u.Scheme)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("KAS address %q has no host", u.Redacted())
	}
	if u.User != nil {
		return nil, fmt.Errorf("KAS address %q: credentials in the URL are not supported; use --token-file", u.Redacted())
	}
	return u, nil
}

// KASClientOptions configure the TLS of the connection to KAS.
type KASClientOptions struct {
	// CACertFile is a PEM file of CA certificates trusted for KAS in
	// addition to the system's.
	CACertFile string
	// InsecureSkipTLSVerify disables verification of KAS's certificate.
	InsecureSkipTLSVerify bool
	// TLSServerName is the name sent in SNI and verified in KAS's
	// certificate, when it differs from the address's host.
	TLSServerName string
}

// NewKASClient returns the HTTP client for tunnel handshakes: proxies from
// the environment (HTTPS_PROXY, NO_PROXY, ...), redirects not followed
// (a redirect would send the agent token elsewhere), and GitLab agentk's
// timeouts.
func NewKASClient(o KASClientOptions) (*http.Client, error) {
	tlsConfig := &tls.Config{
		MinVersion:         tls.VersionTLS12,
		ServerName:         o.TLSServerName,
		InsecureSkipVerify: o.InsecureSkipTLSVerify,
		// WebSocket handshakes are HTTP/1.1 (RFC 6455); offering h2
		// would let a server pick a protocol the handshake cannot use.
		NextProtos: []string{"http/1.1"},
	}
	if o.CACertFile != "" {
		pem, err := os.ReadFile(o.CACertFile)
		if err != nil {
			return nil, fmt.Errorf("reading KAS CA certificate: %w", err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil {
			// No system pool on this platform: trust the file alone.
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("KAS CA certificate file %s holds no PEM certificate", o.CACertFile)
		}
		tlsConfig.RootCAs = pool
	}
	return &http.Client{
		Transport: &http.Transport{
			Proxy: http.ProxyFromEnvironment,
			DialContext: (&net.Dialer{
				Timeout:   kasDialTimeout,
				KeepAlive: 30 * time.Second,
			}).DialContext,
			TLSClientConfig:       tlsConfig,
			TLSHandshakeTimeout:   kasTLSHandshakeTimeout,
			ResponseHeaderTimeout: HandshakeTimeout,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}, nil
}

// TokenSource returns the agent token for a tunnel handshake. It is called
// before every connection attempt.
type TokenSource func() (string, error)

// TokenFile returns a TokenSource that reads path on every call, so that a
// rotated token is used from the next reconnect on. Surrounding whitespace
// is trimmed.
func TokenFile(path string) TokenSource {
	return func() (string, error) { return readTokenFile(path) }
}

// StaticToken returns a TokenSource for a token given once (the
// AGENTK_TOKEN environment variable).
func StaticToken(token string) TokenSource {
	token = strings.TrimSpace(token)
	return func() (string, error) {
		if token == "" {
			return "", errEmptyToken
		}
		return token, nil
	}
}

// reservedHeader reports whether agentk sets header name itself in a
// tunnel handshake, so that --kas-header may not.
func reservedHeader(name string) bool {
	switch textproto.CanonicalMIMEHeaderKey(name) {
	case "Authorization", "User-Agent", "Host", "Connection", "Upgrade":
		return true
	}
	lower := strings.ToLower(name)
	return strings.HasPrefix(lower, "sec-websocket-") || strings.HasPrefix(lower, "kas-agent-")
}

// ParseHeader parses a --kas-header value, "Name: value".
func ParseHeader(s string) (name, value string, err error) {
	name, value, ok := strings.Cut(s, ":")
	if !ok {
		// The value is not echoed: extra headers often carry secrets.
		return "", "", errors.New(`header: want "Name: value"`)
	}
	name, value = strings.TrimSpace(name), strings.TrimSpace(value)
	if !httpguts.ValidHeaderFieldName(name) {
		return "", "", fmt.Errorf("header %q: invalid name", name)
	}
	if !httpguts.ValidHeaderFieldValue(value) {
		return "", "", fmt.Errorf("header %q: invalid value", name)
	}
	if reservedHeader(name) {
		return "", "", fmt.Errorf("header %q: agentk sets it itself", name)
	}
	return textproto.CanonicalMIMEHeaderKey(name), value, nil
}
