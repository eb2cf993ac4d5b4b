#!/usr/bin/env bash
# The whole stack on this machine without Docker (`make run`): three demo backends (server3 drops one write in
# five), fanout and nginx on loopback ports, from the same binaries and the same nginx template as the Docker
# path. Prints the URLs and the curl lines to try; Ctrl-C (or SIGTERM) stops every process it started, and
# Ctrl-C is a clean exit (status 0, so make reports no error).
#
# Each demo backend gets a control port on loopback (CONTROL_PORTS) to stage an outage without touching its
# process: `curl -X POST 127.0.0.1:9103/down` (then /up, /slow?delay=2s, /flaky?share=0.5, /wipe). The PIDs of
# the processes are in RUN_DIR/pids/NAME.pid while the stack runs (`make reset` reads them).
#
# With CLUSTER=1 (`make run-cluster`, README "Scaling out"): three nats-server processes as one JetStream cluster
# (NATS_PORTS, routes on NATS_ROUTE_PORTS, stores under RUN_DIR/nats/), three fanout instances on it
# (FANOUT_PORTS, FANOUT_METRICS_PORTS; STORE_REPLICAS=3), and nginx over the three.
#
# Settings (environment):
#   NGINX_PORT=8080  FANOUT_PORT=9080  FANOUT_METRICS_PORT=9000  BACKEND_PORTS=9001,9002,9003
#   CLUSTER=1: NATS_PORTS=4222,4223,4224  NATS_ROUTE_PORTS=6222,6223,6224  FANOUT_PORTS=9080,9081,9082
#              FANOUT_METRICS_PORTS=9000,9010,9020
#   CONTROL_PORTS=9101,9102,9103 (the demo backends' control ports, on 127.0.0.1)
#   FLAKY_BACKENDS=3 (which servers drop writes; "" for none)  PROFILE=release|debug  RUN_DIR=.run
#   Any fanout variable (ACK_POLICY, MAX_ATTEMPTS, ...) and RUST_LOG pass through to the processes.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
NGINX_PORT=${NGINX_PORT:-8080}
FANOUT_PORT=${FANOUT_PORT:-9080}
FANOUT_METRICS_PORT=${FANOUT_METRICS_PORT:-9000}
BACKEND_PORTS=${BACKEND_PORTS:-9001,9002,9003}
CONTROL_PORTS=${CONTROL_PORTS:-9101,9102,9103}
FLAKY_BACKENDS=${FLAKY_BACKENDS-3}
PROFILE=${PROFILE:-release}
RUN_DIR=${RUN_DIR:-$root/.run}
CLUSTER=${CLUSTER:-0}
if [ "$CLUSTER" = 1 ]; then
  NATS_PORTS=${NATS_PORTS:-4222,4223,4224}
  NATS_ROUTE_PORTS=${NATS_ROUTE_PORTS:-6222,6223,6224}
  FANOUT_PORTS=${FANOUT_PORTS:-9080,9081,9082}
  FANOUT_METRICS_PORTS=${FANOUT_METRICS_PORTS:-9000,9010,9020}
else
  NATS_PORTS="" NATS_ROUTE_PORTS="" FANOUT_PORTS=$FANOUT_PORT FANOUT_METRICS_PORTS=$FANOUT_METRICS_PORT
fi

say() { printf '%s\n' "$*"; }
fail() { say "make run: $*" >&2; exit 1; }

NGINX=${NGINX_BIN:-$("$root/scripts/ensure-nginx.sh")} || fail "nginx is required"

