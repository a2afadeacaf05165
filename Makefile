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

# Regenerate railsapi/pb, tunnel/grpctunnel/pb and gitaly/pb from the protos in railsapi/proto with the
# pinned buf and plugins (hack/protoc), or check that the committed code matches what they generate.
.PHONY: proto proto-check
proto:
	bash hack/protoc/generate.sh

proto-check:
	bash hack/protoc/generate.sh --check

# Benchmarks on loopback: caddy-kas next to a direct connection to the same upstream, 10,000 idle agents
# on one Caddy, a stalled reader (about 5 minutes); writes the results into docs/benchmarks.md.
.PHONY: bench
bench:
	go run ./bench/cmd/kasbench -write docs/benchmarks.md
