# Stand-in for locustio/locust, made only where no container registry answers (scripts/docker-base/build.sh):
# the pinned Locust from PyPI in a virtual environment on the local Debian stand-in, `locust` as the entry point
# and an unprivileged user, as in the official image.
ARG BASE_IMAGE=debian:12.11-slim
FROM ${BASE_IMAGE}
ARG LOCUST_VERSION
# pip verifies TLS against the system's CA bundle (which holds this machine's extra CAs), not its own copy.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/locust \
    && /opt/locust/bin/pip install "locust==${LOCUST_VERSION}" \
    && useradd --create-home --uid 1000 locust
ENV PATH=/opt/locust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
USER 1000:1000
WORKDIR /home/locust
EXPOSE 8089 5557
ENTRYPOINT ["locust"]
