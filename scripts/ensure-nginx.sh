#!/usr/bin/env bash
# Makes sure nginx (Debian's package, which has stub_status) can be run: installs it when missing and this user
# can (root with apt-get), otherwise says in one line how to. Prints the path of the nginx binary.
set -euo pipefail

find_nginx() {
  command -v nginx 2>/dev/null && return 0
  for p in /usr/sbin/nginx /usr/local/sbin/nginx; do
    if [ -x "$p" ]; then echo "$p"; return 0; fi
  done
  return 1
}

if bin=$(find_nginx); then
  echo "$bin"
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "nginx is missing: installing Debian's nginx package with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends nginx >&2
  # The package may start a system nginx on port 80; ours runs from a private prefix, so stop that one.
  if command -v service >/dev/null; then service nginx stop >/dev/null 2>&1 || true; fi
  find_nginx && exit 0
fi
echo "nginx is missing: install it with 'sudo apt-get install nginx' (or set NGINX_BIN)" >&2
exit 1
