#!/usr/bin/env bash
# `make load-test`: a headless Locust run against the local stack (the one `make run` starts; started here for
# the run when it is not up), then the convergence check: once fanout has nothing in flight, every backend must
# hold the same users. Exits non-zero on any failed request or any divergence.
#
#   USERS=20 SPAWN_RATE=10 DURATION=30s SKIP_SOME_REQUESTS=true (server3 drops 1 write in 5; false: none)
#   NGINX_PORT, FANOUT_METRICS_PORT, BACKEND_PORTS as for make run. Results in locust_load_test/results/.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
LOCUST_VERSION=2.47.0
USERS=${USERS:-20}
SPAWN_RATE=${SPAWN_RATE:-10}
DURATION=${DURATION:-30s}
SKIP_SOME_REQUESTS=${SKIP_SOME_REQUESTS:-true}
export NGINX_PORT=${NGINX_PORT:-8080} FANOUT_PORT=${FANOUT_PORT:-9080} FANOUT_METRICS_PORT=${FANOUT_METRICS_PORT:-9000}
export BACKEND_PORTS=${BACKEND_PORTS:-9001,9002,9003}
results="$root/locust_load_test/results"
mkdir -p "$results"

if [ ! -x .venv/bin/locust ] || ! .venv/bin/locust --version 2>/dev/null | grep -q "$LOCUST_VERSION"; then
  python3 -m venv .venv
  .venv/bin/pip install -q "locust==$LOCUST_VERSION"
fi

stack_pid=""
stop_stack() {
  local rc=$?
  set +e
  if [ -n "$stack_pid" ]; then
    kill -INT -- "-$stack_pid" 2>/dev/null
    wait "$stack_pid" 2>/dev/null
  fi
  exit "$rc"
}
trap stop_stack EXIT

lb="http://localhost:$NGINX_PORT"
if curl -fsS -o /dev/null "$lb/nginx_status" 2>/dev/null; then
  echo "load-test: using the stack already up on $lb (SKIP_SOME_REQUESTS is whatever it was started with)"
else
  flaky=""
  [ "$SKIP_SOME_REQUESTS" = true ] && flaky=3
  echo "load-test: starting the local stack (flaky backends: ${flaky:-none})"
  set -m
  FLAKY_BACKENDS=$flaky RUN_DIR="$root/.run/load-test" ./scripts/run-local.sh > "$results/stack.log" 2>&1 &
  stack_pid=$!
  set +m
  for _ in $(seq 1 1800); do
    grep -q "The stack is up" "$results/stack.log" && break
    kill -0 "$stack_pid" 2>/dev/null || { cat "$results/stack.log" >&2; exit 1; }
    sleep 0.5
  done
  grep -q "The stack is up" "$results/stack.log" || { echo "load-test: the stack did not come up" >&2; exit 1; }
fi

echo "load-test: $USERS users, spawn rate $SPAWN_RATE/s, $DURATION, against $lb"
set +e
.venv/bin/locust -f locust_load_test/locustfile.py --headless -u "$USERS" -r "$SPAWN_RATE" -t "$DURATION" \
  --host "$lb" --html "$results/report.html" --csv "$results/stats" --json-file "$results/stats" --only-summary --loglevel WARNING
locust_rc=$? # Locust exits 1 when any request failed; the check below reports it
set -e

IFS=, read -r -a ports <<<"$BACKEND_PORTS"
backend_args=()
for p in "${ports[@]}"; do backend_args+=(--backend "http://127.0.0.1:$p"); done
python3 locust_load_test/converge.py --stats "$results/stats.json" --metrics "http://127.0.0.1:$FANOUT_METRICS_PORT/metrics" \
  "${backend_args[@]}" --locust-exit "$locust_rc"
