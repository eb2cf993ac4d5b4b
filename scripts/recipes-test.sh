#!/usr/bin/env bash
# `make recipes-test`: runs the README's "Operator recipes" as written and checks that they show what the README
# says they show. Nothing is copied: the commands and their outputs are read from README.md at run time, so the
# README and this test cannot drift apart.
#
# How the README is read: in the section "## Operator recipes" (up to the next "## " heading), every ```console
# block holds commands (lines starting with "$ ") each followed by the output the README shows for it. An output
# is a pattern: "..." stands for any text (ids, times, the fields a reader does not need), everything else must
# match exactly. A command with no output shown is run and its output not checked.
#
# How it runs them: one shell for all, in order (so AUTH=..., ID=... carry over), on spare ports: the README's
# default ports (8080, 9080, 9000, 9001-9003, 9101-9103) and its `.run/` are rewritten to this test's.
# - `... make run` starts the stack in the background, in a process group of its own as in a terminal, after
#   stopping the previous one with Ctrl-C (SIGINT to its group), which must end cleanly: make reports no error and
#   the script stops its 5 processes.
# - A command that changes something (a POST, a DELETE, a form body, make) runs once. A read runs again until
#   its output matches, for up to RECIPE_WAIT seconds (30): the README says "a few seconds later" for those.
#
# Settings (environment): PROFILE (release, as make run; debug is faster to build), RECIPE_WAIT, and the ports:
# NGINX_PORT=24080 FANOUT_PORT=24081 FANOUT_METRICS_PORT=24000 BACKEND_PORTS=24001,24002,24003
# CONTROL_PORTS=24101,24102,24103 (below 32768, out of the ephemeral range that port-0 tests draw from).
set -euo pipefail
set -m # job control: each stack gets its own process group, as in a terminal

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# The README's make commands behave as typed in a terminal, not as a sub-make of `make recipes-test` (which would
# print "Entering directory" lines).
unset MAKELEVEL MAKEFLAGS MFLAGS
export PROFILE=${PROFILE:-release}
export NGINX_PORT=${NGINX_PORT:-24080} FANOUT_PORT=${FANOUT_PORT:-24081} FANOUT_METRICS_PORT=${FANOUT_METRICS_PORT:-24000}
export BACKEND_PORTS=${BACKEND_PORTS:-24001,24002,24003} CONTROL_PORTS=${CONTROL_PORTS:-24101,24102,24103}
export RUN_DIR=${RUN_DIR:-$root/.run/recipes}
wait_secs=${RECIPE_WAIT:-30}
IFS=, read -r -a bports <<<"$BACKEND_PORTS"
IFS=, read -r -a cports <<<"$CONTROL_PORTS"

log=$(mktemp)
job=
fail() {
  echo "recipes-test: $*" >&2
  echo "--- make run output:" >&2
  cat "$log" >&2
  exit 1
}

# The README's default ports and run directory, rewritten to this test's.
localize() {
  sed -e "s/\b8080\b/$NGINX_PORT/g" -e "s/\b9080\b/$FANOUT_PORT/g" -e "s/\b9000\b/$FANOUT_METRICS_PORT/g" \
    -e "s/\b9001\b/${bports[0]}/g" -e "s/\b9002\b/${bports[1]}/g" -e "s/\b9003\b/${bports[2]}/g" \
    -e "s/\b9101\b/${cports[0]}/g" -e "s/\b9102\b/${cports[1]}/g" -e "s/\b9103\b/${cports[2]}/g" \
    -e "s|\.run/|$RUN_DIR/|g"
}

# A README output as a bash pattern: glob characters taken literally, "..." as "*".
pattern() { sed -e 's/[][*?\\]/\\&/g' -e 's/\.\.\./*/g'; }

# --- Read the recipes.
cmds=()
outs=()
in_section=0
in_block=0
while IFS= read -r line; do
  case "$line" in
    "## Operator recipes"*) in_section=1; continue ;;
    "## "*) [ $in_section = 1 ] && break ;;
  esac
  [ $in_section = 1 ] || continue
  if [ $in_block = 0 ]; then
    [ "$line" = '```console' ] && in_block=1
    continue
  fi
  if [ "$line" = '```' ]; then in_block=0; continue; fi
  if [[ $line == '$ '* ]]; then
    cmds+=("${line#\$ }")
    outs+=("")
  elif [ ${#cmds[@]} -gt 0 ]; then
    outs[${#cmds[@]} - 1]+="$line"$'\n'
  fi
done <README.md
[ ${#cmds[@]} -ge 20 ] || fail "README.md: found ${#cmds[@]} commands under '## Operator recipes', expected 20 or more"
for title in "Why a write got 202" "A backend down and back" "Dead letters and redrive" "Recovering a backend" \
  "Changing the retry schedule" "JSON logs"; do
  grep -q "^### $title" README.md || fail "README.md: the recipe '### $title' is missing"
done

# --- The stack.
stop_stack() {
  [ -n "$job" ] || return 0
  kill -INT -- "-$job" 2>/dev/null || true
  wait "$job" || true
  job=
  if grep -q 'make: \*\*\*' "$log"; then fail "Ctrl-C of make run ended with a make error"; fi
  grep -q "stopping 5 processes" "$log" || fail "Ctrl-C did not stop the stack's 5 processes"
  for p in "$NGINX_PORT" "$FANOUT_PORT" "$FANOUT_METRICS_PORT" "${bports[@]}" "${cports[@]}"; do
    if curl -s -o /dev/null "127.0.0.1:$p/"; then fail "port $p still answers after Ctrl-C"; fi
  done
}
trap 'stop_stack; rm -f "$log"' EXIT

start_stack() {
  stop_stack
  : >"$log"
  (eval "$1") >"$log" 2>&1 &
  job=$!
  for _ in $(seq 1 1800); do # the first release build can take minutes
    grep -q "The stack is up" "$log" && return 0
    kill -0 "$job" 2>/dev/null || fail "'$1' exited early"
    sleep 0.5
  done
  fail "'$1' did not come up"
}

# --- Run them.
checked=0
for i in "${!cmds[@]}"; do
  cmd=$(localize <<<"${cmds[$i]}")
  expected=$(localize <<<"${outs[$i]}")
  expected=${expected%$'\n'}
  printf '$ %s\n' "${cmds[$i]}"
  case "$cmd" in
    *"make run") start_stack "$cmd"; continue ;;
  esac
  if [[ $cmd =~ ^[A-Z_]+= && $cmd != *" make "* ]]; then
    eval "$cmd" || fail "'${cmds[$i]}' failed"
    continue
  fi
  once=0
  case "$cmd" in *"-X POST"* | *"-X DELETE"* | *" -d "* | make*) once=1 ;; esac
  deadline=$((SECONDS + wait_secs))
  while :; do
    out=$(eval "$cmd" 2>&1) || true
    out=${out%$'\n'}
    if [ -z "$expected" ]; then break; fi
    # shellcheck disable=SC2053 # the right side is a pattern on purpose
    if [[ $out == $(pattern <<<"$expected") ]]; then checked=$((checked + 1)); break; fi
    if [ $once = 1 ] || [ $SECONDS -ge $deadline ]; then
      fail "'${cmds[$i]}' showed
$out
where the README shows
${outs[$i]}"
    fi
    sleep 0.5
  done
done
stop_stack
echo "recipes-test: ${#cmds[@]} commands of the README's operator recipes ran as written; $checked outputs matched"
