#!/usr/bin/env bash
# Start/stop a throwaway Kubernetes control plane (etcd + kube-apiserver) on
# loopback for Wiremesh tests. No kubelet, scheduler or controller-manager.
#
#   controlplane.sh start NAME DIR   start a plane; stdout: path of DIR/kubeconfig
#   controlplane.sh stop DIR [--purge]
#                                    stop it (own PIDs only), delete etcd data,
#                                    PKI and kubeconfig; logs stay unless --purge
#   controlplane.sh status DIR       exit 0 if both processes run and /readyz is ok
#   controlplane.sh pause DIR        stop only kube-apiserver (an outage); etcd,
#                                    PKI, data and ports stay
#   controlplane.sh resume DIR       start kube-apiserver again with the identical
#                                    command line; wait for /readyz
#
# After `start`, DIR holds:
#   kubeconfig     admin kubeconfig (client cert, group system:masters), 0600
#   plane.env      shell-sourceable: ports, URLs, PIDs, paths
#   etcd.pid apiserver.pid   PIDs ("PID STARTTIME", checked before any kill)
#   apiserver.args kube-apiserver's command line (NUL-separated), for resume
#   pki/           per-plane CA, serving cert, admin cert, service-account key
#   etcd/          etcd data dir
#   etcd.log apiserver.log
#
# Everything listens on 127.0.0.1 only, on free ports chosen at start-up.
# Several planes may run at once (distinct DIRs); each gets its own CA.
#
# Environment:
#   WIREMESH_K8S_BIN_DIR      directory with kube-apiserver and etcd
#                             (default: the output of tests/k8s/build.sh,
#                             which builds them if missing)
#   WIREMESH_K8S_START_TIMEOUT  seconds to wait for /readyz (default 120)
#   WIREMESH_K8S_STOP_TIMEOUT   seconds per process before SIGKILL (default 20)
#   WIREMESH_K8S_AUTHZ_MODE     --authorization-mode (default Node,RBAC)
#   WIREMESH_K8S_ADVERTISE_ADDRESS  --advertise-address (only needed where the
#                             network namespace has no default route; the
#                             address is only stored in the default/kubernetes
#                             Endpoints, no traffic is sent to it)
#   WIREMESH_K8S_SERVICE_ACCOUNTS=1  keep the ServiceAccount admission plugin
#                             (pods get their projected token volume, as a
#                             kubelet needs); off by default: the lab's Pod objects
#                             run on no kubelet and name no ServiceAccount
#   WIREMESH_K8S_EXTRA_SANS   more subjectAltName entries for the serving
#                             certificate, e.g. IP:198.18.250.1
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
START_TIMEOUT="${WIREMESH_K8S_START_TIMEOUT:-120}"
STOP_TIMEOUT="${WIREMESH_K8S_STOP_TIMEOUT:-20}"
AUTHZ_MODE="${WIREMESH_K8S_AUTHZ_MODE:-Node,RBAC}"
HOST=127.0.0.1

