#!/usr/bin/env python3
"""What a schema cannot say about deploy/kubernetes/: that each fanout workload is fit to run, and that the pieces
agree with each other and with the binary. Run by `make deploy-lint` after kubernetes-validate.

  usage: check-deploy.py DEPLOY_DIR FANOUT_BIN

For every directory with a kustomization.yaml: it names a namespace, each resource it lists exists, and every other
manifest in the directory is listed (nothing silently left out of `kubectl apply -k`). For every workload running
the fanout image: a readiness probe on /readyz and a liveness probe on /healthz, both on the admin port (the port
METRICS_PORT says); requests and limits of cpu and memory; a PodDisruptionBudget in the same directory whose
selector matches its pods; a Service for the API (8080) and the admin port (8000) selecting them; the admin token
from a Secret volume, ADMIN_TOKEN_FILE pointing at that file; non-root, read-only root file system, no
privilege escalation, every capability dropped; env names that `FANOUT_BIN --help` knows. Then per store:
  embedded  a StatefulSet of one replica (one outbox per pool), DATA_DIR on a volumeClaimTemplate, a headless
            Service named by serviceName, no STORE;
  nats      a Deployment of three, STORE naming the NATS chart's Service in this namespace (nats-values.yaml's
            fullnameOverride), STORE_REPLICAS within the chart's cluster size, a budget of minAvailable 2; and
            nats-values.yaml parses and enables JetStream on file storage with PVCs, a cluster of three.
Exits 1 with one line per problem.
"""
import importlib.util
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
FANOUT_IMAGE = "fanout-stack/fanout"
VALUES_NAME = "nats-values.yaml"


