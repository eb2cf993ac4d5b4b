#!/usr/bin/env python3
"""`make bench-memory`: what a dead backend costs fanout in memory, what the in-flight bound does, and how the
backlog drains when the backend returns.

For each N in --counts: three demo backends and a fresh fanout (--max-pending BOUND); server3 is killed; N
writes (distinct users, ~40-byte bodies) are sent straight to fanout at a fixed rate, so that every accepted write
stays pending for server3 (in the outbox, on disk) while server1 and server2 acknowledge it. fanout's RSS is
sampled throughout. Reported: RSS before and after, RSS growth per pending delivery, the RSS when the bound was
reached (if it was), the 201 and 503 counts; then server3 comes back on its port and the report gives the
seconds to drain (fanout_deliveries_in_flight = 0) and whether the three backends hold the same users.

fanout runs with its durable outbox (a fresh one per N), RUST_LOG=warn (a retry line per attempt would be the largest cost otherwise) and a 4 s backoff
cap (so that the drain after the backend returns is measured in seconds, not in minutes of the 64 s default).
Standard library only; needs the release binaries (make bench-memory builds them).
"""
import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from benchlib import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
RESULTS = ROOT / "bench" / "results"


def rss_kib(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1))


def in_flight(metrics: str) -> float:
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
    return float(re.search(r"^fanout_deliveries_in_flight (\S+)$", text, re.M).group(1))


def users(addr: str) -> dict:
    body = json.loads(urllib.request.urlopen(f"http://{addr}/users", timeout=30).read())
    return {u["username"]: (u["version"], u["password_fingerprint"]) for u in body["users"]}


def send(api: str, n: int, rate: float, threads: int, tag: str) -> dict:
    """Sends n writes at `rate` per second over `threads` keep-alive connections; returns status counts."""
    counts: dict[int, int] = {}
    lock = threading.Lock()
    start = time.monotonic()
    host, port = api.split(":")

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        local: dict[int, int] = {}
        for i in range(k, n, threads):
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            body = f"username={tag}-{i}&password=pw{i}"
            try:
                conn.request("POST", "/register", body, {"Content-Type": "application/x-www-form-urlencoded"})
                resp = conn.getresponse()
                resp.read()
                local[resp.status] = local.get(resp.status, 0) + 1
            except (OSError, http.client.HTTPException):
                local[0] = local.get(0, 0) + 1
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
        with lock:
            for k2, v in local.items():
                counts[k2] = counts.get(k2, 0) + v

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return counts