log() { printf '[controlplane] %s\n' "$*" >&2; }
die() { printf '[controlplane] ERROR: %s\n' "$*" >&2; exit 1; }
usage() {
  sed -n '5,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# Never let a proxy setting route loopback traffic elsewhere.
unset HTTP_PROXY HTTPS_PROXY http_proxy https_proxy ALL_PROXY all_proxy
export NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost"

for tool in openssl curl base64 setsid; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found in PATH"
done

# ---------------------------------------------------------------- PIDs ----
# A PID file holds "PID STARTTIME" (field 22 of /proc/PID/stat), so a recycled
# PID is never signalled.
proc_starttime() { # PID -> start time in clock ticks since boot
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"            # drop "pid (comm) " (comm may contain spaces)
  awk '{print $20}' <<<"$stat"   # field 22 overall = field 20 after comm
}

# pidfile_alive FILE -> prints PID and returns 0 if that very process lives
pidfile_alive() {
  local pid st now
  [ -s "$1" ] || return 1
  read -r pid st <"$1" || true
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  now="$(proc_starttime "$pid")" || return 1
  [ -z "${st:-}" ] || [ "$now" = "$st" ] || return 1
  # a zombie counts as dead
  [ "$(awk '/^State:/{print $2}' "/proc/$pid/status" 2>/dev/null)" != Z ] || return 1
  printf '%s\n' "$pid"
}

# stop_pidfile FILE LABEL: SIGTERM, wait, SIGKILL; only the recorded process.
stop_pidfile() {
  local pid i
  if ! pid="$(pidfile_alive "$1")"; then
    rm -f "$1"
    return 0
  fi
  log "stopping $2 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
    pidfile_alive "$1" >/dev/null || break
    sleep 0.1
  done
  if pidfile_alive "$1" >/dev/null; then
    log "$2 (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      pidfile_alive "$1" >/dev/null || break
      sleep 0.1
    done
  fi
  rm -f "$1"
}

# spawn PIDFILE LOG CMD...: run CMD in its own session, detached from our
# stdin/stdout and from any other inherited descriptor (a caller's pipe must
# not stay open); the PID written is that of CMD itself (bash execs into it),
# with its start time.
# shellcheck disable=SC2016 # expanded by the inner bash
SPAWN_SH='for f in /proc/$$/fd/*; do f=${f##*/}; case $f in 0 | 1 | 2) ;; *) eval "exec $f>&-" 2>/dev/null ;; esac; done
echo "$$ $(awk "{print \$22}" /proc/$$/stat)" >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"'
spawn() {
  local pidfile="$1" logf="$2" i pid
  shift 2
  rm -f "$pidfile" "$pidfile.tmp"
  setsid bash -c "$SPAWN_SH" "$pidfile" "$@" </dev/null >"$logf" 2>&1 &
  for ((i = 0; i < 100; i++)); do
    [ -s "$pidfile" ] && break
    sleep 0.05
  done
  [ -s "$pidfile" ] || die "could not start $1 (no PID file)"
  read -r pid _ <"$pidfile"
  printf '%s\n' "$pid"
}

# ---------------------------------------------------------------- ports ---
port_in_use() {
  if command -v ss >/dev/null 2>&1; then
    [ -n "$(ss -Htan "( sport = :$1 )" 2>/dev/null)" ]
  else
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
  fi
}

# free_port EXCLUDED... -> a port in 20000-32767 (below the ephemeral range)
free_port() {
  local p i
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + RANDOM % 12768))
    [[ " $* " == *" $p "* ]] && continue
    port_in_use "$p" || { printf '%s\n' "$p"; return 0; }
  done
  die "no free loopback port found"
}

