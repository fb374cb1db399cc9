# The two commands a newcomer types: `make demo` and `make test`. Both install what they
# need first (scripts/deps.sh), so a fresh Debian machine needs nothing else but Rust.
# The demo and the end-to-end tests create network namespaces and TUN devices: run as root.

CARGO ?= cargo
CARGO_FLAGS ?=
export KEEP

.PHONY: all build deps demo test lint unit e2e fmt clean-lab

all: build

deps:
	@scripts/deps.sh

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
	$(CARGO) test $(CARGO_FLAGS) --workspace -- --test-threads=2
