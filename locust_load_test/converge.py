#!/usr/bin/env python3
"""After a load test: summarises Locust's stats, waits (bounded) until fanout has no delivery in flight, and
checks that every backend holds the same users (name, version, password fingerprint).

  usage: converge.py --stats PREFIX --metrics URL --backend URL [--backend URL ...] [--drain-timeout S]
                     [--locust-exit N]

Prints one summary and exits 1 on any failed request, a drain that did not finish, or any divergence.
Standard library only.
"""
import argparse
import csv
import json
import sys
import time
import urllib.request


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def gauge(text: str, name: str):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stats", required=True, help="Locust --csv prefix")
    ap.add_argument("--metrics", required=True, help="fanout's /metrics URL")
    ap.add_argument("--backend", action="append", required=True, help="a backend's base URL (GET /users)")
    ap.add_argument("--drain-timeout", type=float, default=120.0)
    ap.add_argument("--locust-exit", type=int, default=0)
    args = ap.parse_args()

    rows = list(csv.DictReader(open(f"{args.stats}_stats.csv", newline="")))
    total = next((r for r in rows if r["Name"] == "Aggregated"), None)
    print("endpoint                 requests  failures     p50     p95     p99  (ms)")
    for r in rows:
        name = "all" if r["Name"] == "Aggregated" else f'{r["Type"]} {r["Name"]}'
        print(f'{name:<24} {r["Request Count"]:>8} {r["Failure Count"]:>9} {r["50%"]:>7} {r["95%"]:>7} {r["99%"]:>7}')
    requests = int(total["Request Count"]) if total else 0
    failures = int(total["Failure Count"]) if total else 0

    started = time.monotonic()
    drained = False
    while time.monotonic() - started < args.drain_timeout:
        if gauge(fetch(args.metrics), "fanout_deliveries_in_flight") == 0.0:
            drained = True
            break
        time.sleep(0.2)
    drain_seconds = time.monotonic() - started

    views = {}
    for url in args.backend:
        body = json.loads(fetch(url.rstrip("/") + "/users"))
        views[url] = {u["username"]: (u["version"], u["password_fingerprint"]) for u in body["users"]}
    names = set().union(*(v.keys() for v in views.values()))
    differing = sorted(n for n in names if len({v.get(n) for v in views.values()}) != 1)
    counts = ", ".join(f"{url}: {len(v)} users" for url, v in views.items())

    converged = drained and not differing
    print(f"requests {requests}, failures {failures}, locust exit {args.locust_exit}")
    print(f"drained: {'yes' if drained else 'NO'} in {drain_seconds:.1f} s (fanout_deliveries_in_flight = 0)")
    print(f"backends converged: {'yes' if converged else 'NO'} ({len(differing)} users differ; {counts})")
    for name in differing[:10]:
        print(f"  differs: {name}: " + ", ".join(f"{url}={v.get(name)}" for url, v in views.items()))
    ok = converged and failures == 0 and requests > 0 and args.locust_exit == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
