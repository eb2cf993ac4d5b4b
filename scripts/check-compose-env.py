#!/usr/bin/env python3
"""No drift between the Docker path and the local path: the environment variables that docker-compose.yml gives
each service are the ones its program reads.

  usage: check-compose-env.py COMPOSE_JSON FANOUT_BIN DEMO_BACKEND_BIN

COMPOSE_JSON is `docker compose config --format json` of docker-compose.yml. The names each binary reads come from
its own `--help` (clap prints `[env: NAME=...]`), the template's from its `${NAME}` references, and render.sh's
(the local renderer) from its `vars=` line. Exits 1 with one line per problem.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALWAYS_ALLOWED = {"RUST_LOG"}  # read by tracing's EnvFilter in both binaries


def env_names_of(binary: str) -> set[str]:
    help_text = subprocess.run([binary, "--help"], check=True, capture_output=True, text=True).stdout
    names = set(re.findall(r"\[env: ([A-Z0-9_]+)", help_text))
    if not names:
        sys.exit(f"check-compose-env: no [env: ...] in {binary} --help")
    return names | ALWAYS_ALLOWED


def main() -> int:
    compose_json, fanout_bin, demo_bin = sys.argv[1:4]
    services = json.loads(Path(compose_json).read_text())["services"]
    readers = {"fanout": env_names_of(fanout_bin), "demo-backend": env_names_of(demo_bin)}
    template = (ROOT / "nginx/default.conf.template").read_text()
    template_vars = set(re.findall(r"\$\{([A-Z0-9_]+)\}", template))
    render = (ROOT / "nginx/render.sh").read_text()
    render_vars = set(re.search(r"^vars='([^']*)'", render, re.M).group(1).split())
    problems = []
    if template_vars != render_vars:
        problems.append(f"nginx/render.sh substitutes {sorted(render_vars)} but the template uses {sorted(template_vars)}")

    # A service runs the program of its build target, or, without a `build:` section, of the service that builds
    # its image (server2 and server3 run the image server1 builds).
    built = {svc.get("image"): (svc.get("build") or {}).get("target") for svc in services.values() if svc.get("build")}

    def target_of(svc: dict):
        return (svc.get("build") or {}).get("target") or built.get(svc.get("image"))

    seen_targets = set()
    for name, svc in services.items():
        env = set((svc.get("environment") or {}).keys())
        target = target_of(svc)
        if target:
            seen_targets.add(target)
            if target not in readers:
                problems.append(f"service {name}: unknown build target {target!r}")
                continue
            for var in sorted(env - readers[target]):
                problems.append(f"service {name}: {var} is not read by {target} (see its --help)")
        elif svc.get("image", "").startswith("nginx:"):
            for var in sorted(template_vars - env):
                problems.append(f"service {name}: the template needs {var}, which is not set")
            for var in sorted(env - template_vars):
                problems.append(f"service {name}: {var} is set but the template does not use it")

    # fanout's pool names services of the demo-backend image, on the port they listen on.
    for name, svc in services.items():
        pool = (svc.get("environment") or {}).get("BACKEND_POOL")
        if not pool:
            continue
        for entry in pool.split(","):
            host, _, port = entry.strip().rpartition(":")
            backend = services.get(host)
            if backend is None or target_of(backend) != "demo-backend":
                problems.append(f"service {name}: BACKEND_POOL entry {entry!r} is not a demo-backend service")
            elif (backend.get("environment") or {}).get("SERVER_PORT") != port:
                problems.append(f"service {name}: {entry!r} but {host} listens on SERVER_PORT={backend['environment'].get('SERVER_PORT')}")

    for needed in ("fanout", "demo-backend"):
        if needed not in seen_targets:
            problems.append(f"no service builds the {needed} target")
    flaky = [n for n, s in services.items() if (s.get("environment") or {}).get("SKIP_SOME_REQUESTS") == "true"]
    if len(flaky) != 1:
        problems.append(f"exactly one backend should have SKIP_SOME_REQUESTS=true (the original's setup), got {flaky}")

    for p in problems:
        print(f"check-compose-env: {p}")
    if not problems:
        print(f"check-compose-env: {len(services)} services, every variable is read by its program")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
