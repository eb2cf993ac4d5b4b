# Stand-in for the official nginx image, made only where no container registry answers (scripts/docker-base/build.sh):
# Debian's nginx (1.22, which has stub_status) on the local Debian stand-in, with what docker-compose.yml relies on
# from the official image: /docker-entrypoint.d/*.envsh sourced, then /etc/nginx/templates/*.template rendered into
# /etc/nginx/conf.d/ at start (only the variables defined in the environment), logs on the container's stdout/stderr, curl for the health check, nginx in
# the foreground and SIGQUIT as the stop signal (graceful shutdown).
ARG BASE_IMAGE=debian:12.11-slim
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx curl gettext-base ca-certificates \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
    && mkdir -p /etc/nginx/templates /docker-entrypoint.d \
    && ln -sf /dev/stdout /var/log/nginx/access.log \
    && ln -sf /dev/stderr /var/log/nginx/error.log
COPY nginx-entrypoint.sh /usr/local/bin/nginx-entrypoint.sh
EXPOSE 80
STOPSIGNAL SIGQUIT
ENTRYPOINT ["/usr/local/bin/nginx-entrypoint.sh"]
CMD ["nginx", "-g", "daemon off;"]
