# The two commands a newcomer types: `make demo` and `make test`. Both install what they
# need first (scripts/deps.sh), so a fresh Debian machine needs nothing else but Rust.
# The demo and the end-to-end tests create network namespaces and TUN devices: run as root.

CARGO ?= cargo
CARGO_FLAGS ?=
export KEEP

.PHONY: all build deps demo test lint unit e2e fmt clean-lab bench bench-scale

all: build

deps:
	@scripts/deps.sh --k8s

build:
	$(CARGO) build $(CARGO_FLAGS) --workspace --bins

demo: deps build
	$(CARGO) run $(CARGO_FLAGS) -q -p wiremesh-lab --bin wiremesh-demo

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy $(CARGO_FLAGS) --workspace --all-targets -- -D warnings
	@# The protocol core does no I/O: no async runtime, sockets or netlink in it.
	@! grep -rnE '^[^/]*\b(tokio|rtnetlink|netlink_packet_route|UdpSocket|std::fs)\b' agent/src/core \
		|| (echo "agent/src/core must not do I/O" >&2; exit 1)

unit:
	$(CARGO) test $(CARGO_FLAGS) --workspace --lib --bins

# End-to-end tests: real agents in network namespaces (root).
e2e: deps build
	$(CARGO) test $(CARGO_FLAGS) -p wiremesh-lab --tests -- --test-threads=2

test: deps lint build
	$(CARGO) test $(CARGO_FLAGS) --workspace -- --test-threads=1

# Benchmarks (root; see bench/README.md). `bench` installs the peers (bench/install.sh),
# runs the criterion micro-benchmarks, then compares Wiremesh with veth, wireguard-go and
# boringtun-cli: a table, bench/results/latest.json and latest.png. `bench-scale` measures
# the agent with 1,000 and 10,000 peers: bench/results/scale.json. Release builds only.
# They need the Debian packages, not the Kubernetes binaries: scripts/deps.sh without --k8s.
bench:
	@scripts/deps.sh
	@bench/install.sh >/dev/null
	$(CARGO) build --release -p wiremesh-agent -p wiremesh-bench --bins
	$(CARGO) bench -p wiremesh-bench --bench packet_path
	$(CARGO) run --release -q -p wiremesh-bench -- compare

bench-scale:
	@scripts/deps.sh
	$(CARGO) build --release -p wiremesh-agent -p wiremesh-bench --bins
	$(CARGO) run --release -q -p wiremesh-bench -- scale