# ---------------------------------------------------------------- PKI -----
make_pki() { # DIR NAME
  local p="$1" name="$2"
  mkdir -p "$p"
  (
    cd "$p"
    umask 077
    key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
    key ca.key
    openssl req -x509 -new -key ca.key -subj "/CN=wiremesh-test-ca-$name" -days 3650 \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" -out ca.crt 2>/dev/null
    key apiserver.key
    openssl req -new -key apiserver.key -subj "/CN=kube-apiserver" -out apiserver.csr 2>/dev/null
    printf '%s\n' \
      "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local${WIREMESH_K8S_EXTRA_SANS:+,$WIREMESH_K8S_EXTRA_SANS}" \
      'extendedKeyUsage=serverAuth' 'keyUsage=critical,digitalSignature,keyEncipherment' \
      'basicConstraints=critical,CA:FALSE' >srv.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
      -extfile srv.ext -out apiserver.crt 2>/dev/null
    key admin.key
    openssl req -new -key admin.key -subj "/O=system:masters/CN=wiremesh-admin" -out admin.csr 2>/dev/null
    printf '%s\n' 'extendedKeyUsage=clientAuth' 'keyUsage=critical,digitalSignature,keyEncipherment' \
      'basicConstraints=critical,CA:FALSE' >cli.ext
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
      -extfile cli.ext -out admin.crt 2>/dev/null
    key sa.key # service-account signing key (ES256, PKCS#8)
    # --service-account-key-file does not parse PKCS#8 EC *private* keys
    # ("data does not contain any valid RSA or ECDSA public keys"): pass the public half.
    openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
    rm -f ./*.csr ./*.ext
  ) || die "openssl failed while creating the PKI in $p"
}

write_kubeconfig() { # FILE NAME SERVER PKI
  local f="$1" name="$2" server="$3" p="$4"
  (
    umask 077
    cat >"$f.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $name
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 "$p/ca.crt")
users:
- name: $name-admin
  user:
    client-certificate-data: $(base64 -w0 "$p/admin.crt")
    client-key-data: $(base64 -w0 "$p/admin.key")
contexts:
- name: $name
  context:
    cluster: $name
    user: $name-admin
current-context: $name
EOF
    mv "$f.tmp" "$f"
  )
}

# ---------------------------------------------------------------- start ---
START_DIR=""
START_OK=0
cleanup_failed_start() {
  [ "$START_OK" = 1 ] && return 0
  [ -n "$START_DIR" ] || return 0
  log "start failed; cleaning up $START_DIR"
  stop_pidfile "$START_DIR/apiserver.pid" kube-apiserver
  stop_pidfile "$START_DIR/etcd.pid" etcd
  rm -rf "$START_DIR/etcd" "$START_DIR/pki" "$START_DIR/kubeconfig" "$START_DIR/plane.env" "$START_DIR/apiserver.args"
}

show_log_tail() { # FILE
  [ -s "$1" ] || return 0
  log "---- last lines of $1 ----"
  tail -n 25 "$1" >&2 || true
}

# wait_until TIMEOUT PIDFILE LABEL CHECK...: poll CHECK every 0.5 s while the
# process lives. Returns 0 ready, 1 timeout, 2 process exited.
wait_until() {
  local pidfile="$2" deadline=$((SECONDS + $1))
  shift 3
  while ((SECONDS < deadline)); do
    "$@" && return 0
    pidfile_alive "$pidfile" >/dev/null || return 2
    sleep 0.5
  done
  "$@" && return 0
  return 1
}

etcd_healthy() { curl -sf --noproxy '*' --max-time 2 "http://$HOST:$ETCD_PORT/health" 2>/dev/null | grep -q '"health":"true"'; }
api_ready() {
  curl -sf --noproxy '*' --max-time 3 --cacert "$P/ca.crt" --cert "$P/admin.crt" --key "$P/admin.key" \
    "https://$HOST:$API_PORT/readyz" >/dev/null 2>&1
}

default_route_exists() {
  if command -v ip >/dev/null 2>&1; then
    [ -n "$(ip -4 route show default 2>/dev/null)$(ip -6 route show default 2>/dev/null)" ]
  else
    awk 'NR > 1 && $2 == "00000000" { f = 1 } END { exit !f }' /proc/net/route
  fi
}

# One attempt with fresh ports. Returns 0 ok, 3 port clash (retry), else dies.
start_attempt() {
  local dir="$1" rc
  ETCD_PORT="$(free_port)"
  PEER_PORT="$(free_port "$ETCD_PORT")"
  API_PORT="$(free_port "$ETCD_PORT" "$PEER_PORT")"
  rm -rf "$dir/etcd"
  mkdir -m 700 "$dir/etcd"

  log "starting etcd on $HOST:$ETCD_PORT (peer $PEER_PORT)"
  ETCD_PID="$(spawn "$dir/etcd.pid" "$dir/etcd.log" "$BIN_DIR/etcd" \
    --name="$PLANE_NAME" --data-dir="$dir/etcd" \
    --listen-client-urls="http://$HOST:$ETCD_PORT" --advertise-client-urls="http://$HOST:$ETCD_PORT" \
    --listen-peer-urls="http://$HOST:$PEER_PORT" --initial-advertise-peer-urls="http://$HOST:$PEER_PORT" \
    --initial-cluster="$PLANE_NAME=http://$HOST:$PEER_PORT" --initial-cluster-state=new \
    --unsafe-no-fsync --log-level=warn)"
  rc=0
  wait_until 30 "$dir/etcd.pid" etcd etcd_healthy || rc=$?
  if [ "$rc" != 0 ]; then
    if grep -q 'address already in use' "$dir/etcd.log" 2>/dev/null; then
      stop_pidfile "$dir/etcd.pid" etcd
      return 3
    fi
    show_log_tail "$dir/etcd.log"
    die "etcd did not become healthy (rc $rc: 1=timeout 30s, 2=exited)"
  fi

  local extra=()
  if [ -n "${WIREMESH_K8S_ADVERTISE_ADDRESS:-}" ]; then
    extra+=(--advertise-address="$WIREMESH_K8S_ADVERTISE_ADDRESS")
  elif ! default_route_exists; then
    die "this network namespace has no default route, so kube-apiserver cannot pick an advertise address; set WIREMESH_K8S_ADVERTISE_ADDRESS to a non-loopback address of this namespace (it is only stored in the default/kubernetes Endpoints)"
  fi

  local admission=(--disable-admission-plugins=ServiceAccount)
  if [ "${WIREMESH_K8S_SERVICE_ACCOUNTS:-}" = 1 ]; then
    admission=(--enable-admission-plugins=NodeRestriction)
  fi

  log "starting kube-apiserver on https://$HOST:$API_PORT (authorization $AUTHZ_MODE)"
  local args=("$BIN_DIR/kube-apiserver"
    --etcd-servers="http://$HOST:$ETCD_PORT"
    --secure-port="$API_PORT" --bind-address="$HOST"
    --cert-dir="$P" --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key"
    --client-ca-file="$P/ca.crt"
    --service-account-issuer=https://kubernetes.default.svc.cluster.local
    --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key"
    --service-cluster-ip-range=10.0.0.0/24
    --authorization-mode="$AUTHZ_MODE"
    "${admission[@]}"
    --allow-privileged=true
    --profiling=false
    --shutdown-watch-termination-grace-period=2s
    "${extra[@]}")
  # `resume` starts the very same command again (same ports, certificates, flags).
  (umask 077 && printf '%s\0' "${args[@]}" >"$dir/apiserver.args")
  APISERVER_PID="$(spawn "$dir/apiserver.pid" "$dir/apiserver.log" "${args[@]}")"
  rc=0
  wait_until "$START_TIMEOUT" "$dir/apiserver.pid" kube-apiserver api_ready || rc=$?
  if [ "$rc" != 0 ]; then
    if grep -q 'address already in use' "$dir/apiserver.log" 2>/dev/null; then
      stop_pidfile "$dir/apiserver.pid" kube-apiserver
      stop_pidfile "$dir/etcd.pid" etcd
      return 3
    fi
    show_log_tail "$dir/apiserver.log"
    die "kube-apiserver did not become ready (rc $rc: 1=timeout ${START_TIMEOUT}s, 2=exited)"
  fi
  return 0
}

cmd_start() {
  local name="$1" dir="$2" t0=$SECONDS attempt rc
  PLANE_NAME="$name"
  [[ "$name" =~ ^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$ ]] || die "NAME must be a short DNS label ([a-z0-9-]), got '$name'"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if pidfile_alive "$dir/etcd.pid" >/dev/null || pidfile_alive "$dir/apiserver.pid" >/dev/null; then
    die "a control plane is already running in $dir (run: $0 stop $dir)"
  fi
  if [ -n "${WIREMESH_K8S_BIN_DIR:-}" ]; then
    BIN_DIR="$WIREMESH_K8S_BIN_DIR"
  else
    BIN_DIR="$("$SCRIPT_DIR/build.sh")" || die "tests/k8s/build.sh failed"
  fi
  [ -x "$BIN_DIR/etcd" ] && [ -x "$BIN_DIR/kube-apiserver" ] || die "no etcd/kube-apiserver in $BIN_DIR"

  : >"$dir/.wiremesh-controlplane"
  START_DIR="$dir"
  trap cleanup_failed_start EXIT
  trap 'exit 130' INT TERM

  P="$dir/pki"
  rm -rf "$P" "$dir/kubeconfig" "$dir/plane.env"
  log "creating PKI in $P"
  make_pki "$P" "$name"

  for attempt in 1 2 3; do
    rc=0
    start_attempt "$dir" || rc=$?
    [ "$rc" = 0 ] && break
    [ "$rc" = 3 ] && [ "$attempt" -lt 3 ] && { log "port clash; retrying with other ports"; continue; }
    die "could not start the control plane (ports kept clashing)"
  done

  write_kubeconfig "$dir/kubeconfig" "$name" "https://$HOST:$API_PORT" "$P"
  (
    umask 077
    cat >"$dir/plane.env" <<EOF
WIREMESH_K8S_NAME=$name
WIREMESH_K8S_DIR=$dir
WIREMESH_K8S_KUBECONFIG=$dir/kubeconfig
WIREMESH_K8S_SERVER=https://$HOST:$API_PORT
WIREMESH_K8S_API_PORT=$API_PORT
WIREMESH_K8S_ETCD_URL=http://$HOST:$ETCD_PORT
WIREMESH_K8S_ETCD_PORT=$ETCD_PORT
WIREMESH_K8S_ETCD_PEER_PORT=$PEER_PORT
WIREMESH_K8S_APISERVER_PID=$APISERVER_PID
WIREMESH_K8S_ETCD_PID=$ETCD_PID
WIREMESH_K8S_CA=$P/ca.crt
WIREMESH_K8S_ADMIN_CERT=$P/admin.crt
WIREMESH_K8S_ADMIN_KEY=$P/admin.key
EOF
  )
  START_OK=1
  log "plane '$name' ready in $((SECONDS - t0))s: https://$HOST:$API_PORT (apiserver pid $APISERVER_PID, etcd pid $ETCD_PID)"
  printf '%s\n' "$dir/kubeconfig"
}

# ---------------------------------------------------------------- stop ----
cmd_stop() {
  local dir="$1" purge="${2:-}"
  [ -d "$dir" ] || { log "$dir does not exist; nothing to stop"; return 0; }
  dir="$(cd "$dir" && pwd)"
  [ -e "$dir/.wiremesh-controlplane" ] || die "$dir was not made by '$0 start'; not touching it"
  stop_pidfile "$dir/apiserver.pid" kube-apiserver
  stop_pidfile "$dir/etcd.pid" etcd
  rm -rf "$dir/etcd" "$dir/pki" "$dir/kubeconfig" "$dir/plane.env" "$dir/apiserver.args"
  if [ "$purge" = --purge ]; then
    rm -rf "$dir"
    log "stopped; removed $dir"
  else
    log "stopped; data removed, logs kept in $dir"
  fi
}

cmd_status() {
  local dir="$1"
  pidfile_alive "$dir/etcd.pid" >/dev/null || { log "etcd not running"; return 1; }
  pidfile_alive "$dir/apiserver.pid" >/dev/null || { log "kube-apiserver not running"; return 1; }
  # shellcheck disable=SC1091
  . "$dir/plane.env"
  P="$dir/pki" API_PORT="$WIREMESH_K8S_API_PORT"
  api_ready || { log "kube-apiserver /readyz failed"; return 1; }
  log "running: $WIREMESH_K8S_SERVER"
}

# ---------------------------------------------------------------- outage --
# An API server outage for fail-static tests: `pause` stops only kube-apiserver
# (etcd, PKI, data and ports stay); `resume` starts the identical command again.
plane_dir() { # DIR -> absolute DIR of a running plane (etcd alive), or die
  local dir="$1"
  [ -d "$dir" ] || die "$dir does not exist"
  dir="$(cd "$dir" && pwd)"
  [ -e "$dir/.wiremesh-controlplane" ] || die "$dir was not made by '$0 start'; not touching it"
  [ -s "$dir/plane.env" ] && [ -s "$dir/apiserver.args" ] || die "$dir holds no started plane (no plane.env/apiserver.args)"
  pidfile_alive "$dir/etcd.pid" >/dev/null || die "etcd of $dir is not running"
  printf '%s\n' "$dir"
}

cmd_pause() {
  local dir
  dir="$(plane_dir "$1")"
  if ! pidfile_alive "$dir/apiserver.pid" >/dev/null; then
    log "kube-apiserver of $dir is not running; already paused"
    return 0
  fi
  stop_pidfile "$dir/apiserver.pid" kube-apiserver
  log "paused: kube-apiserver of $dir stopped (etcd keeps running)"
}

cmd_resume() {
  local dir args=() rc=0 pid
  dir="$(plane_dir "$1")"
  # shellcheck disable=SC1091
  . "$dir/plane.env"
  P="$dir/pki" API_PORT="$WIREMESH_K8S_API_PORT"
  if pidfile_alive "$dir/apiserver.pid" >/dev/null; then
    log "kube-apiserver of $dir is already running"
  else
    mapfile -d '' args <"$dir/apiserver.args"
    [ "${#args[@]}" -gt 0 ] || die "$dir/apiserver.args is empty"
    log "resuming kube-apiserver on $WIREMESH_K8S_SERVER"
    # the log of the previous run stays readable as apiserver.log.1
    cp -f "$dir/apiserver.log" "$dir/apiserver.log.1" 2>/dev/null || true
    pid="$(spawn "$dir/apiserver.pid" "$dir/apiserver.log" "${args[@]}")"
    sed -i "s/^WIREMESH_K8S_APISERVER_PID=.*/WIREMESH_K8S_APISERVER_PID=$pid/" "$dir/plane.env"
  fi
  wait_until "$START_TIMEOUT" "$dir/apiserver.pid" kube-apiserver api_ready || rc=$?
  if [ "$rc" != 0 ]; then
    show_log_tail "$dir/apiserver.log"
    die "kube-apiserver did not become ready again (rc $rc: 1=timeout ${START_TIMEOUT}s, 2=exited; a port clash means another process took $API_PORT while paused)"
  fi
  log "resumed: $WIREMESH_K8S_SERVER ready"
}

case "${1:-}" in
  start) [ $# -eq 3 ] || usage; cmd_start "$2" "$3" ;;
  pause) [ $# -eq 2 ] || usage; cmd_pause "$2" ;;
  resume) [ $# -eq 2 ] || usage; cmd_resume "$2" ;;
  stop) [ $# -ge 2 ] && [ $# -le 3 ] || usage; cmd_stop "$2" "${3:-}" ;;
  status) [ $# -eq 2 ] || usage; cmd_status "$2" ;;
  *) usage ;;
esac
