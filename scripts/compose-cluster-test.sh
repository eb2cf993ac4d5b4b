#!/usr/bin/env bash
# The scaled-out Docker stack run for real (`make compose-cluster-test`): docker-compose.cluster.yml up with the
# images built from the Dockerfile, checked from the host, then torn down. Needs fanout with the NATS store
# (`--store`); it stops at once, saying so, on an image without it.
#
#   1. engine, base images, the project's images: as scripts/compose-test.sh (scripts/compose-lib.sh), with the
#      nats image (the official one, or the stand-in from Debian's nats-server where no registry answers);
#   2. `docker compose up -d --wait`: three NATS nodes healthy (JetStream current), the admin token made once,
#      three fanout instances ready (/readyz on the admin port: the store answers), nginx over the three;
#   3. the README's curl lines through nginx, /login rotating over the backends;
#   4. WRITES users through nginx (a third of them changing their password): every instance took some of them, and
#      every backend holds every one at exactly its last version;
#   5. any instance answers for any write: a write with an Idempotency-Key sent to fanout-1 and replayed to fanout-3
#      gets the original answer, the same key with another body `422` from fanout-2, and GET /deliveries/{id} of
#      fanout-1's write answers on fanout-3;
#   6. nothing lost when an instance and a NATS node die for good: server3 paused (its deliveries pending), writes
#      from CONCURRENCY clients through nginx, and while they run fanout-1 and nats-2 killed with SIGKILL and kept
#      down (the writes go on until the kill is done, and for KILL_WRITES / 4 users after it); at most TOLERATE
#      writes may fail (those in flight on fanout-1), the others are acknowledged; the survivors count deliveries
#      waiting for server3; server3 unpaused; then every acknowledged write is on every backend, no write was
#      applied twice (the demo backend's versions), the backends agree, and nothing waits in the surviving
#      instances (PENDING_METRIC is 0: the consumers' lag, read from JetStream);
#   7. `docker compose down -v`, and nothing of the project left.
#
# Exits non-zero on the first failure, printing `docker compose ps` and the logs' tails; the stack is taken down in
# every case (a trap), and a dockerd started here is stopped. Every wait is bounded.
#   NGINX_HOST_PORT (80), STACK_NET (10.87.0): as for the compose file. WRITES (300), KILL_WRITES (at least 400,
#   started evenly over KILL_SECONDS, 12, the kills halfway), CONCURRENCY (8), TOLERATE (16), PENDING_METRIC
#   (fanout_pending_deliveries), BUILD_TIMEOUT (seconds, 2400).
#   COMPOSE_FILE (docker-compose.cluster.yml): Compose's own variable, for an override file after a colon.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
export NGINX_HOST_PORT=${NGINX_HOST_PORT:-80}
export STACK_NET=${STACK_NET:-10.87.0}
export COMPOSE_FILE=${COMPOSE_FILE:-docker-compose.cluster.yml}
WRITES=${WRITES:-300}
KILL_WRITES=${KILL_WRITES:-400}
KILL_SECONDS=${KILL_SECONDS:-12}
CONCURRENCY=${CONCURRENCY:-8}
TOLERATE=${TOLERATE:-16}
PENDING_METRIC=${PENDING_METRIC:-fanout_pending_deliveries}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-2400}
# The classic builder, as in scripts/compose-test.sh.
export DOCKER_BUILDKIT=0
project=fanout-cluster
lb="http://127.0.0.1:$NGINX_HOST_PORT"
backends=("http://$STACK_NET.11:8080" "http://$STACK_NET.12:8080" "http://$STACK_NET.13:8080")

work=$(mktemp -d)
started_dockerd=""
stack_up=""
writer="" # the background writes' pid while they run
t0=$(date +%s)
step() { printf -- '--- [%4ds] %s\n' "$(($(date +%s) - t0))" "$*"; }
fail() { echo "compose-cluster-test: FAILED: $*" >&2; exit 1; }
# shellcheck source=compose-lib.sh
. "$root/scripts/compose-lib.sh"
compose() { timeout "${TIMEOUT:-120}" docker compose -p "$project" "$@"; }

