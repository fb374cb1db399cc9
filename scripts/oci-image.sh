#!/usr/bin/env bash
# The Wiremesh image without a registry or a container engine: an OCI image archive
# (`oci-layout`, `index.json`, `blobs/`) written with tar and sha256sum, which
# `ctr images import` loads. The lab's real kubelet runs it (tests/src/kubelet.rs).
#
#   scripts/oci-image.sh BIN_DIR IMAGE_NAME OUT.tar
#   scripts/oci-image.sh target/release ghcr.io/wiremesh/wiremesh:0.1.0 wiremesh.tar
#
# Same layout as the Dockerfile's image (tests/tests/image.rs checks both the same way):
#   /usr/local/bin/{wiremesh-agent,wiremesh-controller,meshctl}, USER 65532:65532,
#   no entrypoint, CMD wiremesh-agent --help.
# It differs in where its base comes from: instead of distroless/cc-debian12 it holds
# only the shared libraries `ldd` names for the three binaries (glibc, libgcc_s, the
# dynamic loader, from this machine's Debian), /etc/passwd and /etc/group with root and
# nonroot (65532), the machine's CA bundle and an empty /tmp; no shell either. Debug
# symbols are stripped from the copies (a debug build's binaries are ~100 MB each).
# One uncompressed layer; deterministic (sorted, owner 0, mtime 0) for the same inputs.
set -euo pipefail

[ $# -eq 3 ] || { sed -n '6,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
bin_dir=$1 name=$2 out=$3
BINARIES="wiremesh-agent wiremesh-controller meshctl"
die() { printf 'oci-image: %s\n' "$*" >&2; exit 1; }
for tool in tar sha256sum ldd objcopy; do
  command -v "$tool" >/dev/null || die "'$tool' not found in PATH"
done
case "$name" in
  *:*) ;;
  *) die "IMAGE_NAME '$name' needs a tag (name:tag)" ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp" "$work/oci/blobs/sha256"
chmod 1777 "$root/tmp"

libs=""
for b in $BINARIES; do
  [ -x "$bin_dir/$b" ] || die "$bin_dir/$b: not found or not executable (build it first)"
  objcopy --strip-debug "$bin_dir/$b" "$root/usr/local/bin/$b"
  chmod 0755 "$root/usr/local/bin/$b"
  # `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and `/lib64/ld-linux-x86-64.so.2 (0x...)`
  libs="$libs $(ldd "$bin_dir/$b" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')"
done
for lib in $(printf '%s\n' $libs | sort -u); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$root/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
fi

tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$root" -cf "$work/layer.tar" .
blob() { # FILE -> "DIGEST SIZE", copied into blobs/sha256
  local d
  d=$(sha256sum "$1" | cut -d' ' -f1)
  cp "$1" "$work/oci/blobs/sha256/$d"
  printf '%s %s\n' "$d" "$(stat -c %s "$1")"
}
read -r layer lsize < <(blob "$work/layer.tar")
printf '{"architecture":"amd64","os":"linux","config":{"User":"65532:65532","Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/usr/local/bin/wiremesh-agent","--help"],"Labels":{"org.opencontainers.image.title":"wiremesh"}},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$layer" >"$work/config.json"
read -r config csize < <(blob "$work/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
  "$config" "$csize" "$layer" "$lsize" >"$work/manifest.json"
read -r manifest msize < <(blob "$work/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest" "$msize" "$name" "${name##*:}" >"$work/oci/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$work/oci/oci-layout"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work/oci" -cf "$out.tmp" oci-layout index.json blobs
mv "$out.tmp" "$out"
printf 'oci-image: %s: %s (manifest sha256:%s, layer %s bytes)\n' "$out" "$name" "$manifest" "$lsize" >&2