# Cargo's output directory: CARGO_TARGET_DIR when set (relative to the repository, as cargo takes it from here).
target=${CARGO_TARGET_DIR:-target}
case "$target" in /*) ;; *) target="$root/$target" ;; esac
if [ "$PROFILE" = release ]; then
  cargo build --release --workspace --bins
  bin="$target/release"
else
  cargo build --workspace --bins
  bin="$target/debug"
fi

# Every port must be free before anything starts: a port held by another process would otherwise make a
# process of this stack exit (or, worse, let another server answer in its place).
for spec in "nginx:$NGINX_PORT" \
  $(IFS=,; for p in $FANOUT_PORTS; do echo "fanout:$p"; done) \
  $(IFS=,; for p in $FANOUT_METRICS_PORTS; do echo "fanout_metrics:$p"; done) \
  $(IFS=,; for p in $NATS_PORTS $NATS_ROUTE_PORTS; do echo "nats:$p"; done) \
  $(IFS=,; for p in $BACKEND_PORTS; do echo "backend:$p"; done) \
  $(IFS=,; for p in $CONTROL_PORTS; do echo "backend control:$p"; done); do
  port=${spec##*:}
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    fail "port $port (${spec%:*}) is already in use; pick another, e.g. NGINX_PORT=8081 FANOUT_PORT=9081 FANOUT_METRICS_PORT=9010 BACKEND_PORTS=9011,9012,9013 CONTROL_PORTS=9111,9112,9113 make run"
  fi
done

mkdir -p "$RUN_DIR/logs" "$RUN_DIR/pids"
pids=()
pid_files=()
cleanup() {
  trap - INT TERM EXIT
  rm -f "${pid_files[@]}"
  if [ ${#pids[@]} -gt 0 ]; then
    say "stopping ${#pids[@]} processes"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 1 100); do
      alive=0
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
      [ $alive = 0 ] && break
      sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
}
trap cleanup EXIT
# Ctrl-C is how make run is meant to end: a clean exit. make gets the SIGINT too, and reports nothing when its
# recipe exited 0 (with 130 it printed `Error 130`).
trap 'exit 0' INT
trap 'exit 143' TERM

# start NAME CMD...: runs CMD in a session of its own (so that Ctrl-C reaches only this script, which then
# stops everything in order), logging to $RUN_DIR/logs/NAME.log.
start() {
  local name=$1
  shift
  rm -f "$RUN_DIR/logs/$name.log"
  setsid "$@" >"$RUN_DIR/logs/$name.log" 2>&1 &
  pids+=($!)
  echo $! >"$RUN_DIR/pids/$name.pid"
  pid_files+=("$RUN_DIR/pids/$name.pid")
}

# wait_http NAME URL: polls URL until it answers 200, for up to 20 s; fails at once if the last process exited.
wait_http() {
  local pid=${pids[-1]}
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || fail "$1 exited: $(tail -n 3 "$RUN_DIR/logs/$1.log")"
    if curl -fsS --max-time 1 -o /dev/null "$2" 2>/dev/null; then
      # Still running once it answered: the answer was its own.
      sleep 0.1
      kill -0 "$pid" 2>/dev/null || fail "$1 exited: $(tail -n 3 "$RUN_DIR/logs/$1.log")"
      return 0
    fi
    sleep 0.1
  done
  fail "$1 did not answer $2 within 20 s; see $RUN_DIR/logs/$1.log"
}

IFS=, read -r -a ports <<<"$BACKEND_PORTS"
[ ${#ports[@]} = 3 ] || fail "BACKEND_PORTS must list three ports"
IFS=, read -r -a control_ports <<<"$CONTROL_PORTS"
[ ${#control_ports[@]} = 3 ] || fail "CONTROL_PORTS must list three ports"
pool=()
for i in 1 2 3; do
  port=${ports[$((i - 1))]}
  skip=false
  case ",$FLAKY_BACKENDS," in *",$i,"*) skip=true ;; esac
  pool+=("127.0.0.1:$port")
  SERVER_NAME="server$i" SERVER_HOST=127.0.0.1 SERVER_PORT="$port" SKIP_SOME_REQUESTS=$skip \
    CONTROL_HOST=127.0.0.1 CONTROL_PORT="${control_ports[$((i - 1))]}" start "server$i" "$bin/demo-backend"
  wait_http "server$i" "http://127.0.0.1:$port/healthz"
  wait_http "server$i" "http://127.0.0.1:${control_ports[$((i - 1))]}/"
done

# The admin token (the admin routes that change state need it): made once per RUN_DIR, readable by its owner only,
# unless ADMIN_TOKEN_FILE names another.
if [ -z "${ADMIN_TOKEN_FILE:-}" ]; then
  ADMIN_TOKEN_FILE="$RUN_DIR/admin-token"
  if [ ! -s "$ADMIN_TOKEN_FILE" ]; then
    (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$ADMIN_TOKEN_FILE")
  fi
fi
export ADMIN_TOKEN_FILE

IFS=, read -r -a fanout_ports <<<"$FANOUT_PORTS"
IFS=, read -r -a fanout_metrics_ports <<<"$FANOUT_METRICS_PORTS"
[ ${#fanout_ports[@]} = ${#fanout_metrics_ports[@]} ] || fail "FANOUT_PORTS and FANOUT_METRICS_PORTS must list as many ports"
if [ "$CLUSTER" = 1 ]; then
  NATS=$("$root/scripts/ensure-nats.sh") || fail "CLUSTER=1 needs nats-server"
  IFS=, read -r -a nats_ports <<<"$NATS_PORTS"
  IFS=, read -r -a route_ports <<<"$NATS_ROUTE_PORTS"
  [ ${#nats_ports[@]} = 3 ] && [ ${#route_ports[@]} = 3 ] || fail "NATS_PORTS and NATS_ROUTE_PORTS must list three ports"
  routes=$(for p in "${route_ports[@]}"; do printf 'nats://127.0.0.1:%s,' "$p"; done)
  for i in 1 2 3; do
    start "nats$i" "$NATS" -js -a 127.0.0.1 -p "${nats_ports[$((i - 1))]}" --server_name "nats$i" \
      -sd "$RUN_DIR/nats/nats$i" --cluster_name fanout --cluster "nats://127.0.0.1:${route_ports[$((i - 1))]}" \
      --routes "${routes%,}"
  done
  # fanout makes its streams once the cluster has elected a JetStream leader.
  for _ in $(seq 1 200); do
    grep -q "metadata leader" "$RUN_DIR/logs/nats1.log" 2>/dev/null && break
    sleep 0.1
  done
  grep -q "metadata leader" "$RUN_DIR/logs/nats1.log" || fail "the NATS cluster elected no leader in 20 s; see $RUN_DIR/logs/nats1.log"
  export STORE=$(for p in "${nats_ports[@]}"; do printf 'nats://127.0.0.1:%s,' "$p"; done | sed 's/,$//')
  export STORE_REPLICAS=${STORE_REPLICAS:-3}
fi
lbs=() lb_metrics=()
for i in "${!fanout_ports[@]}"; do
  name=fanout
  [ "$CLUSTER" = 1 ] && name="fanout$((i + 1))"
  BACKEND_POOL=$(IFS=,; echo "${pool[*]}") LISTEN_ADDR="127.0.0.1:${fanout_ports[$i]}" \
    METRICS_PORT="${fanout_metrics_ports[$i]}" INSTANCE=$name DATA_DIR=${DATA_DIR-$RUN_DIR/data} start "$name" "$bin/fanout"
  wait_http "$name" "http://127.0.0.1:${fanout_ports[$i]}/healthz"
  wait_http "$name" "http://127.0.0.1:${fanout_metrics_ports[$i]}/healthz"
  lbs+=("127.0.0.1:${fanout_ports[$i]}")
  lb_metrics+=("127.0.0.1:${fanout_metrics_ports[$i]}")
done

BACKEND_1=${pool[0]} BACKEND_2=${pool[1]} BACKEND_3=${pool[2]} LB=$(IFS=,; echo "${lbs[*]}") \
  LB_METRICS=$(IFS=,; echo "${lb_metrics[*]}") NGINX_LISTEN="127.0.0.1:$NGINX_PORT" \
  "$root/nginx/render.sh" "$RUN_DIR/nginx"
start nginx "$NGINX" -p "$RUN_DIR/nginx" -c "$RUN_DIR/nginx/nginx.conf" -e "$RUN_DIR/nginx/logs/error.log"
wait_http nginx "http://127.0.0.1:$NGINX_PORT/nginx_status"

lb="http://localhost:$NGINX_PORT"
cat <<MSG

The stack is up (logs in ${RUN_DIR#"$root"/}/logs/):
  nginx          $lb            (/login round-robin; /register, /changePassword -> fanout)
  nginx status   $lb/nginx_status
  fanout metrics $lb/metrics    (also http://127.0.0.1:$FANOUT_METRICS_PORT/metrics)
  fanout API     $(for p in "${fanout_ports[@]}"; do printf 'http://127.0.0.1:%s ' "$p"; done)  (GET /deliveries/{id})
  store          ${STORE:-write log in ${DATA_DIR-$RUN_DIR/data}}
  backends       ${pool[*]}   (flaky: ${FLAKY_BACKENDS:+server}${FLAKY_BACKENDS:-none}; GET /users on each)
  outages        $(for p in "${control_ports[@]}"; do printf 'http://127.0.0.1:%s ' "$p"; done)  (POST /down, /up, /slow?delay=2s, /flaky?share=0.5, /wipe)
  PIDs           ${RUN_DIR#"$root"/}/pids/*.pid
  admin          $(for p in "${fanout_metrics_ports[@]}"; do printf 'http://127.0.0.1:%s ' "$p"; done)  (dead letters, recoveries; the token is in ${ADMIN_TOKEN_FILE#"$root"/})
  console        http://127.0.0.1:${fanout_metrics_ports[0]}/console   (in a browser; its actions ask for that token)

Try:
  curl $lb/login
  curl -X POST -d 'username=schef' -d 'password=example' $lb/register
  curl -X POST -d 'username=schef' -d 'password=example' $lb/changePassword
  for p in ${ports[*]}; do curl -s 127.0.0.1:\$p/users; echo; done
  curl -X POST 127.0.0.1:${control_ports[2]}/down     # server3 down; /up brings it back

Ctrl-C stops everything.
MSG

# Stop everything as soon as one process dies, or on Ctrl-C. With CLUSTER=1 the stack is meant to lose an
# instance or a NATS node (README "Scaling out"): it goes on while nginx, a fanout instance and two NATS nodes live.
set +e
while true; do
  wait -n "${pids[@]}"
  status=$?
  if [ "$CLUSTER" = 1 ]; then
    alive() { [ -f "$RUN_DIR/pids/$1.pid" ] && kill -0 "$(cat "$RUN_DIR/pids/$1.pid")" 2>/dev/null; }
    fanouts=0 nodes=0
    for i in "${!fanout_ports[@]}"; do alive "fanout$((i + 1))" && fanouts=$((fanouts + 1)); done
    for i in 1 2 3; do alive "nats$i" && nodes=$((nodes + 1)); done
    if alive nginx && [ $fanouts -gt 0 ] && [ $nodes -ge 2 ]; then
      say "a process of the stack exited (status $status); going on with $fanouts fanout instances and $nodes NATS nodes" >&2
      live=()
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && live+=("$p"); done
      pids=("${live[@]}")
      continue
    fi
  fi
  say "a process of the stack exited (status $status); see $RUN_DIR/logs/" >&2
  exit 1
done
