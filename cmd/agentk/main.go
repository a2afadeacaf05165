// Command agentk is the caddy-kas agent: it runs next to a Kubernetes
// cluster, dials out to the agent server (KAS) and forwards the requests
// KAS sends through the tunnel to the cluster's kube-apiserver.
//
// Its flags and environment variables are those of GitLab's agentk where
// they mean the same thing, so that deployments carry over:
//
//	POD_NAMESPACE=ns POD_NAME=agentk-0 agentk \
//	  --kas-address wss://kas.example.com/-/kubernetes-agent/ \
//	  --token-file /etc/agentk/token
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/agentk"
	"github.com/caddy-kas/caddy-kas/internal/buildinfo"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// headerFlag collects repeated --kas-header values. They are checked
// after parsing, because the flag package quotes a rejected value in its
// error message, and extra headers often carry secrets.
type headerFlag struct {
	raw []string
	h   http.Header // filled by parse
}

func (f *headerFlag) String() string { return "" }

func (f *headerFlag) Set(s string) error {
	f.raw = append(f.raw, s)
	return nil
}

// parse checks the collected values.
func (f *headerFlag) parse() error {
	for i, s := range f.raw {
		name, value, err := agentk.ParseHeader(s)
		if err != nil {
			return fmt.Errorf("--kas-header #%d: %w", i+1, err)
		}
		if f.h == nil {
			f.h = make(http.Header)
		}
		f.h.Add(name, value)
	}
	return nil
}

// options are the parsed command line.
type options struct {
	kasAddress        string
	tokenFile         string
	kasCACertFile     string
	kasInsecure       bool
	kasTLSServerName  string
	kasHeaders        headerFlag
	observabilityNet  string
	observabilityAddr string
	kubeconfig        string
	kubeContext       string
	kasConnections    int
	printVersion      bool
	serviceAccountDir string
}

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	var o options
	fs := flag.NewFlagSet("agentk", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.kasAddress, "kas-address", "", "KAS address: a ws:// or wss:// URL, dialed as is (required)")
	fs.StringVar(&o.tokenFile, "token-file", "", "file with the agent token, re-read on every reconnect (or set AGENTK_TOKEN)")
	fs.StringVar(&o.kasCACertFile, "kas-ca-cert-file", "", "PEM file of CA certificates to trust for KAS, in addition to the system's")
	fs.StringVar(&o.kasCACertFile, "ca-cert-file", "", "deprecated name of --kas-ca-cert-file")
	fs.BoolVar(&o.kasInsecure, "kas-insecure-skip-tls-verify", false, "do not verify KAS's TLS certificate (insecure)")
	fs.StringVar(&o.kasTLSServerName, "kas-tls-server-name", "", "server name for SNI and verification of KAS's certificate")
	fs.Var(&o.kasHeaders, "kas-header", "extra `'Name: value'` header for the handshake with KAS (repeatable)")
	fs.StringVar(&o.observabilityNet, "observability-listen-network", "tcp", "network of the observability listener (tcp, tcp4, tcp6, unix)")
	fs.StringVar(&o.observabilityAddr, "observability-listen-address", ":8080", "address of /liveness, /readiness and /metrics")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig of the cluster; default: the in-cluster service account, else $KUBECONFIG")
	fs.StringVar(&o.kubeContext, "context", "", "kubeconfig context; default: its current-context")
	fs.IntVar(&o.kasConnections, "kas-connections", 1, "how many tunnels to KAS to keep open")
	fs.BoolVar(&o.printVersion, "version", false, "print the version and exit")
	o.serviceAccountDir = agentk.ServiceAccountDir
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		// Not echoed: a stray argument is often half of an unquoted
		// --kas-header value.
		return nil, fmt.Errorf("%d unexpected argument(s) after the flags; quote values with spaces", fs.NArg())
	}
	if err := o.kasHeaders.parse(); err != nil {
		return nil, err
	}
	return &o, nil
}

func run(args []string, stdout, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "agentk: %v\n", err)
		return 2
	}
	if o.printVersion {
		printVersion(stdout)
		return 0
	}

	logger, err := newLogger()
	if err != nil {
		fmt.Fprintf(stderr, "agentk: creating logger: %v\n", err)
		return 1
	}
	defer logger.Sync()

	a, err := setup(o, logger)
	if err != nil {
		logger.Error("cannot start", zap.Error(err))
		return 1
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// After the first signal, restore the default handling, so that a
	// second one stops agentk at once instead of waiting for the grace
	// period. The goroutine ends with Run at the latest.
	runDone, watcherDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(watcherDone)
		select {
		case <-ctx.Done():
			stop()
			logger.Info("stop signal received; letting requests in flight finish")
		case <-runDone:
		}
	}()
	err = a.Run(ctx)
	close(runDone)
	<-watcherDone
	if err != nil {
		logger.Error("agentk failed", zap.Error(err))
		return 1
	}
	return 0
}

// printVersion prints the agentk version and commit, with "unknown" for
// a build that recorded no commit.
func printVersion(w io.Writer) {
	commit := buildinfo.Commit()
	if commit == "" {
		commit = "unknown"
	}
	fmt.Fprintf(w, "agentk %s (commit %s)\n", buildinfo.Version(), commit)
}

