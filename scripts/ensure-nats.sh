#!/usr/bin/env bash
# Makes sure the NATS store's tests can run (crates/fanout/tests/cluster.rs) and `make run-cluster` can start:
# Debian's nats-server (2.9.10, with JetStream). Installs it when missing and this user can (root with apt-get),
# otherwise says in one line how to; the tests then fail with the same line, they never skip. Prints its path.
set -euo pipefail

if ! command -v nats-server >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "nats-server is missing: installing Debian's nats-server with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq nats-server >&2
fi
if command -v nats-server >/dev/null; then
  command -v nats-server
  exit 0
fi
echo "nats-server is missing: install it with 'sudo apt-get install nats-server'" >&2
exit 1
