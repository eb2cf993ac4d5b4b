#!/bin/sh
# Entry point of the nginx stand-in image (scripts/docker-base/nginx.Dockerfile): sources every executable
# /docker-entrypoint.d/*.envsh in version order (as the official image does before rendering; docker-compose.yml
# mounts nginx/upstreams.envsh there), renders every /etc/nginx/templates/*.template into
# /etc/nginx/conf.d/<name without .template> with envsubst, replacing only the variables that are set in the
# environment (so nginx's own $host, $request_id ... are left alone), then runs the command (nginx in the
# foreground by default).
set -eu
if [ -d /docker-entrypoint.d ]; then
  for f in $(find /docker-entrypoint.d/ -follow -type f -name '*.envsh' -print | sort -V); do
    if [ -x "$f" ]; then
      echo "nginx-entrypoint: sourcing $f"
      . "$f"
    else
      echo "nginx-entrypoint: ignoring $f, not executable"
    fi
  done
fi
templates=${NGINX_ENVSUBST_TEMPLATE_DIR:-/etc/nginx/templates}
out=${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}
if [ -d "$templates" ]; then
  # "${A} ${B} ...": the names of the variables set in this environment.
  defined=$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/${\1}/p' | tr '\n' ' ')
  for t in "$templates"/*.template; do
    [ -f "$t" ] || continue
    name=$(basename "$t" .template)
    envsubst "$defined" <"$t" >"$out/$name"
    echo "nginx-entrypoint: rendered $t into $out/$name"
  done
fi
exec "$@"
