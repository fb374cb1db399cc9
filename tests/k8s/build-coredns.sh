#!/usr/bin/env bash
# Build CoreDNS from the Go module proxy for the lab's cross-cluster Services
# (`clusterset.local` from ServiceImports: the kubernetes plugin's `multicluster`
# option, CoreDNS >= 1.12.2). tests/k8s/coredns is a helper module whose main.go
# imports coremain with only the plugins the lab uses (kubernetes, forward, cache,
# errors, log, health, ready), pinned by its committed go.sum (-mod=readonly).
#
#   BIN="$(tests/k8s/build-coredns.sh)"   # stdout is only the binary directory:
#   ${WIREMESH_K8S_BIN:-<repo>/target/k8s-bin}/coredns-<COREDNS_VERSION>/
#
# Idempotent: rebuilt only when missing or its -version differs. About 3 minutes
# cold on 2 cores. To move to another version: change COREDNS_VERSION, then in
# tests/k8s/coredns run `go get github.com/coredns/coredns@VERSION && go mod tidy`
# and commit go.mod and go.sum.
set -euo pipefail

COREDNS_VERSION=v1.15.0  # github.com/coredns/coredns

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
BIN_ROOT="${WIREMESH_K8S_BIN:-$REPO_ROOT/target/k8s-bin}"
OUT="$BIN_ROOT/coredns-$COREDNS_VERSION"
MOD="$SCRIPT_DIR/coredns"

LOG_TAG=coredns-build NEEDS="coredns $COREDNS_VERSION"
# shellcheck source=tests/k8s/lib.sh
. "$SCRIPT_DIR/lib.sh"

version_ok() { # BINARY
  [ -x "$1" ] || return 1
  local v
  # Captured first: `grep -q` exits at the first line, and under pipefail the SIGPIPE
  # of `-version` writing its second line would fail the check.
  v="$(timeout 20 "$1" -version 2>/dev/null)" || return 1
  grep -qxF "CoreDNS-${COREDNS_VERSION#v}" <<<"$v"
}

if version_ok "$OUT/coredns"; then
  log "coredns $COREDNS_VERSION: up to date ($OUT/coredns)"
  printf '%s\n' "$OUT"
  exit 0
fi
helper_pinned "$MOD" github.com/coredns/coredns "$COREDNS_VERSION" ||
  die "$MOD/go.mod does not require github.com/coredns/coredns $COREDNS_VERSION (see the header of this script)"
mkdir -p "$OUT"
take_build_lock
t0=$SECONDS
log "building coredns $COREDNS_VERSION with $GO_VERSION ..."
go_build "$MOD" . "$OUT/coredns" "-s -w"
version_ok "$OUT/coredns" || die "built $OUT/coredns but -version does not report ${COREDNS_VERSION#v}"
log "coredns $COREDNS_VERSION built in $(fmt_secs $((SECONDS - t0))): $OUT/coredns"
printf '%s\n' "$OUT"
