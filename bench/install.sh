#!/usr/bin/env bash
# Installs, idempotently, the peers `make bench` compares with, beyond the Debian packages
# of scripts/deps.sh (wireguard-go, wireguard-tools, iperf3), into target/bench-tools/bin:
#   boringtun-cli        `cargo install boringtun-cli --version $BORINGTUN_VERSION --locked`
#   wireguard-go-latest  the newest wireguard-go (golang.zx2c4.com/wireguard), built with
#                        `go build` from the helper module bench/wireguard-go-latest, whose
#                        committed go.mod/go.sum pin it (-mod=readonly)
# A tool is rebuilt only when missing or not at the pinned version; $WIREMESH_BENCH_TOOLS
# moves the directory. Progress goes to stderr; the only stdout line is the bin directory.
#
# To move wireguard-go-latest to a newer commit:
#   cd bench/wireguard-go-latest && GOTOOLCHAIN=local go get -tool golang.zx2c4.com/wireguard@latest
# and commit go.mod and go.sum.
set -euo pipefail

BORINGTUN_VERSION=0.7.1
WG_GO_MODULE=golang.zx2c4.com/wireguard

log() { printf '[bench-install] %s\n' "$*" >&2; }
die() { printf '[bench-install] ERROR: %s\n' "$*" >&2; exit 1; }

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
TOOLS="${WIREMESH_BENCH_TOOLS:-$REPO_ROOT/target/bench-tools}"
BIN="$TOOLS/bin"
WG_GO_HELPER="$SCRIPT_DIR/wireguard-go-latest"
mkdir -p "$BIN"

# Serialise concurrent runs that share the directory.
exec 9>"$TOOLS/.install.lock"
flock 9

install_boringtun() {
  local bin="$BIN/boringtun-cli" have
  have="$({ timeout 10 "$bin" --version 2>/dev/null || true; } | head -1)"
  if [ "$have" = "boringtun $BORINGTUN_VERSION" ]; then
    log "boringtun-cli $BORINGTUN_VERSION: up to date ($bin)"
    return
  fi
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (rustup) first"
  log "building boringtun-cli $BORINGTUN_VERSION (cargo install; a few minutes on 2 cores) ..."
  nice -n 19 cargo install boringtun-cli --version "$BORINGTUN_VERSION" --locked --force \
    --root "$TOOLS" --target-dir "$TOOLS/build" >&2
  have="$({ timeout 10 "$bin" --version 2>/dev/null || true; } | head -1)"
  [ "$have" = "boringtun $BORINGTUN_VERSION" ] || die "built $bin but it reports '$have'"
}

find_go() {
  if command -v go >/dev/null 2>&1; then
    command -v go
  elif [ -x /usr/local/go/bin/go ]; then
    echo /usr/local/go/bin/go
  else
    die "'go' not found (PATH or /usr/local/go/bin): install Go >= 1.24 to build wireguard-go-latest"
  fi
}

install_wireguard_go_latest() {
  local bin="$BIN/wireguard-go-latest" stamp="$BIN/wireguard-go-latest.version" go version tmp
  # The pin: the version go.mod requires (a pseudo-version; the module has no tags).
  version="$(awk -v m="$WG_GO_MODULE" '$1 == m { print $2 } $1 == "require" && $2 == m { print $3 }' "$WG_GO_HELPER/go.mod")"
  [ -n "$version" ] || die "$WG_GO_HELPER/go.mod does not require $WG_GO_MODULE"
  if [ -x "$bin" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version" ]; then
    log "wireguard-go-latest $version: up to date ($bin)"
    return
  fi
  go="$(find_go)"
  # Deterministic Go environment: never download a toolchain, static binary, no
  # workspace files from parent directories, and ignore the caller's GOFLAGS.
  export GOTOOLCHAIN=local CGO_ENABLED=0 GOWORK=off GOFLAGS=
  case "$("$go" env GOVERSION)" in
    go1.2[4-9]* | go1.[3-9][0-9]*) ;;
    *) die "found $("$go" env GOVERSION) at $go; the helper module's tool directive needs Go >= 1.24" ;;
  esac
  log "building wireguard-go $version with $("$go" env GOVERSION) ..."
  tmp="$bin.tmp.$$"
  if ! (cd "$WG_GO_HELPER" && nice -n 19 "$go" build -mod=readonly -trimpath -buildvcs=false \
        -ldflags "-s -w" -o "$tmp" "$WG_GO_MODULE"); then
    rm -f "$tmp"
    die "go build of $WG_GO_MODULE@$version failed (module $WG_GO_HELPER)"
  fi
  mv -f "$tmp" "$bin"
  printf '%s\n' "$version" >"$stamp"
  log "wireguard-go-latest: $("$bin" --version | head -1) ($version)"
}

install_boringtun
install_wireguard_go_latest
printf '%s\n' "$BIN"
