// Command agentk-image builds the container image of agentk: one OCI
// image index with a linux/amd64 and a linux/arm64 image, each holding a
// static agentk and a CA bundle on an empty (scratch) base. It needs
// neither a container daemon nor a base image from a registry: it
// cross-compiles cmd/agentk with the Go toolchain and assembles the image
// with go-containerregistry, as ko does.
//
// The result is reproducible: the same commit, built with the same Go
// toolchain, gives the same bytes. Every timestamp is the commit time (or
// SOURCE_DATE_EPOCH when set), binaries are built with -trimpath and
// CGO_ENABLED=0, and the CA bundle comes from the Mozilla roots of
// golang.org/x/crypto/x509roots/fallback, a module pinned in go.sum,
// rather than from the build machine's trust store, which differs between
// machines and changes with every ca-certificates update.
//
//	go run ./hack/agentk-image -layout bin/agentk-oci -archive bin/agentk-oci.tar
//
// It writes an OCI image layout directory and, unless -archive is empty,
// the same layout as a tar file (an "OCI archive"), and prints the digest
// of the image index.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "agentk-image: %v\n", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := build(ctx, o)
	if err != nil {
		fmt.Fprintf(stderr, "agentk-image: %v\n", err)
		return 1
	}
	if res.uncommitted {
		fmt.Fprintf(stderr, "agentk-image: note: the work tree has uncommitted changes; the image is built from commit %s without them\n", res.revision)
	}
	fmt.Fprintf(stdout, "agentk image %s (version %s, commit %s)\n", res.reference, res.version, res.revision)
	fmt.Fprintf(stdout, "index %s\n", res.digest)
	fmt.Fprintf(stdout, "OCI layout %s\n", o.layoutDir)
	if o.archive != "" {
		fmt.Fprintf(stdout, "OCI archive %s\n", o.archive)
	}
	return 0
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("agentk-image", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.layoutDir, "layout", "bin/agentk-oci", "OCI image layout directory to write; replaced if it holds a layout already")
	fs.StringVar(&o.archive, "archive", "bin/agentk-oci.tar", "tar file of the OCI image layout to write (an OCI archive); empty for none")
	fs.StringVar(&o.name, "name", defaultName, "image name recorded in the layout, for tools that tag what they load")
	fs.StringVar(&o.source, "source", defaultSource, "source repository URL for the org.opencontainers.image.source label")
	fs.StringVar(&o.licenses, "licenses", "", "SPDX license expression for the org.opencontainers.image.licenses label; empty for no label")
	fs.StringVar(&o.version, "version", "", "version to stamp into agentk with the linker and to label the image with; empty for the version Go records from the commit")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.layoutDir == "" {
		return o, errors.New("-layout must not be empty")
	}
	return o, nil
}
