#!/usr/bin/env bash
# Builds kube-apiserver and etcd for the integration tests from the Go module proxy, with the nested
# module in this directory, and prints the directory that holds the two binaries.
#
# The binaries are cached under $(go env GOPATH)/kube-testbin/<k8s version>-<key>, where the key is a
# hash of go.mod, go.sum and the Go version: a second run returns at once. A cold build takes about
# 5 minutes on 2 cores; with a warm build cache it relinks in about 15 s.
#
# Versions are changed by editing go.mod and running `go mod tidy -e` here (plain tidy fails: some
# test-only dependencies of k8s.io/kubernetes are not on the proxy); never in CI.
set -euo pipefail
export GOWORK=off
here=$(cd "$(dirname "$0")" && pwd)
K8S_VERSION=$(awk '$1=="k8s.io/kubernetes"{print $2}' "$here/go.mod")   # e.g. v1.32.13
key=$( (cat "$here/go.mod" "$here/go.sum"; go version) | sha256sum | cut -c1-16)
out="$(go env GOPATH)/kube-testbin/$K8S_VERSION-$key"
if [ -x "$out/kube-apiserver" ] && [ -x "$out/etcd" ]; then echo "$out"; exit 0; fi

# Build into a directory of our own and rename it at the end, so that an interrupted build is never
# taken for a finished one.
mkdir -p "$(dirname "$out")"
tmp=$(mktemp -d "$out.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
minor=$(echo "$K8S_VERSION" | cut -d. -f2)
# Without these stamps the apiserver reports version v0.0.0-master, which kubectl warns about.
ldf="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldf="$ldf -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
done
( cd "$here"
  echo "build.sh: building kube-apiserver $K8S_VERSION (about 5 minutes the first time)"
  go build -mod=readonly -trimpath -ldflags="$ldf" -o "$tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
  echo "build.sh: building etcd"
  go build -mod=readonly -trimpath -ldflags="-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3
) >&2
rm -rf "$out"; mv "$tmp" "$out"
trap - EXIT
echo "$out"
