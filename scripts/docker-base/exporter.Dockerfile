# Stand-in for nginx/nginx-prometheus-exporter, made only where no container registry answers
# (scripts/docker-base/build.sh): Debian's prometheus-nginx-exporter (0.11) on the local Debian stand-in. It takes
# the flags docker-compose.yml passes (--nginx.scrape-uri, --web.listen-address) and exposes the same series
# (nginx_up, nginx_connections_*, nginx_http_requests_total).
ARG BASE_IMAGE=debian:12.11-slim
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus-nginx-exporter \
    && rm -rf /var/lib/apt/lists/*
USER 65534:65534
EXPOSE 9113
ENTRYPOINT ["/usr/bin/prometheus-nginx-exporter"]
