// Command agentsim keeps many idle simulated agents connected to an agent
// server, for the scale benchmark of kasbench. It prints
// "ready <connected> <failed>" once every handshake is done, then keeps the
// tunnels open until its standard input closes or it receives SIGTERM, and
// prints "done <connected> <lost>" before it exits.
//
//	agentsim -url wss://127.0.0.1:8443/-/kubernetes-agent/ -ca ca.pem \
//	  -first-id 1 -count 1000 -token-prefix secret- -sources 127.0.0.2,127.0.0.3
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/caddy-kas/caddy-kas/bench/agentsim"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "agentsim: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	url := flag.String("url", "", "agent endpoint (wss://...)")
	caFile := flag.String("ca", "", "PEM file of the CA that signed the server certificate")
	firstID := flag.Int("first-id", 1, "id of the first agent")
	count := flag.Int("count", 1, "number of agents")
	prefix := flag.String("token-prefix", "", "agent <id> uses the token <prefix><id>")
	sources := flag.String("sources", "", "comma-separated local addresses to dial from, in turn")
	parallel := flag.Int("parallel", 32, "handshakes at once")
	flag.Parse()
	if *url == "" || *caFile == "" || *prefix == "" {
		return fmt.Errorf("-url, -ca and -token-prefix are required")
	}
	if err := raiseFileLimit(); err != nil {
		return err
	}
	pem, err := os.ReadFile(*caFile)
	if err != nil {
		return fmt.Errorf("reading CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return fmt.Errorf("no certificate in %s", *caFile)
	}
	var ips []net.IP
	for _, s := range strings.Split(*sources, ",") {
		if s == "" {
			continue
		}
		ip := net.ParseIP(s)
		if ip == nil || !ip.IsLoopback() {
			return fmt.Errorf("source %q is not a loopback address", s)
		}
		ips = append(ips, ip)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	stdinClosed := make(chan struct{})
	go func() { // ends when stdin closes, which the parent does to stop us
		io.Copy(io.Discard, os.Stdin)
		close(stdinClosed)
	}()

	sim, err := agentsim.Start(ctx, agentsim.Config{
		URL: *url, TLS: &tls.Config{RootCAs: pool}, FirstID: *firstID, Count: *count,
		Token: func(id int) string { return *prefix + strconv.Itoa(id) }, Sources: ips, Parallel: *parallel,
	})
	if err != nil {
		return err
	}
	connected, failed, _ := sim.Counts()
	fmt.Printf("ready %d %d\n", connected, failed)
	select {
	case <-ctx.Done():
	case <-stdinClosed:
	}
	connected, _, lost := sim.Counts()
	sim.Stop()
	fmt.Printf("done %d %d\n", connected, lost)
	return nil
}

// raiseFileLimit lifts the soft limit on open files to the hard limit: every
// tunnel is one socket.
func raiseFileLimit() error {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return fmt.Errorf("reading the open files limit: %w", err)
	}
	l.Cur = l.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return fmt.Errorf("raising the open files limit: %w", err)
	}
	return nil
}
