# Shared by tests/k8s/build.sh and build-helm.sh (sourced, not run): logging, the
# deterministic Go environment, the cache lock, helper-module checks and `go build`.
# The sourcing script sets LOG_TAG (e.g. k8s-build) and NEEDS (what needs Go >= 1.26)
# before sourcing, and BIN_ROOT before calling take_build_lock.

log() { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$LOG_TAG" "$*" >&2; exit 1; }
fmt_secs() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

command -v go >/dev/null 2>&1 || die "'go' not found in PATH. Install Go >= 1.26 (the machine's /usr/local/go/bin/go) or add it to PATH; nothing is downloaded by this script."

# Deterministic Go environment: never download a toolchain, static binaries,
# no workspace files from parent directories, and ignore the caller's GOFLAGS.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOWORK=off GOFLAGS=
GO_VERSION="$(go env GOVERSION)"
case "$GO_VERSION" in
  go1.2[6-9]* | go1.[3-9][0-9]*) ;;
  *) die "found $GO_VERSION at $(command -v go); $NEEDS needs Go >= 1.26.0 (GOTOOLCHAIN=local, no download)" ;;
esac

# Serialise with the other build script and every run sharing this cache directory
# (one big Go build at a time on a small machine).
take_build_lock() {
  mkdir -p "$BIN_ROOT"
  exec 9>"$BIN_ROOT/.build.lock"
  if ! flock -n 9; then
    log "another build holds $BIN_ROOT/.build.lock; waiting"
    flock 9
  fi
}

# go.mod requires MODULE at exactly VERSION, and go.sum exists.
helper_pinned() { # DIR MODULE VERSION
  [ -f "$1/go.mod" ] && [ -f "$1/go.sum" ] &&
    grep -Eq "^[[:space:]]*(require[[:space:]]+)?${2//./\\.}[[:space:]]+${3//./\\.}([[:space:]]|$)" "$1/go.mod"
}

# Path of the cached upstream go.mod of MODULE@VERSION (fetches only the .mod).
upstream_gomod() {
  local f
  f="$(go list -m -json "$1@$2" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  [ -n "$f" ] && [ -f "$f" ] || die "could not fetch go.mod of $1@$2 from $(go env GOPROXY)"
  printf '%s\n' "$f"
}

# go_build MODULE_DIR PACKAGE OUTPUT LDFLAGS
go_build() {
  local tmp="$3.tmp.$$"
  rm -f "$tmp"
  if ! (cd "$1" && go build -mod=readonly -trimpath -buildvcs=false -ldflags "$4" -o "$tmp" "$2"); then
    rm -f "$tmp"
    die "go build of $2 failed (module $1). If go.sum is missing entries, delete $1/go.mod and rerun to regenerate it."
  fi
  mv -f "$tmp" "$3"
}