cleanup() {
  local rc=$?
  set +e
  [ -z "$writer" ] || kill "$writer" 2>/dev/null
  if [ -n "$stack_up" ]; then
    if [ "$rc" != 0 ]; then
      echo "=== diagnostics (exit $rc)"
      compose ps -a
      compose logs --no-color --tail 30
    fi
    compose unpause >/dev/null 2>&1
    TIMEOUT=180 compose down -v --remove-orphans >/dev/null 2>&1 || echo "compose-cluster-test: docker compose down failed" >&2
  fi
  stop_engine
  rm -rf "$work"
  echo "compose-cluster-test: $([ "$rc" = 0 ] && echo passed || echo FAILED) in $(($(date +%s) - t0)) s"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# On instance SERVICE (from inside it: the admin and API ports are not published), curl ARGS.
on() {
  local service=$1
  shift
  compose exec -T "$service" curl -sS --max-time 30 "$@"
}
# The sum of every sample of metric NAME on instance SERVICE's admin port, "" when it has none.
metric_sum() {
  on "$1" http://127.0.0.1:8000/metrics | awk -v n="$2" '
    { name = $1; sub(/\{.*/, "", name) }
    name == n { sum += $2; found = 1 }
    END { if (found) print sum + 0 }'
}
container_of() { compose ps -aq "$1"; }

step "engine"
start_engine /tmp/compose-cluster-test-dockerd.log
if [ -n "$(docker ps -aq --filter "label=com.docker.compose.project=$project")" ]; then
  fail "a $project stack exists already (its volumes would be removed): docker compose -f docker-compose.cluster.yml down it first"
fi

step "base images"
base_images "$COMPOSE_FILE"

step "build the project's images (Dockerfile)"
build_started=$(date +%s)
TIMEOUT=$BUILD_TIMEOUT compose build fanout-1 >"$work/build.log" 2>&1 \
  && TIMEOUT=$BUILD_TIMEOUT compose build server1 >>"$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log"; fail "docker compose build"; }
echo "built in $(($(date +%s) - build_started)) s"
docker run --rm --entrypoint /usr/local/bin/fanout fanout-stack/fanout:local --help >"$work/help.txt" 2>&1 || true
grep -q -- '--store' "$work/help.txt" \
  || fail "this fanout has no --store (the NATS store): merge it first; the cluster cannot run without it"

step "docker compose up -d --wait (3 NATS nodes, admin token, 3 fanout instances, nginx, 3 backends)"
stack_up=1
TIMEOUT=360 compose up -d --no-build --wait --wait-timeout 300 >"$work/up.log" 2>&1 \
  || { tail -30 "$work/up.log"; fail "docker compose up --wait"; }
compose ps -a --format '  {{.Service}}: {{.Status}}'
[ "$(docker inspect -f '{{.State.ExitCode}}' "$(container_of admin-token)")" = 0 ] || fail "admin-token did not exit 0"
tokens=$(for i in 1 2 3; do compose exec -T "fanout-$i" sha256sum /secrets/admin-token; done | awk '{print $1}' | sort -u | wc -l)
[ "$tokens" = 1 ] || fail "the instances read $tokens different admin tokens"
echo "  one admin token, read by all three instances"

step "the README's curl lines through nginx, /login rotation"
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

step "$WRITES writes through nginx: spread over the three instances, every backend holds them all"
ledger="$work/ledger"
echo "schef 2" >"$ledger"
python3 scripts/compose-check.py writes --url "$lb" --prefix "cc$t0" --count "$WRITES" --ledger "$ledger" \
  --concurrency "$CONCURRENCY" || fail "writes"
for i in 1 2 3; do
  took=$(metric_sum "fanout-$i" fanout_requests_total)
  echo "  fanout-$i answered ${took:-no} requests"
  awk -v v="${took:-0}" 'BEGIN { exit !(v > 0) }' || fail "fanout-$i took no write: nginx does not spread them"
done
python3 scripts/compose-check.py converge --ledger "$ledger" --timeout 120 --exact "${backends[@]/#/--backend=}" \
  || fail "convergence after the writes"

step "any instance answers for any write: replay, conflicting replay, GET /deliveries/{id}"
key="cluster-replay-$t0"
form=(-H "Idempotency-Key: $key" -X POST -d "username=replay$t0" -d 'password=first')
# Each answer whole (-i: status line, headers, body) on the host, from curl in another instance's container.
on fanout-2 -i "${form[@]}" http://fanout-1:8080/register >"$work/r1" || fail "write to fanout-1"
on fanout-2 -i "${form[@]}" http://fanout-3:8080/register >"$work/r3" || fail "replay to fanout-3"
status() { awk 'NR == 1 { print $2 }' "$1"; }
body() { awk 'seen { print } /^\r?$/ { seen = 1 }' "$1"; }
delivery() { awk 'tolower($1) == "x-delivery-id:" { print $2 }' "$1" | tr -d '\r'; }
echo "  fanout-1: $(status "$work/r1") $(body "$work/r1") (delivery $(delivery "$work/r1"))"
echo "  fanout-3, the same key: $(status "$work/r3") $(body "$work/r3") (delivery $(delivery "$work/r3"))"
[ "$(status "$work/r1")" = "$(status "$work/r3")" ] && [ "$(body "$work/r1")" = "$(body "$work/r3")" ] \
  || fail "the replay through fanout-3 did not get fanout-1's answer"
on fanout-1 -i -H "Idempotency-Key: $key" -X POST -d "username=replay$t0" -d 'password=other' \
  http://fanout-2:8080/register >"$work/r2" || fail "conflicting replay to fanout-2"
[ "$(status "$work/r2")" = 422 ] || fail "the same key with another body answered $(status "$work/r2") on fanout-2, not 422"
echo "  fanout-2, the same key with another body: 422 $(body "$work/r2")"
id=$(delivery "$work/r1")
[ -n "$id" ] || fail "fanout-1's answer has no X-Delivery-Id"
on fanout-1 -i "http://fanout-3:8080/deliveries/$id" >"$work/d3" || fail "GET /deliveries on fanout-3"
[ "$(status "$work/d3")" = 200 ] || fail "GET /deliveries/$id on fanout-3 answered $(status "$work/d3"): $(body "$work/d3")"
echo "  GET /deliveries/$id on fanout-3: 200 $(body "$work/d3" | head -c 200)"
echo "replay$t0 1" >>"$ledger"

step "fanout-1 and nats-2 killed for good (SIGKILL) under $CONCURRENCY clients, server3 paused meanwhile"
# Kept down once killed: no restart policy brings them back, as if their hosts were gone. Both looked up and set
# before the load starts, so that the kill itself is one command.
victims=("$(container_of fanout-1)" "$(container_of nats-2)")
docker update --restart=no "${victims[@]}" >/dev/null
compose pause server3 >/dev/null
# The load lasts until $work/killed exists, then goes on for KILL_WRITES / 4 more users: the kills happen under
# it however long they take, and writes go on reaching the survivors after them.
python3 scripts/compose-check.py writes --url "$lb" --prefix "kill$t0" --count "$KILL_WRITES" --ledger "$ledger" \
  --concurrency "$CONCURRENCY" --tolerate "$TOLERATE" --over "$KILL_SECONDS" \
  --until "$work/killed" --after "$((KILL_WRITES / 4))" >"$work/kill-writes.out" 2>&1 &
writer=$!
sleep "$((KILL_SECONDS / 2))"
kill -0 "$writer" 2>/dev/null || { cat "$work/kill-writes.out"; fail "the writes stopped before the kills"; }
docker kill -s KILL "${victims[@]}" >/dev/null
touch "$work/killed"
echo "  killed fanout-1 and nats-2 at $(($(date +%s) - t0)) s"
writes_rc=0
wait "$writer" || writes_rc=$?
writer=""
sed 's/^/  /' "$work/kill-writes.out"
[ "$writes_rc" = 0 ] || fail "more than $TOLERATE writes failed around the kills"
# What server3 has not had yet waits in the consumers, counted by the survivors (the gauge is refreshed on a timer).
waits_some() { awk -v v="$(metric_sum "$1" "$PENDING_METRIC")" 'BEGIN { exit !(v > 0) }'; }
[ -n "$(metric_sum fanout-2 "$PENDING_METRIC")" ] \
  || fail "fanout-2 has no $PENDING_METRIC (PENDING_METRIC names the metric of what waits)"
wait_for "$PENDING_METRIC above 0 on fanout-2 while server3 is paused" 60 waits_some fanout-2
echo "  $PENDING_METRIC on fanout-2 with server3 paused: $(metric_sum fanout-2 "$PENDING_METRIC")"
compose unpause server3 >/dev/null
for s in fanout-1 nats-2; do
  [ "$(docker inspect -f '{{.State.Running}}' "$(container_of "$s")")" = false ] || fail "$s came back"
done
python3 scripts/compose-check.py converge --ledger "$ledger" --timeout 240 --exact "${backends[@]/#/--backend=}" \
  || fail "an acknowledged write is missing, or one was applied twice, after the kills"
nothing_waits() { [ "$(metric_sum "$1" "$PENDING_METRIC")" = 0 ]; }
for s in fanout-2 fanout-3; do
  wait_for "$PENDING_METRIC 0 on $s" 120 nothing_waits "$s"
  echo "  $s: nothing waits ($PENDING_METRIC 0)"
done

step "docker compose down -v, and nothing of ours left"
TIMEOUT=180 compose down -v --remove-orphans >/dev/null 2>&1 || fail "docker compose down -v"
stack_up=""
left="$(docker ps -aq --filter "label=com.docker.compose.project=$project")$(docker network ls -q --filter "label=com.docker.compose.project=$project")$(docker volume ls -q --filter "label=com.docker.compose.project=$project")"
[ -z "$left" ] || fail "left behind by $project: $left"
echo "  no container, network or volume of $project left"