def run_case(n: int, args, workdir: Path) -> dict:
    procs = []
    logs = workdir / f"logs-{n}"
    logs.mkdir()

    def spawn(name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        p = subprocess.Popen(cmd, env={"PATH": os.environ.get("PATH", "")} | env,
                             stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    def backend(i: int, port: int) -> subprocess.Popen:
        env = {"SERVER_NAME": f"server{i}", "SERVER_HOST": "127.0.0.1", "SERVER_PORT": str(port),
               "SKIP_SOME_REQUESTS": "false", "RUST_LOG": "warn"}
        p = spawn(f"server{i}", [str(BIN / "demo-backend")], env)
        wait_http(f"http://127.0.0.1:{port}/healthz")
        return p

    try:
        ports = [free_port() for _ in range(3)]
        servers = [backend(i + 1, p) for i, p in enumerate(ports)]
        api, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        env = {"BACKEND_POOL": ",".join(f"127.0.0.1:{p}" for p in ports), "LISTEN_ADDR": api,
               "METRICS_PORT": metrics.split(":")[1], "MAX_PENDING": str(args.max_pending),
               "INITIAL_BACKOFF": "500ms", "MAX_BACKOFF": "4s", "RUST_LOG": "warn",
               "DATA_DIR": str(workdir / f"outbox-{n}")}
        fanout = spawn("fanout", [os.environ.get("FANOUT_BIN", str(BIN / "fanout"))], env)
        wait_http(f"http://{api}/healthz")
        servers[2].kill()
        servers[2].wait()
        time.sleep(0.5)
        rss_before = rss_kib(fanout.pid)

        samples = []
        done = threading.Event()

        def sampler() -> None:
            while not done.is_set():
                samples.append((time.monotonic(), rss_kib(fanout.pid), in_flight(metrics)))
                done.wait(0.25)

        st = threading.Thread(target=sampler)
        st.start()
        t0 = time.monotonic()
        counts = send(api, n, args.rate, args.threads, f"mem{n}")
        send_seconds = time.monotonic() - t0
        time.sleep(1.0)  # let the last acks settle before the final sample
        done.set()
        st.join()
        rss_after = rss_kib(fanout.pid)
        pending = in_flight(metrics)
        at_bound = next((rss for _, rss, f in samples if f >= args.max_pending), None)

        servers[2] = backend(3, ports[2])
        t1 = time.monotonic()
        drained = False
        while time.monotonic() - t1 < args.drain_timeout:
            if in_flight(metrics) == 0:
                drained = True
                break
            time.sleep(0.2)
        drain_seconds = time.monotonic() - t1
        views = [users(f"127.0.0.1:{p}") for p in ports]
        differing = sum(1 for u in set().union(*views) if len({v.get(u) for v in views}) != 1)
        return {
            "writes": n,
            "rate_per_s": args.rate,
            "send_seconds": round(send_seconds, 1),
            "accepted_201": counts.get(201, 0),
            "refused_503": counts.get(503, 0),
            "other": {k: v for k, v in counts.items() if k not in (201, 503)},
            "pending_after_send": pending,
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "rss_at_bound_kib": at_bound,
            "kib_per_pending": round((rss_after - rss_before) / pending, 2) if pending else None,
            "drained": drained,
            "drain_seconds": round(drain_seconds, 1),
            "users_per_backend": [len(v) for v in views],
            "users_differing": differing,
            "rss_samples": [(round(t - t0, 2), rss, f) for t, rss, f in samples],
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="10000,50000,100000", help="comma list of N")
    ap.add_argument("--rate", type=float, default=1000.0, help="writes per second")
    ap.add_argument("--threads", type=int, default=4, help="sender connections")
    ap.add_argument("--max-pending", type=int, default=1000000, help="fanout's --max-pending")
    ap.add_argument("--drain-timeout", type=float, default=300.0)
    args = ap.parse_args()
    for b in ("fanout", "demo-backend"):
        if not (BIN / b).exists():
            sys.exit(f"bench-memory: {BIN / b} is missing: cargo build --release --workspace --bins")
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    results = []
    with tempfile.TemporaryDirectory(prefix="fanout-memory-") as tmp:
        for n in [int(x) for x in args.counts.split(",")]:
            r = run_case(n, args, Path(tmp))
            results.append(r)
            print(f"N={n}: 201 {r['accepted_201']}, 503 {r['refused_503']}, pending {r['pending_after_send']:.0f}, "
                  f"RSS {r['rss_before_kib']} -> {r['rss_after_kib']} KiB, drained {r['drained']} "
                  f"in {r['drain_seconds']} s, users differ {r['users_differing']}", flush=True)
    lines = [
        f"Run {started}: writes at {args.rate:.0f}/s to fanout (--max-pending {args.max_pending}) with server3 "
        "dead; then server3 returns.",
        "",
        "| writes | 201 | 503 | pending | RSS before MiB | RSS at bound MiB | RSS after MiB | KiB per pending "
        "| drain s | converged |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        bound = f'{r["rss_at_bound_kib"] / 1024:.1f}' if r["rss_at_bound_kib"] else "-"
        per = f'{r["kib_per_pending"]:.2f}' if r["kib_per_pending"] is not None else "-"
        conv = "yes" if r["drained"] and r["users_differing"] == 0 else f'NO ({r["users_differing"]} differ)'
        lines.append(
            f'| {r["writes"]} | {r["accepted_201"]} | {r["refused_503"]} | {r["pending_after_send"]:.0f} '
            f'| {r["rss_before_kib"] / 1024:.1f} | {bound} | {r["rss_after_kib"] / 1024:.1f} | {per} '
            f'| {r["drain_seconds"]} | {conv} |'
        )
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.md").write_text(text)
    (RESULTS / "memory.json").write_text(json.dumps({"started": started, "args": vars(args), "results": results}))
    print()
    print(text, end="")
    bad = [r for r in results if not r["drained"] or r["users_differing"] or r["other"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
