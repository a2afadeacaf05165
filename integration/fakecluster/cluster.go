package fakecluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/caddy-kas/caddy-kas/internal/testca"
)

// Options configure a Cluster.
type Options struct {
	// APIServerURL is the real kube-apiserver's base URL, such as
	// https://127.0.0.1:6443. Required.
	APIServerURL string
	// APIServerCAFile or APIServerCA (PEM) is the CA that issued the
	// apiserver's serving certificate. One is required.
	APIServerCAFile string
	APIServerCA     []byte

	// RefuseWebSocketExec makes exec and attach answer a WebSocket upgrade
	// with 400 Bad Request, as an apiserver that cannot translate WebSocket
	// remote command streams does; kubectl then falls back to SPDY.
	RefuseWebSocketExec bool
	// RefuseWebSocketPortForward does the same for portforward.
	RefuseWebSocketPortForward bool

	// PortTargets maps the container ports a port-forward may reach to
	// addresses on 127.0.0.1 ("127.0.0.1:port"); a port not in the map is
	// refused. When nil, every port reaches the Cluster's echo server.
	PortTargets map[int32]string

	// LogInterval is the time between two lines of a followed log;
	// default 10 ms.
	LogInterval time.Duration

	// ShutdownTimeout bounds the wait in Close for the handlers and
	// goroutines to end once their connections are closed; default 30 s.
	ShutdownTimeout time.Duration
}

// Cluster is a running fake kube-apiserver plus kubelet; see the package
// documentation.
type Cluster struct {
	opts      Options
	authority *testca.CA
	dir       string // holds the CA file

	apiURL       *url.URL
	apiCA        []byte
	apiTransport *http.Transport
	proxy        *httputil.ReverseProxy

	kubeletURL       *url.URL
	kubeletTransport *http.Transport

	front   *server
	kubelet *server
	echo    *echoServer
	runtime *fakeRuntime
	stats   *stats
	tasks   *group

	closing   context.Context
	stopAll   context.CancelFunc
	closeOnce sync.Once
	closeErr  error
}

// Start starts a Cluster for t and closes it when t ends (failing t if it
// does not close cleanly).
func Start(t testing.TB, opts Options) *Cluster {
	t.Helper()
	c, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Error(err)
		}
	})
	return c
}

// New starts a Cluster; the caller must Close it.
func New(opts Options) (_ *Cluster, err error) {
	if opts.APIServerURL == "" {
		return nil, errors.New("fakecluster: Options.APIServerURL is required")
	}
	apiURL, err := url.Parse(opts.APIServerURL)
	if err != nil || apiURL.Scheme != "https" || apiURL.Host == "" {
		return nil, fmt.Errorf("fakecluster: Options.APIServerURL %q is not an https URL", opts.APIServerURL)
	}
	apiCA := opts.APIServerCA
	if len(apiCA) == 0 {
		if opts.APIServerCAFile == "" {
			return nil, errors.New("fakecluster: Options.APIServerCAFile or APIServerCA is required")
		}
		if apiCA, err = os.ReadFile(opts.APIServerCAFile); err != nil {
			return nil, fmt.Errorf("fakecluster: read the apiserver CA: %w", err)
		}
	}
	apiPool := x509.NewCertPool()
	if !apiPool.AppendCertsFromPEM(apiCA) {
		return nil, errors.New("fakecluster: no certificate in the apiserver CA")
	}
	if opts.LogInterval <= 0 {
		opts.LogInterval = 10 * time.Millisecond
	}
	if opts.ShutdownTimeout <= 0 {
		opts.ShutdownTimeout = 30 * time.Second
	}

	c := &Cluster{
		opts:   opts,
		apiURL: apiURL,
		apiCA:  apiCA,
		apiTransport: &http.Transport{
			TLSClientConfig:     &tls.Config{RootCAs: apiPool, MinVersion: tls.VersionTLS12},
			ForceAttemptHTTP2:   true,
			TLSHandshakeTimeout: 30 * time.Second,
			MaxIdleConnsPerHost: 20,
		},
		stats: newStats(),
		tasks: &group{},
	}
	c.closing, c.stopAll = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			_ = c.Close()
		}
	}()

	if c.authority, err = newAuthority(); err != nil {
		return nil, fmt.Errorf("fakecluster: %w", err)
	}
	if c.dir, err = os.MkdirTemp("", "fakecluster-"); err != nil {
		return nil, fmt.Errorf("fakecluster: %w", err)
	}
	if err := os.WriteFile(c.CAFile(), c.authority.CAPEM, 0o600); err != nil {
		return nil, fmt.Errorf("fakecluster: write the CA file: %w", err)
	}

	if c.echo, err = startEchoServer(); err != nil {
		return nil, err
	}
	c.runtime = &fakeRuntime{
		closing:     c.closing,
		tasks:       c.tasks,
		stats:       c.stats,
		echoAddr:    c.echo.addr(),
		portTargets: opts.PortTargets,
	}
	if c.kubelet, err = startServer("kubelet", kubeletHandler(c.runtime), c.authority.Server, false); err != nil {
		return nil, err
	}
	c.kubeletURL = &url.URL{Scheme: "https", Host: c.kubelet.addr()}
	c.kubeletTransport = &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: c.authority.Pool, MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout: 30 * time.Second,
	}

	c.proxy = &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(c.apiURL)
		},
		Transport:     c.apiTransport,
		FlushInterval: -1, // watches and other streams go out as they come
		ErrorLog:      log.New(io.Discard, "", 0),
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if r.Context().Err() == nil {
				writeStatus(w, apierrors.NewInternalError(fmt.Errorf("fakecluster: proxy to the kube-apiserver: %w", err)))
			}
		},
	}
	if c.front, err = startServer("apiserver", http.HandlerFunc(c.serveFront), c.authority.Server, true); err != nil {
		return nil, err
	}
	return c, nil
}

