#!/usr/bin/env bash
# Installs, idempotently, what the demo and the tests need on a fresh Debian machine:
# the Debian packages (interop peers, iperf3, iproute2, nftables) and, when asked with
# --k8s, Debian's prometheus (with promtool), the Go-built control-plane binaries
# (kube-apiserver, etcd, and for the lab's real Services kube-proxy,
# kube-controller-manager and CoreDNS), helm, and for the lab's real node
# (tests/tests/node.rs) Debian's containerd, runc and CNI plugins with the kubelet,
# kube-scheduler and pause image built by tests/k8s/build.sh --node.
# Needs root for apt-get; prints what it does.
set -euo pipefail

need_pkgs=()
check() {  # check PACKAGE COMMAND: queue PACKAGE when COMMAND is missing
    command -v "$2" >/dev/null 2>&1 || need_pkgs+=("$1")
}
check wireguard-go wireguard-go
check wireguard-tools wg
check iperf3 iperf3
check iproute2 ip
check nftables nft
check util-linux nsenter
check jq jq
check iputils-ping ping
check binutils objcopy
# The Prometheus test (tests/tests/metrics.rs) and the alert rules' tests
# (tests/tests/alerts.rs) run Debian's prometheus and promtool.
if [ "${1:-}" = "--k8s" ]; then
    check prometheus promtool
    check containerd containerd
    check runc runc
    [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] ||
        need_pkgs+=(containernetworking-plugins)
fi

if [ "${#need_pkgs[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "deps: missing ${need_pkgs[*]}; run as root to install them" >&2
        exit 1
    fi
    echo "deps: installing ${need_pkgs[*]} from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # iperf3 asks whether to start a daemon; say no.
    echo "iperf3 iperf3/start_daemon boolean false" | debconf-set-selections 2>/dev/null || true
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    # The package starts a Prometheus on every address (:9090) where an init system runs;
    # the tests start their own inside a lab namespace, so stop and disable that one.
    # Likewise containerd's own service: the lab's nodes run containerds of their own.
    if command -v systemctl >/dev/null 2>&1; then
        for unit in prometheus containerd; do
            if [[ " ${need_pkgs[*]} " == *" $unit "* ]]; then
                systemctl disable --now "$unit" >/dev/null 2>&1 || true
            fi
        done
    fi
else
    echo "deps: Debian packages present"
fi

if [ ! -c /dev/net/tun ]; then
    echo "deps: /dev/net/tun is missing: load the tun module (modprobe tun)" >&2
    exit 1
fi

if [ "${1:-}" = "--k8s" ]; then
    if [ -x tests/k8s/build.sh ]; then
        tests/k8s/build.sh --services --node
    fi
    if [ -x tests/k8s/build-coredns.sh ]; then
        tests/k8s/build-coredns.sh
    fi
    if [ -x tests/k8s/build-helm.sh ]; then
        tests/k8s/build-helm.sh
    fi
fi
