#!/usr/bin/env bash
# Validates deploy/kubernetes/ without a cluster (`make deploy-lint`, run by CI):
#   1. every manifest against the Kubernetes API schemas bundled in PyPI's kubernetes-validate (offline), strict
#      (an unknown or misspelt field fails), for the oldest and the newest version we support (1.30: the preStop
#      sleep action; 1.37);
#   2. when kubectl is on the machine, each directory rendered by its kustomize (`kubectl kustomize`) and the
#      result validated the same way (what `kubectl apply -k` would send);
#   3. scripts/check-deploy.py: each fanout workload has both probes on the admin port, requests and limits, a
#      PodDisruptionBudget and a Service selecting it, the admin token from a Secret, a locked-down security
#      context, env names fanout reads; the embedded store is one StatefulSet replica on a volume, the NATS store a
#      Deployment of three pointed at the chart's Service, and the chart's values (nats-values.yaml) parse and
#      have JetStream on file storage in a cluster of three; every manifest is listed in its kustomization;
#   4. both checks catch what they are for: broken copies of the manifests must fail them.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
KUBERNETES_VALIDATE_VERSION=1.37.0
K8S_VERSIONS=(1.30.0 1.37.0)
venv="$root/.venv"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
step() { printf -- '--- %s\n' "$*"; }

step "tools"
if ! "$venv/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$KUBERNETES_VALIDATE_VERSION"; then
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
echo "kubernetes-validate $("$venv/bin/kubernetes-validate" --version)"
py="$venv/bin/python" # has PyYAML, a dependency of kubernetes-validate

# The manifests: every YAML under deploy/kubernetes but the kustomizations and the Helm values.
mapfile -t manifests < <(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml ! -name nats-values.yaml | sort)
[ ${#manifests[@]} -gt 0 ] || { echo "no manifest under deploy/kubernetes" >&2; exit 1; }

validate() {
  local v
  for v in "${K8S_VERSIONS[@]}"; do
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "$@"
  done
}

step "kubernetes-validate --strict (${K8S_VERSIONS[*]}): ${#manifests[@]} files"
validate "${manifests[@]}"
for f in "${manifests[@]}"; do echo "ok: $f"; done

step "kustomize builds"
if command -v kubectl >/dev/null; then
  for k in $(find deploy/kubernetes -name kustomization.yaml | sort); do
    d=$(dirname "$k")
    kubectl kustomize "$d" > "$work/rendered.yaml"
    validate "$work/rendered.yaml"
    echo "ok: $d ($(grep -c '^kind:' "$work/rendered.yaml") objects, namespace $(sed -n 's/^  namespace: //p' "$work/rendered.yaml" | sort -u | paste -sd, -))"
  done
else
  echo "skipped: no kubectl on this machine (check-deploy.py below still checks each kustomization's resources)"
fi

step "check-deploy.py (probes, limits, budgets, Services, Secret, store settings, Helm values)"
cargo build -q --bin fanout
"$py" scripts/check-deploy.py deploy target/debug/fanout

step "the checks catch what they are for"
# A misspelt field fails the schema check.
sed 's/readOnlyRootFilesystem/readOnlyRootFileSystem/' deploy/kubernetes/nats/deployment.yaml > "$work/misspelt.yaml"
if "$venv/bin/kubernetes-validate" --strict --quiet "$work/misspelt.yaml" >/dev/null 2>&1; then
  echo "kubernetes-validate --strict missed a misspelt field" >&2; exit 1
fi
echo "ok: a misspelt field fails kubernetes-validate --strict"
# Each breakage must be reported by check-deploy.py with its own line.
"$py" - "$work" <<'PY'
import shutil, subprocess, sys
from pathlib import Path
import yaml

work = Path(sys.argv[1])


def edit(path, change):
    docs = list(yaml.safe_load_all(path.read_text()))
    change(docs)
    path.write_text(yaml.safe_dump_all(docs))


def fanout_container(docs):
    return next(d for d in docs if d and d["kind"] in ("Deployment", "StatefulSet"))["spec"]["template"]["spec"]["containers"][0]


def no_readiness(docs):
    del fanout_container(docs)["readinessProbe"]


def no_limits(docs):
    del fanout_container(docs)["resources"]["limits"]


def two_replicas(docs):
    docs[0]["spec"]["replicas"] = 2


def no_secret(docs):
    pod = docs[0]["spec"]["template"]["spec"]
    pod["volumes"] = [v for v in pod["volumes"] if "secret" not in v]
    c = pod["containers"][0]
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "admin-token"]


def other_namespace(docs):
    for e in fanout_container(docs)["env"]:
        if e["name"] == "STORE":
            e["value"] = "nats://nats.default.svc:4222"


def liveness_on_api(docs):
    fanout_container(docs)["livenessProbe"]["httpGet"]["port"] = "api"


def values_in_memory(docs):
    docs[0]["config"]["jetstream"]["fileStore"]["enabled"] = False


def pdb_selects_nothing(docs):
    docs[0]["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/name": "other"}


cases = [
    ("nats/deployment.yaml", no_readiness, "no readinessProbe"),
    ("embedded/statefulset.yaml", no_limits, "no resources.limits.cpu"),
    ("embedded/statefulset.yaml", two_replicas, "2 replicas on the embedded store"),
    ("nats/deployment.yaml", no_secret, "the admin token is not read from a Secret volume"),
    ("nats/deployment.yaml", other_namespace, "STORE is nats://nats.default.svc:4222"),
    ("embedded/statefulset.yaml", liveness_on_api, "livenessProbe is /healthz on port api"),
    ("nats/nats-values.yaml", values_in_memory, "config.jetstream.fileStore.enabled is False"),
    ("nats/pdb.yaml", pdb_selects_nothing, "no PodDisruptionBudget selects its pods"),
]
for rel, change, expected in cases:
    copy = work / "deploy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree("deploy", copy)
    edit(copy / "kubernetes" / rel, change)
    r = subprocess.run([sys.executable, "scripts/check-deploy.py", str(copy), "target/debug/fanout"],
                       capture_output=True, text=True)
    if r.returncode == 0 or expected not in r.stdout:
        sys.exit(f"check-deploy.py missed: {rel} {change.__name__} (expected {expected!r}):\n{r.stdout}{r.stderr}")
    print(f"ok: {rel} {change.__name__} is caught")
# A manifest left out of its kustomization is caught too.
shutil.rmtree(work / "deploy")
shutil.copytree("deploy", work / "deploy")
(work / "deploy/kubernetes/nats/extra.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n")
r = subprocess.run([sys.executable, "scripts/check-deploy.py", str(work / "deploy"), "target/debug/fanout"],
                   capture_output=True, text=True)
if r.returncode == 0 or "extra.yaml: not listed in kustomization.yaml" not in r.stdout:
    sys.exit(f"check-deploy.py missed a manifest outside the kustomization:\n{r.stdout}")
print("ok: a manifest missing from its kustomization is caught")
PY
echo "deploy-lint: all checks passed"