// URL is the Cluster's base URL, https://127.0.0.1:<port>.
func (c *Cluster) URL() string { return "https://" + c.front.addr() }

// CAFile is the path of the PEM file of the CA that issued the Cluster's
// serving certificate (valid for 127.0.0.1, not localhost). It is removed by
// Close.
func (c *Cluster) CAFile() string { return filepath.Join(c.dir, "ca.crt") }

// CAPEM is the PEM of the CA that issued the Cluster's serving certificate.
func (c *Cluster) CAPEM() []byte { return append([]byte(nil), c.authority.CAPEM...) }

// EchoAddr is the address of the echo server that port-forwards reach.
func (c *Cluster) EchoAddr() string { return c.echo.addr() }

// serveFront routes a request to the Cluster's own subresource handlers or
// to the real apiserver.
func (c *Cluster) serveFront(w http.ResponseWriter, r *http.Request) {
	if namespace, pod, sub, ok := podSubresource(r.URL.Path); ok {
		c.serveSubresource(w, r, namespace, pod, sub)
		return
	}
	c.proxy.ServeHTTP(w, r)
}

// podSubresource recognizes /api/v1/namespaces/NS/pods/NAME/SUB for the
// subresources the Cluster serves.
func podSubresource(p string) (namespace, pod string, sub Subresource, ok bool) {
	parts := strings.Split(strings.TrimPrefix(p, "/"), "/")
	if len(parts) != 7 || parts[0] != "api" || parts[1] != "v1" || parts[2] != "namespaces" || parts[4] != "pods" ||
		parts[3] == "" || parts[5] == "" {
		return "", "", "", false
	}
	switch sub := Subresource(parts[6]); sub {
	case Exec, Attach, PortForward, Log:
		return parts[3], parts[5], sub, true
	}
	return "", "", "", false
}

// Close stops the Cluster: it ends every stream and connection, waits for
// its handlers and goroutines (for Options.ShutdownTimeout at most) and
// removes its files. It is safe to call more than once.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() {
		c.stopAll()
		var errs []error
		for _, s := range []*server{c.front, c.kubelet} {
			if s != nil {
				s.stopAccepting()
			}
		}
		if c.runtime != nil {
			c.runtime.closeTargets()
		}
		if c.echo != nil {
			c.echo.close()
		}
		for _, s := range []*server{c.front, c.kubelet} {
			if s != nil {
				if err := s.waitHandlers(c.opts.ShutdownTimeout); err != nil {
					errs = append(errs, err)
				}
			}
		}
		if err := c.tasks.close(c.opts.ShutdownTimeout); err != nil {
			errs = append(errs, fmt.Errorf("fakecluster: runtime goroutines: %w", err))
		}
		c.apiTransport.CloseIdleConnections()
		if c.kubeletTransport != nil {
			c.kubeletTransport.CloseIdleConnections()
		}
		if c.dir != "" {
			if err := os.RemoveAll(c.dir); err != nil {
				errs = append(errs, fmt.Errorf("fakecluster: %w", err))
			}
		}
		c.closeErr = errors.Join(errs...)
	})
	return c.closeErr
}
