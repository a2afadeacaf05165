#!/usr/bin/env bash
# Regenerates the Go code of the internal API protos (railsapi/proto -> railsapi/pb) with pinned tools.
#
#   hack/protoc/generate.sh           # rewrite railsapi/pb
#   hack/protoc/generate.sh --check   # generate into a temporary directory and fail, with a diff, if the
#                                     # committed code differs
#
# The tools are built from the Go module proxy and nothing else: buf (compiles the protos without a protoc
# binary and ships the well-known types) is pinned by the `tool` directive of hack/protoc/go.mod, and the
# two plugins by hack/protoc/plugins/go.mod. The plugins have a module of their own because buf requires a
# newer google.golang.org/protobuf than the one the main module uses, and protoc-gen-go must be exactly the
# main module's version. No remote plugins and no Buf Schema Registry are used.
#
# To change a version: `go get -tool <pkg>@<version>` in the directory of the go.mod concerned, then run this
# script. A cold run builds buf (about five minutes on two cores); later runs take a few seconds.
set -euo pipefail
export GOWORK=off

check=false
case "${1:-}" in
  "") ;;
  --check) check=true ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
protodir="$root/railsapi/proto"
pbdir="$root/railsapi/pb"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/bin" "$tmp/out"

# tool MODULE_DIR NAME: builds the tool NAME at the version MODULE_DIR/go.mod pins and copies it into
# $tmp/bin. `go tool -n` builds the executable into Go's build cache (so a warm run links nothing) and
# prints its path instead of running it.
tool() {
  local exe
  exe=$(cd "$1" && go tool -n "$2")
  [ -x "$exe" ] || { echo "generate.sh: go tool -n $2 did not give an executable: $exe" >&2; exit 1; }
  cp "$exe" "$tmp/bin/$2"
}
tool "$here" buf
tool "$here/plugins" protoc-gen-go
tool "$here/plugins" protoc-gen-go-grpc

# buf.gen.yaml names the plugins as local binaries, found on PATH; buf's own cache stays in the
# temporary directory so that nothing outside the repository and Go's caches is touched.
(cd "$protodir" && PATH="$tmp/bin:$PATH" XDG_CACHE_HOME="$tmp/cache" BUF_CACHE_DIR="$tmp/cache" \
  "$tmp/bin/buf" generate --template buf.gen.yaml --output "$tmp/out")

if $check; then
  if ! diff -ru "$pbdir" "$tmp/out" >"$tmp/diff"; then
    cat "$tmp/diff"
    echo "generate.sh: railsapi/pb is out of date; run \`make proto\` and commit the result" >&2
    exit 1
  fi
  echo "generate.sh: railsapi/pb is up to date"
  exit 0
fi

# Replace the generated files as a whole, so that code of a deleted .proto file goes too.
rm -rf "$pbdir"
mkdir -p "$(dirname "$pbdir")"
cp -R "$tmp/out" "$pbdir"
echo "generate.sh: wrote railsapi/pb"
