#!/usr/bin/env bash
# Checks `make run` the way a newcomer uses it: starts scripts/run-local.sh (what `make run` runs) in its own
# process group on spare ports, runs the README's curl lines against it, then sends Ctrl-C (SIGINT to the group)
# and checks that every process it started is gone. PROFILE=debug makes it faster (default: release, as make run).
set -euo pipefail
set -m # job control: the stack gets its own process group, as in a terminal

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export NGINX_PORT=${NGINX_PORT:-18080} FANOUT_PORT=${FANOUT_PORT:-19080} FANOUT_METRICS_PORT=${FANOUT_METRICS_PORT:-19000}
export BACKEND_PORTS=${BACKEND_PORTS:-19001,19002,19003} CONTROL_PORTS=${CONTROL_PORTS:-19101,19102,19103} RUN_DIR=${RUN_DIR:-$root/.run/smoke}
log=$(mktemp)
fail() { echo "smoke: $*" >&2; echo "--- make run output:" >&2; cat "$log" >&2; exit 1; }

"$root/scripts/run-local.sh" >"$log" 2>&1 &
job=$!
stop() { kill -INT -- "-$job" 2>/dev/null || true; rm -f "$log"; }
trap stop EXIT

for _ in $(seq 1 1800); do # the first release build can take minutes
  grep -q "The stack is up" "$log" && break
  kill -0 "$job" 2>/dev/null || fail "make run exited early"
  sleep 0.5
done
grep -q "The stack is up" "$log" || fail "the stack did not come up"
lb="http://localhost:$NGINX_PORT"

names=$(for _ in 1 2 3 4 5 6; do curl -fsS "$lb/login"; done | sort -u | tr '\n' ' ')
[ "$names" = "logged in on server1 logged in on server2 logged in on server3 " ] || fail "/login did not rotate: $names"
reg=$(curl -fsS -X POST -d 'username=schef' -d 'password=example' "$lb/register")
case "$reg" in "register on server"*) ;; *) fail "register answered: $reg" ;; esac
chg=$(curl -fsS -X POST -d 'username=schef' -d 'password=example' "$lb/changePassword")
case "$chg" in "password changed on server"*) ;; *) fail "changePassword answered: $chg" ;; esac
# Read each page whole before matching: `grep -q` stops at the first match, and curl writing into a closed pipe
# fails the pipeline (pipefail) once a page is larger than the pipe buffer, as /metrics is.
status=$(curl -fsS "$lb/nginx_status") || fail "/nginx_status"
grep -q "Active connections" <<<"$status" || fail "/nginx_status: $status"
metrics=$(curl -fsS "$lb/metrics") || fail "/metrics"
grep -q '^Total_domains_success_counter_total' <<<"$metrics" || fail "/metrics lacks the original's series"
grep -q '^fanout_breaker_state' <<<"$metrics" || fail "/metrics lacks the queue series"

# The user reaches every backend (server3 may need a retry or two).
IFS=, read -r -a ports <<<"$BACKEND_PORTS"
for p in "${ports[@]}"; do
  ok=0
  for _ in $(seq 1 100); do
    if curl -fsS "127.0.0.1:$p/users" | grep -q '"username":"schef","version":2'; then ok=1; break; fi
    sleep 0.1
  done
  [ $ok = 1 ] || fail "schef is not on the backend at port $p: $(curl -sS "127.0.0.1:$p/users")"
done

# The admin port: reads are open, actions need the token make run wrote (the README's curl lines).
admin="http://127.0.0.1:$FANOUT_METRICS_PORT"
curl -fsS "$admin/dead-letters" | grep -q '"count":0' || fail "GET /dead-letters"
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$admin/dead-letters/redrive")
[ "$code" = 401 ] || fail "a redrive without the token answered $code, not 401"
redrive=$(curl -fsS -H "Authorization: Bearer $(cat "$RUN_DIR/admin-token")" -X POST "$admin/dead-letters/redrive") \
  || fail "a redrive with the token of $RUN_DIR/admin-token was refused"
[ "$redrive" = '{"redriven":0}' ] || fail "redrive answered: $redrive"
[ "$(stat -c %a "$RUN_DIR/admin-token")" = 600 ] || fail "$RUN_DIR/admin-token is not 0600"
# The console's page and its state, on the admin port.
curl -fsS "$admin/console" | grep -q '<title>fanout console</title>' || fail "GET /console"
curl -fsS "$admin/console/api/state" | grep -q '"breaker":"closed"' || fail "GET /console/api/state"
grep -q "console        http://127.0.0.1:$FANOUT_METRICS_PORT/console" "$log" || fail "make run does not print the console's URL"
if curl -s "$lb/console" | grep -q 'fanout console'; then fail "nginx serves the console (admin port only)"; fi
# nginx forwards none of it.
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$lb/dead-letters/redrive")
[ "$code" = 404 ] || fail "nginx answered $code to /dead-letters/redrive, not 404"

# Ctrl-C stops everything.
trap 'rm -f "$log"' EXIT
kill -INT -- "-$job"
wait "$job" || true
for p in "$NGINX_PORT" "$FANOUT_PORT" "$FANOUT_METRICS_PORT" "${ports[@]}"; do
  if curl -s -o /dev/null "127.0.0.1:$p/"; then fail "port $p still answers after Ctrl-C"; fi
done
grep -q "stopping 5 processes" "$log" || fail "Ctrl-C did not stop the stack in order"
if grep -q "a process of the stack exited" "$log"; then fail "Ctrl-C was reported as a crash"; fi
echo "smoke: make run works: /login rotates over 3 servers, writes reach all 3 backends, admin actions need the token, Ctrl-C stops everything"
