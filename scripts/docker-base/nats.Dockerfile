# Stand-in for the official NATS image (nats:<version>-alpine), made only where no container registry answers
# (scripts/docker-base/build.sh): Debian's nats-server on the local Debian stand-in, and only when its version is
# the tag's (bookworm ships 2.9.10; the build fails on any other). What docker-compose.cluster.yml relies on from
# the official image: `nats-server` runs with the flags given as the command (the official alpine image prepends
# nats-server to a command that starts with a flag; here it is the entry point), and wget serves the health check
# on the monitoring port. Unlike the official image it runs unprivileged, with /data (the JetStream store) its own.
ARG BASE_IMAGE=debian:12.11-slim
FROM ${BASE_IMAGE}
ARG NATS_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends nats-server wget \
    && rm -rf /var/lib/apt/lists/* \
    && have=$(nats-server --version | sed -n 's/^nats-server: v//p') \
    && if [ "$have" != "${NATS_VERSION}" ]; then \
         echo "Debian's nats-server is ${have:-unknown}, the tag asks for ${NATS_VERSION}" >&2; exit 1; \
       fi \
    && groupadd --system --gid 10002 nats-data \
    && useradd --system --uid 10002 --gid nats-data --no-create-home --shell /usr/sbin/nologin nats-data \
    && mkdir -p /data && chown 10002:10002 /data && chmod 0700 /data
USER 10002:10002
VOLUME ["/data"]
# Clients, cluster routes, monitoring (/healthz, /varz, /jsz).
EXPOSE 4222 6222 8222
ENTRYPOINT ["/usr/sbin/nats-server"]
CMD ["-js", "-sd", "/data", "-m", "8222"]
