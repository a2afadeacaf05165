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
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
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

func run(args []string, stdout, stderr io.Writer) int {
	o, err := parseFlags(args, stdout)
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

	for _, f := range o.ignored {
		logger.Info("flag of GitLab's agentk has no effect here", zap.String("flag", "--"+f.name), zap.String("reason", f.reason))
	}
	logUnusedEnv(logger, os.Environ())

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
	ln, err := observabilityListener(o)
	if err != nil {
		return nil, err
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
	logger.Info("observability endpoints listening", zap.String("address", ln.Addr().String()), zap.Bool("tls", o.observabilityCertFile != ""))
	return a, nil
}

// observabilityListener listens for the probes and metrics, over TLS when
// --observability-cert-file and --observability-key-file are given (as
// GitLab agentk does; the Helm chart passes them with
// config.observability.tls.enabled).
func observabilityListener(o *options) (net.Listener, error) {
	var tlsConfig *tls.Config
	switch {
	case o.observabilityCertFile != "" && o.observabilityKeyFile != "":
		cert, err := tls.LoadX509KeyPair(o.observabilityCertFile, o.observabilityKeyFile)
		if err != nil {
			return nil, fmt.Errorf("observability TLS certificate: %w", err)
		}
		tlsConfig = &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
	case o.observabilityCertFile != "" || o.observabilityKeyFile != "":
		return nil, errors.New("--observability-cert-file and --observability-key-file go together")
	}
	ln, err := net.Listen(o.observabilityNet, o.observabilityAddr)
	if err != nil {
		return nil, fmt.Errorf("observability listener: %w", err)
	}
	if tlsConfig != nil {
		ln = tls.NewListener(ln, tlsConfig)
	}
	return ln, nil
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
		cluster, err = agentk.LoadKubeconfigWithOverrides(kubeconfig, o.kube)
		return cluster, inPod, err
	}
	if !inPod {
		return nil, inPod, fmt.Errorf("%w, and no --kubeconfig was given", agentk.ErrNotInCluster)
	}
	if names := kubeconfigFlags(o.kube); len(names) > 0 {
		return nil, inPod, fmt.Errorf("%s needs --kubeconfig", strings.Join(names, ", "))
	}
	cluster, err = agentk.InCluster(o.serviceAccountDir, host, port)
	if err == nil {
		logger.Info("using the in-cluster service account", zap.String("apiserver", cluster.Server()))
	}
	return cluster, inPod, err
}

// kubeconfigFlags names the kubeconfig flags that are set in k.
func kubeconfigFlags(k agentk.KubeconfigOverrides) []string {
	var names []string
	for _, f := range []struct {
		name string
		set  bool
	}{
		{"--context", k.Context != ""}, {"--cluster", k.Cluster != ""}, {"--user", k.User != ""},
		{"--server", k.Server != ""}, {"--certificate-authority", k.CertificateAuthority != ""},
		{"--insecure-skip-tls-verify", k.InsecureSkipTLSVerify}, {"--tls-server-name", k.TLSServerName != ""},
		{"--client-certificate", k.ClientCertificate != ""}, {"--client-key", k.ClientKey != ""}, {"--token", k.Token != ""},
	} {
		if f.set {
			names = append(names, f.name)
		}
	}
	return names
}
