# The two commands a newcomer needs: `make run` starts a development server, `make test` runs every test.

.PHONY: test build run

# go vet, then every test with the race detector, the end-to-end tests against a real kube-apiserver
# included (built on the first run, about 5 minutes).
test:
	bash hack/test.sh

# bin/caddy (Caddy with the kas modules) and bin/agentk.
build:
	go build -trimpath -o bin/ ./cmd/caddy ./cmd/agentk

run:
	go run ./cmd/caddy kas-dev

# The agentk container image for linux/amd64 and linux/arm64 in one OCI image index, built from the
# commit checked out (uncommitted changes are left out) without a container daemon or a base image,
# the same bytes on every build of a commit: bin/agentk-oci/ is an OCI image layout (a directory),
# bin/agentk-oci.tar the same layout as one tar file (an OCI archive). See "agentk container image"
# in the README for what is in it and how to push or load it.
.PHONY: image
image:
	go run ./hack/agentk-image -layout bin/agentk-oci -archive bin/agentk-oci.tar

# Regenerate railsapi/pb, tunnel/grpctunnel/pb and gitaly/pb from the protos in railsapi/proto with the
# pinned buf and plugins (hack/protoc), or check that the committed code matches what they generate.
.PHONY: proto proto-check
proto:
	bash hack/protoc/generate.sh

proto-check:
	bash hack/protoc/generate.sh --check

# Benchmarks on loopback: caddy-kas next to a direct connection to the same upstream, 10,000 idle agents
# on one Caddy, a stalled reader, two nodes sharing a redis-server (about 6 minutes); writes the results into
# docs/benchmarks.md.
.PHONY: bench
bench:
	go run ./bench/cmd/kasbench -write docs/benchmarks.md
