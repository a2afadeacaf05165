#!/usr/bin/env bash
# Regenerates the Go code of our protos with pinned tools. One buf module, railsapi/proto, holds the
# protos of both gRPC APIs and of the Gitaly subset KAS calls; each file's go_package puts its code into one
# of the generated directories: railsapi/pb (the internal API GitLab Rails calls), tunnel/grpctunnel/pb (the
# services between agentk and KAS) and gitaly/pb (the Gitaly services KAS calls as a client).
#
#   hack/protoc/generate.sh           # rewrite every generated directory
#   hack/protoc/generate.sh --check   # generate into a temporary directory and fail, with a diff, if the
#                                     # committed code differs
#
# Each generated directory is replaced as a whole, so that code of a deleted .proto file goes too. The one
# exception is hand-written tests (*_test.go): they are kept, and --check ignores them.
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
# The generated directories, relative to the repository root. buf.gen.yaml strips the main module's path
# from each go_package, so the output tree mirrors the repository.
pbdirs=(railsapi/pb tunnel/grpctunnel/pb gitaly/pb)

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

# Every generated file must land in one of $pbdirs: a go_package elsewhere would otherwise be dropped
# without a word.
stray=$(cd "$tmp/out" && find . -type f | sed 's|^\./||' | while read -r f; do
  ok=false
  for d in "${pbdirs[@]}"; do case "$f" in "$d"/*) ok=true ;; esac; done
  $ok || echo "$f"
done)
if [ -n "$stray" ]; then
  echo "generate.sh: generated outside ${pbdirs[*]} (check go_package):" >&2
  echo "$stray" >&2
  exit 1
fi

if $check; then
  stale=()
  for d in "${pbdirs[@]}"; do
    mkdir -p "$tmp/out/$d"
    if ! diff -ru -x '*_test.go' "$root/$d" "$tmp/out/$d" >>"$tmp/diff" 2>&1; then
      stale+=("$d")
    fi
  done
  if [ ${#stale[@]} -gt 0 ]; then
    cat "$tmp/diff"
    echo "generate.sh: ${stale[*]} out of date; run \`make proto\` and commit the result" >&2
    exit 1
  fi
  echo "generate.sh: ${pbdirs[*]} up to date"
  exit 0
fi

for d in "${pbdirs[@]}"; do
  mkdir -p "$tmp/out/$d"
  # Carry the hand-written tests over into the new tree, then swap the directory as a whole.
  if [ -d "$root/$d" ]; then
    (cd "$root/$d" && find . -type f -name '*_test.go') | while read -r f; do
      mkdir -p "$(dirname "$tmp/out/$d/$f")"
      cp -p "$root/$d/$f" "$tmp/out/$d/$f"
    done
  fi
  rm -rf "${root:?}/$d"
  mkdir -p "$(dirname "$root/$d")"
  cp -R "$tmp/out/$d" "$root/$d"
  echo "generate.sh: wrote $d"
done
