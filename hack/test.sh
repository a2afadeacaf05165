#!/usr/bin/env bash
# Runs every test of the repository, the end-to-end tests in integration/ included: those drive the
# real caddy and agentk binaries, a real kube-apiserver with etcd, and the real kubectl.
#
#   hack/test.sh                                  # go vet, then all tests with the race detector
#   hack/test.sh -run TestReload -v ./integration/  # extra arguments go to go test instead of ./...
#   FUZZTIME=2m hack/test.sh                      # fuzz each target longer (default 15s; 0 skips fuzzing)
set -euo pipefail
cd "$(dirname "$0")/.."

need() { # need COMMAND WHY
  command -v "$1" >/dev/null 2>&1 || { echo "test.sh: $1 is not on PATH; $2" >&2; exit 1; }
}
need go "install Go (see go.mod for the version)"
need kubectl "the integration tests drive the real kubectl (1.32 or newer)"
need openssl "install the openssl package"

echo "==> kube-apiserver and etcd for the integration tests (built once and cached; the first build takes about 5 minutes)"
KUBE_TESTBIN=$(bash hack/kube-apiserver/build.sh)
export KUBE_TESTBIN
echo "    $KUBE_TESTBIN"

# Once, before the tests, so that the chart's tests and the integration tests, which run in parallel,
# do not both build it; go tool keeps it in Go's build cache.
echo "==> helm for the Helm chart's tests (hack/helm pins it; the first build takes a few minutes)"
(cd hack/helm && go tool helm version --short)

echo "==> go vet ./..., gofmt -l"
go vet ./...
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './.git/*'))
if [ -n "$unformatted" ]; then
  echo "test.sh: not gofmt-formatted (run gofmt -w on them):" >&2
  echo "$unformatted" >&2
  exit 1
fi

args=("$@")
[ ${#args[@]} -gt 0 ] || args=(./...)
echo "==> go test -race -count=1 -timeout 30m ${args[*]}"
go test -race -count=1 -timeout 30m "${args[@]}"

# Wire decoders have fuzz targets; their seed corpora ran above as plain tests. Without extra
# arguments, fuzz each target for a bounded time as well, so that a cold run stays predictable.
fuzztime=${FUZZTIME:-15s}
if [ ${#@} -eq 0 ] && [ "$fuzztime" != 0 ]; then
  grep -rl --include='*_test.go' '^func Fuzz' . | sort | while read -r file; do
    pkg=./$(dirname "${file#./}")
    for target in $(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*/\1/p' "$file"); do
      echo "==> go test -fuzz ^$target\$ -fuzztime $fuzztime $pkg"
      go test -run '^$' -fuzz "^$target\$" -fuzztime "$fuzztime" "$pkg"
    done
  done
fi
