# Stand-in for the Rust build image (rust:<version>-slim-bookworm), made only where no container registry answers
# (scripts/docker-base/build.sh): the local Debian stand-in, the C toolchain the official image carries for linking,
# and this machine's own Rust toolchain (the build context: its bin/ and lib/, no docs). Same layout of environment
# as the official image: CARGO_HOME=/usr/local/cargo, `cargo install` puts binaries on PATH.
ARG BASE_IMAGE=debian:12.11-slim
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY toolchain/ /usr/local/rust/
ENV CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN mkdir -p /usr/local/cargo/bin && rustc --version && cargo --version
