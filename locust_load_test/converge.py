#!/usr/bin/env python3
"""After a load test: summarises Locust's stats, waits (bounded) until fanout has no delivery in flight, and
checks that every backend holds the same users (name, version, password fingerprint).

  usage: converge.py --stats STATS_JSON --metrics URL --backend URL [--backend URL ...] [--drain-timeout S]
                     [--locust-exit N] [--metrics-header "NAME: VALUE"]

Prints one summary and exits 1 on any failed request, a drain that did not finish, or any divergence.
Standard library only.
"""
import argparse
import json
import sys
import time
import urllib.request


def fetch(url: str, header: str = "") -> str:
    """GET url; header, when given, is one "Name: value" request header."""
    req = urllib.request.Request(url)
    if header:
        name, _, value = header.partition(":")
        req.add_header(name.strip(), value.strip())
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read().decode()


def percentiles(times: dict[int, int]) -> str:
    """p50, p95 and p99 of a {ms: count} histogram, as Locust computes them (the first bucket reaching the rank)."""
    total = sum(times.values())
    out = []
    for q in (0.50, 0.95, 0.99):
        rank, seen, value = q * total, 0, 0
        for ms in sorted(times):
            seen += times[ms]
            value = ms
            if seen >= rank:
                break
        out.append(f"{value:>7}")
    return " ".join(out)


def gauge(text: str, name: str):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stats", required=True, help="Locust's --json-file output")
    ap.add_argument("--metrics", required=True, help="fanout's /metrics URL")
    ap.add_argument("--backend", action="append", required=True, help="a backend's base URL (GET /users)")
    ap.add_argument("--drain-timeout", type=float, default=120.0)
    ap.add_argument("--locust-exit", type=int, default=0)
    ap.add_argument("--metrics-header", default="", help='a "Name: value" header for --metrics (admin auth)')
    args = ap.parse_args()

    # Locust's final stats (--json-file): one entry per endpoint, response times as {rounded ms: count}.
    entries = json.load(open(args.stats))
    print("endpoint                 requests  failures     p50     p95     p99  (ms)")
    merged: dict[int, int] = {}
    requests = failures = 0
    for e in sorted(entries, key=lambda e: e["name"]):
        times = {int(float(k)): v for k, v in e["response_times"].items()}
        for k, v in times.items():
            merged[k] = merged.get(k, 0) + v
        requests += e["num_requests"]
        failures += e["num_failures"]
        name = f'{e["method"]} {e["name"]}'
        print(f'{name:<24} {e["num_requests"]:>8} {e["num_failures"]:>9} ' + percentiles(times))
    print(f'{"all":<24} {requests:>8} {failures:>9} ' + percentiles(merged))

    started = time.monotonic()
    drained = False
    while time.monotonic() - started < args.drain_timeout:
        try:
            if gauge(fetch(args.metrics, args.metrics_header), "fanout_deliveries_in_flight") == 0.0:
                drained = True
                break
        except OSError:
            pass  # not reachable (yet): keep trying until the deadline
        time.sleep(0.2)
    drain_seconds = time.monotonic() - started

    views = {}
    for url in args.backend:
        try:
            body = json.loads(fetch(url.rstrip("/") + "/users"))
        except OSError as err:
            print(f"backends converged: NO ({url}/users is unreachable: {err})")
            return 1
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
