#!/usr/bin/env bash
# `make reset`: forgets what `make run`'s stack kept between runs, so that the next `make run` starts as a fresh
# clone does: removes RUN_DIR/data (fanout's outbox: pending writes, dead letters, the history), RUN_DIR/nats
# (`make run-cluster`'s JetStream stores) and the logs
# (RUN_DIR/logs, nginx's RUN_DIR/nginx/logs). Nothing else: the admin token (RUN_DIR/admin-token), the build and
# other RUN_DIRs stay. Refuses while a process of that stack runs (RUN_DIR/pids/NAME.pid of a live process).
#
# Settings (environment): RUN_DIR=.run (the same as make run's).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUN_DIR=${RUN_DIR:-$root/.run}

running=()
for f in "$RUN_DIR"/pids/*.pid; do
  [ -e "$f" ] || continue
  pid=$(cat "$f")
  # A live process that is one of the stack's (not a later process that got the same PID).
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
    ps -o args= -p "$pid" 2>/dev/null | grep -qE 'demo-backend|fanout|nginx|nats-server'; then
    running+=("$(basename "$f" .pid) (pid $pid)")
  else
    rm -f "$f" # left by a stack that was killed hard
  fi
done
if [ ${#running[@]} -gt 0 ]; then
  echo "make reset: the stack of $RUN_DIR is running (${running[*]}); stop it (Ctrl-C in its terminal) first" >&2
  exit 1
fi

removed=()
for d in "$RUN_DIR/data" "$RUN_DIR/nats" "$RUN_DIR/logs" "$RUN_DIR/nginx/logs"; do
  if [ -e "$d" ]; then
    rm -rf "$d"
    removed+=("${d#"$root"/}")
  fi
done
if [ ${#removed[@]} -eq 0 ]; then
  echo "make reset: nothing to remove under ${RUN_DIR#"$root"/}"
else
  echo "make reset: removed ${removed[*]} (the outbox and the logs; the admin token stays)"
fi