// newLogger returns zap's production logger (JSON on stderr) without stack
// traces: agentk's errors are about the network and configuration, and a
// stack would only bury the message.
func newLogger() (*zap.Logger, error) {
	cfg := zap.NewProductionConfig()
	cfg.DisableStacktrace = true
	return cfg.Build()
}

// setup turns the options and environment into an agent.
func setup(o *options, logger *zap.Logger) (*agentk.Agent, error) {
	if o.kasAddress == "" {
		return nil, errors.New("--kas-address is required")
	}
	if _, err := agentk.ParseKASAddress(o.kasAddress); err != nil {
		return nil, err
	}

	token, err := tokenSource(o)
	if err != nil {
		return nil, err
	}

	cluster, inPod, err := loadCluster(o, logger)
	if err != nil {
		return nil, err
	}

	podNamespace, podName := os.Getenv("POD_NAMESPACE"), os.Getenv("POD_NAME")
	if podNamespace == "" || podName == "" {
		if inPod {
			// GitLab agentk requires them too: KAS tells pods apart by
			// them.
			return nil, errors.New("POD_NAMESPACE and POD_NAME must be set from the downward API when agentk runs in a pod")
		}
		logger.Warn("POD_NAMESPACE or POD_NAME is not set; KAS will not know where this agentk runs")
	}

	kasClient, err := agentk.NewKASClient(agentk.KASClientOptions{
		CACertFile:            o.kasCACertFile,
		InsecureSkipTLSVerify: o.kasInsecure,
		TLSServerName:         o.kasTLSServerName,
	})
	if err != nil {
		return nil, err
	}
	if o.kasInsecure {
		logger.Warn("KAS's TLS certificate is not verified (--kas-insecure-skip-tls-verify): the agent token can be stolen by anyone on the network path")
	}

	// Listen before starting, so that a busy port is a start-up error.
	// The agent owns the listener from then on.
	ln, err := net.Listen(o.observabilityNet, o.observabilityAddr)
	if err != nil {
		return nil, fmt.Errorf("observability listener: %w", err)
	}
	a, err := agentk.New(agentk.Config{
		KASAddress:            o.kasAddress,
		KASClient:             kasClient,
		Token:                 token,
		KASHeader:             o.kasHeaders.h,
		Connections:           o.kasConnections,
		Cluster:               cluster,
		PodNamespace:          podNamespace,
		PodName:               podName,
		Logger:                logger,
		ObservabilityListener: ln,
	})
	if err != nil {
		ln.Close()
		return nil, err
	}
	logger.Info("observability endpoints listening", zap.String("address", ln.Addr().String()))
	return a, nil
}

// tokenSource returns the agent token from --token-file or AGENTK_TOKEN,
// exactly one of them. AGENTK_TOKEN is removed from the environment once
// read, as GitLab agentk does, so that it does not leak to child
// processes or to anything that dumps the environment.
func tokenSource(o *options) (agentk.TokenSource, error) {
	envToken, _ := os.LookupEnv("AGENTK_TOKEN")
	os.Unsetenv("AGENTK_TOKEN")
	envToken = strings.TrimSpace(envToken)
	switch {
	case o.tokenFile != "" && envToken != "":
		return nil, errors.New("give the agent token in --token-file or AGENTK_TOKEN, not both")
	case o.tokenFile != "":
		ts := agentk.TokenFile(o.tokenFile)
		if _, err := ts(); err != nil { // fail at start, not on every reconnect
			return nil, err
		}
		return ts, nil
	case envToken != "":
		return agentk.StaticToken(envToken), nil
	}
	return nil, errors.New("an agent token is required: --token-file or AGENTK_TOKEN")
}

// loadCluster finds the kube-apiserver: --kubeconfig, else the pod's
// service account, else $KUBECONFIG. inPod reports whether agentk runs in
// a Kubernetes pod.
func loadCluster(o *options, logger *zap.Logger) (cluster *agentk.Cluster, inPod bool, err error) {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	inPod = host != "" && port != ""
	kubeconfig := o.kubeconfig
	if kubeconfig == "" && !inPod {
		kubeconfig = os.Getenv("KUBECONFIG")
		if strings.ContainsRune(kubeconfig, filepath.ListSeparator) {
			return nil, inPod, errors.New("KUBECONFIG lists several files, which agentk does not merge; pass one with --kubeconfig")
		}
	}
	if kubeconfig != "" {
		cluster, err = agentk.LoadKubeconfig(kubeconfig, o.kubeContext)
		return cluster, inPod, err
	}
	if !inPod {
		return nil, inPod, fmt.Errorf("%w, and no --kubeconfig was given", agentk.ErrNotInCluster)
	}
	if o.kubeContext != "" {
		return nil, inPod, errors.New("--context needs --kubeconfig")
	}
	cluster, err = agentk.InCluster(o.serviceAccountDir, host, port)
	if err == nil {
		logger.Info("using the in-cluster service account", zap.String("apiserver", cluster.Server()))
	}
	return cluster, inPod, err
}
