# Images of the fan-out stack, one target per binary:
#   docker build --target fanout -t fanout-stack/fanout:local .
#   docker build --target demo-backend -t fanout-stack/demo-backend:local .
# Stages: cargo-chef plans and builds the dependency layer once (cached until Cargo.toml/Cargo.lock change), then
# the workspace is built in release mode; each runtime image holds one binary, curl for its health check, and
# runs as an unprivileged user.

ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:12.11-slim

FROM ${RUST_IMAGE} AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --workspace --recipe-path recipe.json
COPY . .
# The release profile keeps line tables (for profiling, BENCHMARKS.md); the images drop all debug information and
# keep the symbols, so a backtrace still names its functions (fanout's binary: 42 MB -> 8 MB).
RUN cargo build --release --locked --workspace --bins \
    && install -m 0755 target/release/fanout target/release/demo-backend /usr/local/bin/ \
    && strip --strip-debug /usr/local/bin/fanout /usr/local/bin/demo-backend

FROM ${RUNTIME_IMAGE} AS runtime
# curl serves the HEALTHCHECKs. Debian's security archive keeps one version per release, so pinning it would
# break the build at the next security update: the base image tag is what pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app \
    && mkdir -p /data /secrets && chown 10001:10001 /data /secrets && chmod 0700 /data /secrets
USER 10001:10001

FROM runtime AS fanout
COPY --from=builder /usr/local/bin/fanout /usr/local/bin/fanout
# The durable outbox lives in /data (made in the runtime stage, owned by the unprivileged user; a volume in
# docker-compose.yml).
VOLUME ["/data"]
ENV LISTEN_ADDR=0.0.0.0:8080 \
    METRICS_PORT=8000 \
    DATA_DIR=/data
EXPOSE 8080 8000
# On the admin port: a flood of the API port (at --max-connections) must not make the container unhealthy.
HEALTHCHECK --interval=5s --timeout=2s --start-period=5s --retries=3 \
    CMD ["sh", "-c", "curl -fsS \"http://127.0.0.1:${METRICS_PORT}/healthz\" || exit 1"]
ENTRYPOINT ["/usr/local/bin/fanout"]

FROM runtime AS demo-backend
COPY --from=builder /usr/local/bin/demo-backend /usr/local/bin/demo-backend
ENV SERVER_PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=5s --timeout=2s --start-period=5s --retries=3 \
    CMD ["sh", "-c", "curl -fsS \"http://127.0.0.1:${SERVER_PORT}/healthz\" || exit 1"]
ENTRYPOINT ["/usr/local/bin/demo-backend"]
