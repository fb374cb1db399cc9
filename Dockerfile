# syntax=docker/dockerfile:1
# The Wiremesh image: wiremesh-agent, wiremesh-controller and meshctl on distroless.
#   make image                      # docker or podman; IMAGE=registry/wiremesh:tag
# No engine runs in CI here: `make image-oci` (scripts/oci-image.sh) writes the same
# layout as an OCI archive, which the lab's real kubelets run (tests/tests/node.rs);
# tests/tests/image.rs checks both layouts the same way.

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cargo's registry and the target directory are cached between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked -p wiremesh-agent -p wiremesh-controller --bins \
 && mkdir -p /out \
 && cp target/release/wiremesh-agent target/release/wiremesh-controller target/release/meshctl /out/

# glibc, CA certificates and nothing else; no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
# The controller and meshctl run as this user; the agent's DaemonSet runs it as root
# with NET_ADMIN only (it creates a TUN device and routes, and owns its hostPath key dir).
USER 65532:65532
LABEL org.opencontainers.image.title="wiremesh" \
      org.opencontainers.image.description="Wiremesh: WireGuard mesh for Kubernetes clusters and hosts" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT []
CMD ["/usr/local/bin/wiremesh-agent", "--help"]