def compose_env_check():
    """scripts/check-compose-env.py, for its reading of the binary's env names (one rule for both checks)."""
    spec = importlib.util.spec_from_file_location("check_compose_env", HERE / "check-compose-env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def dig(obj, *keys, default=None):
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return default
        obj = obj[k]
    return obj


def port_number(container: dict, port) -> int | None:
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def env_of(container: dict) -> dict:
    """name -> value (a literal, or "<from ...>" for valueFrom)."""
    out = {}
    for e in container.get("env") or []:
        out[e["name"]] = e.get("value", f"<from {next(iter(e.get('valueFrom', {})), '?')}>")
    return out


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


class Checker:
    def __init__(self, fanout_names: set[str]):
        self.problems: list[str] = []
        self.fanout_names = fanout_names
        self.workloads = 0

    def fail(self, where: str, what: str):
        self.problems.append(f"{where}: {what}")

    def directory(self, d: Path):
        kust_path = d / "kustomization.yaml"
        kust = yaml.safe_load(kust_path.read_text())
        namespace = kust.get("namespace")
        if not namespace:
            self.fail(str(kust_path), "no namespace")
        listed = kust.get("resources") or []
        for r in listed:
            if not (d / r).is_file():
                self.fail(str(kust_path), f"lists {r}, which does not exist")
        for f in sorted(d.glob("*.yaml")):
            if f.name not in ("kustomization.yaml", VALUES_NAME) and f.name not in listed:
                self.fail(str(f), "not listed in kustomization.yaml (kubectl apply -k would leave it out)")
        docs = [(d / r, doc) for r in listed if (d / r).is_file() for doc in load(d / r)]
        values = yaml.safe_load((d / VALUES_NAME).read_text()) if (d / VALUES_NAME).is_file() else None
        for path, doc in docs:
            if doc.get("kind") in ("Deployment", "StatefulSet"):
                for c in dig(doc, "spec", "template", "spec", "containers", default=[]):
                    if str(c.get("image", "")).split(":")[0] == FANOUT_IMAGE:
                        self.fanout(f"{path.relative_to(d.parent.parent.parent)} {doc['kind']}/{doc['metadata']['name']}",
                                    doc, c, docs, namespace, values)
        if values is not None:
            self.values(str(d / VALUES_NAME), values)

    def fanout(self, where, doc, c, docs, namespace, values):
        self.workloads += 1
        pod = dig(doc, "spec", "template", "spec", default={})
        labels = dig(doc, "spec", "template", "metadata", "labels", default={})
        env = env_of(c)
        admin = int(env.get("METRICS_PORT", "8000"))
        api = int(env.get("LISTEN_ADDR", "0.0.0.0:8080").rpartition(":")[2])

        for var in sorted(set(env) - self.fanout_names):
            self.fail(where, f"env {var} is not read by fanout (see its --help)")
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = dig(c, probe, "httpGet")
            if not get:
                self.fail(where, f"no {probe} (HTTP GET {path})")
            elif get.get("path") != path or port_number(c, get.get("port")) != admin:
                self.fail(where, f"{probe} is {get.get('path')} on port {get.get('port')}, not {path} on the admin port {admin}")
        for kind in ("requests", "limits"):
            for res in ("cpu", "memory"):
                if not dig(c, "resources", kind, res):
                    self.fail(where, f"no resources.{kind}.{res}")

        sc, psc = c.get("securityContext") or {}, pod.get("securityContext") or {}
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            self.fail(where, "runAsNonRoot is not set")
        if not sc.get("readOnlyRootFilesystem"):
            self.fail(where, "the root file system is not read-only")
        if sc.get("allowPrivilegeEscalation") is not False:
            self.fail(where, "allowPrivilegeEscalation is not false")
        if "ALL" not in (dig(sc, "capabilities", "drop") or []):
            self.fail(where, "capabilities are not all dropped")

        # The admin token: a Secret volume, mounted, and ADMIN_TOKEN_FILE pointing at its file.
        secret_volumes = {v["name"]: v["secret"] for v in pod.get("volumes") or [] if "secret" in v}
        token_file = env.get("ADMIN_TOKEN_FILE")
        found = False
        for m in c.get("volumeMounts") or []:
            secret = secret_volumes.get(m["name"])
            if secret is None or not token_file or not token_file.startswith(m["mountPath"].rstrip("/") + "/"):
                continue
            inside = token_file[len(m["mountPath"].rstrip("/")) + 1:]
            paths = [i["path"] for i in secret.get("items") or []] or [inside]
            if inside not in paths:
                self.fail(where, f"ADMIN_TOKEN_FILE {token_file}: the Secret {secret.get('secretName')} has no item {inside}")
            found = True
        if not found:
            self.fail(where, "the admin token is not read from a Secret volume (ADMIN_TOKEN_FILE inside its mount)")

        pdbs = [d for _, d in docs if d.get("kind") == "PodDisruptionBudget"
                and selects(dig(d, "spec", "selector", "matchLabels", default={}), labels)]
        if not pdbs:
            self.fail(where, "no PodDisruptionBudget selects its pods")
        services = [d for _, d in docs if d.get("kind") == "Service" and selects(dig(d, "spec", "selector", default={}), labels)]
        targets = {port_number(c, p.get("targetPort", p.get("port"))) for s in services
                   if dig(s, "spec", "clusterIP") != "None" for p in dig(s, "spec", "ports", default=[])}
        if not {api, admin} <= targets:
            self.fail(where, f"no Service reaches both its API port {api} and its admin port {admin}")

        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
        replicas = dig(doc, "spec", "replicas", default=1)
        if "STORE" not in env:  # the embedded store
            if doc["kind"] != "StatefulSet":
                self.fail(where, "the embedded store needs a StatefulSet (a volume per pod)")
            if replicas != 1:
                self.fail(where, f"{replicas} replicas on the embedded store: each pod would be its own outbox")
            claims = {dig(t, "metadata", "name") for t in dig(doc, "spec", "volumeClaimTemplates", default=[])}
            if mounts.get(env.get("DATA_DIR", "./data")) not in claims:
                self.fail(where, f"DATA_DIR {env.get('DATA_DIR')} is not on a volumeClaimTemplate")
            headless = [s for _, s in docs if s.get("kind") == "Service" and dig(s, "spec", "clusterIP") == "None"
                        and dig(s, "metadata", "name") == dig(doc, "spec", "serviceName")]
            if not headless:
                self.fail(where, f"no headless Service named {dig(doc, 'spec', 'serviceName')!r} (serviceName)")
        else:
            if doc["kind"] != "Deployment":
                self.fail(where, "the NATS store keeps nothing in the pod: a Deployment, not a StatefulSet")
            if replicas < 3:
                self.fail(where, f"{replicas} replicas on the NATS store: three, so that one may be lost")
            name = (values or {}).get("fullnameOverride")
            if values is None:
                self.fail(where, f"STORE is set but there is no {VALUES_NAME} beside it")
            elif env["STORE"] != f"nats://{name}.{namespace}.svc:4222":
                self.fail(where, f"STORE is {env['STORE']}, the chart's Service is nats://{name}.{namespace}.svc:4222")
            store_replicas = env.get("STORE_REPLICAS", "1")
            nodes = dig(values or {}, "config", "cluster", "replicas", default=1)
            if not store_replicas.isdigit() or not 3 <= int(store_replicas) <= nodes:
                self.fail(where, f"STORE_REPLICAS={store_replicas} with {nodes} NATS nodes (3 and at most the nodes)")
            if not any(dig(p, "spec", "minAvailable") == 2 for p in pdbs):
                self.fail(where, "its PodDisruptionBudget is not minAvailable: 2")

    def values(self, where, values):
        expect = {
            ("config", "cluster", "enabled"): True,
            ("config", "cluster", "replicas"): 3,
            ("config", "jetstream", "enabled"): True,
            ("config", "jetstream", "fileStore", "enabled"): True,
            ("config", "jetstream", "fileStore", "pvc", "enabled"): True,
            ("config", "jetstream", "memoryStore", "enabled"): False,
        }
        for keys, want in expect.items():
            have = dig(values, *keys)
            if have != want:
                self.fail(where, f"{'.'.join(keys)} is {have!r}, not {want!r}")
        if not dig(values, "config", "jetstream", "fileStore", "pvc", "size"):
            self.fail(where, "config.jetstream.fileStore.pvc.size is not set")
        if not values.get("fullnameOverride"):
            self.fail(where, "no fullnameOverride: the Service's name would follow the release's")


def main() -> int:
    deploy, fanout_bin = Path(sys.argv[1]), sys.argv[2]
    names = compose_env_check().env_names_of(fanout_bin, frozenset({"STORE", "STORE_REPLICAS", "INSTANCE"}))
    checker = Checker(names)
    dirs = sorted(p.parent for p in deploy.rglob("kustomization.yaml"))
    if not dirs:
        checker.fail(str(deploy), "no kustomization.yaml")
    for d in dirs:
        checker.directory(d)
    if checker.workloads < 2:
        checker.fail(str(deploy), f"{checker.workloads} fanout workload(s) found, expected the embedded and the NATS one")
    for p in checker.problems:
        print(f"check-deploy: {p}")
    if not checker.problems:
        print(f"check-deploy: {len(dirs)} directories, {checker.workloads} fanout workloads: probes, limits, budgets,"
              " Services, the admin token Secret and the store settings hold")
    return 1 if checker.problems else 0


if __name__ == "__main__":
    sys.exit(main())
