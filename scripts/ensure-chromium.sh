#!/usr/bin/env bash
# Makes sure the console's browser test can run (crates/fanout/tests/console.rs): Debian's chromium and
# chromedriver. Installs both when one is missing and this user can (root with apt-get), otherwise says in one
# line how to; the test itself then fails with the same line, it never skips. Prints the two paths.
set -euo pipefail

have() { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }

if ! have && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "chromium or chromedriver is missing: installing Debian's chromium and chromium-driver with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq chromium chromium-driver >&2
fi
if have; then
  echo "$(command -v chromium) $(command -v chromedriver)"
  exit 0
fi
echo "chromium and chromedriver are missing: install them with 'sudo apt-get install chromium chromium-driver'" >&2
exit 1
