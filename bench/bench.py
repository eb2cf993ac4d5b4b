#!/usr/bin/env python3
"""`make bench`: fanout side by side with its baselines, in one run, on the same three demo backends.

Scenarios (all driven by the same wrk, same threads, connections and duration):
  direct              POST /register straight to one demo backend: the per-replica limit
  nginx-proxy         GET /login through nginx to the backends: the proxying cost
  nginx-mirror        POST /register through nginx's `mirror` module to all three backends (no retries, no guarantee)
  fanout              POST /register straight to fanout, --ack first
  nginx-fanout-first  POST /register through nginx to fanout, --ack first
  nginx-fanout-all    POST /register through nginx to fanout, --ack all
  nginx-fanout-durable  as nginx-fanout-first, with the durable outbox (every write fsynced, in groups, before it
                      is sent); the other fanout scenarios above run with --no-outbox
  nginx-fanout-nats-1  as nginx-fanout-durable, with the NATS JetStream store (--store nats://...): one fanout
                      instance on one nats-server (--store-replicas 1)
  nginx-fanout-nats-3  the same with three fanout instances on a three-node JetStream cluster (--store-replicas 3),
                      behind one nginx listing the three
  nginx-fanout-durable-baseline  only with --baseline-bin DIR: as nginx-fanout-durable, with DIR/fanout (another
                      build, e.g. an older commit's) behind its own nginx, with its own data dir
The two NATS scenarios are on by default (--no-nats leaves them out, and nats-server need not be installed then).

Concurrencies: --connections takes a comma list (default 32,256) and --threads a list matched by position (one
value applies to every connection count; by default 1 thread up to 32 connections, else 2: wrk -t1 -c32, then
-t2 -c256). Every (scenario, concurrency) pair is a row. Each round runs every scenario at the first concurrency,
then every scenario at the next, and so on (A B C ... at c32, A B C ... at c256), for --rounds rounds; each run is
preceded by a short warm-up that is not counted and, for the fanout scenarios, waits until fanout is idle (see
wait_idle: no delivery in flight; on the NATS store, no write left in any consumer either).

The report gives, per concurrency, one table with, per scenario, the median over rounds and the spread (min-max)
of requests/s, the median p50/p90/p99 latency, the non-2xx count (socket errors included), and the median of:
  fanout peak RSS MiB      fanout's VmHWM, reset before each run (fanout scenarios; with several instances, the
                           largest instance's)
  fanout CPU s / 1k req    fanout's utime+stime (all instances of the scenario together) from the start of the
                           run until fanout is idle again, so that it covers every counted write's delivery to all
                           three backends
  NATS CPU s / 1k req      the same window's utime+stime of the scenario's nats-server processes (all nodes), for
                           the NATS store; the embedded store's work is inside fanout's process, in its column
  nginx CPU s / 1k req     utime+stime of that scenario's nginx instance, master and workers (the master's
                           children), during the run (every scenario through nginx)
  total CPU s / 1k req     fanout + NATS + nginx: the load-balancing tier's CPU, whichever of them the scenario
                           goes through (the backends' and wrk's CPU are not counted)
Then, per concurrency, the ratios (medians over medians):
  nginx-fanout-durable / nginx-mirror: throughput, p99
  fanout CPU per durable write / nginx CPU per mirrored write: fanout's CPU s/1k in nginx-fanout-durable over
      nginx's CPU s/1k in nginx-mirror
  nginx-fanout-first / nginx-mirror: throughput, p99
  fanout / direct: throughput, p99
  nginx-fanout-durable / nginx-fanout-first (durable / in memory): throughput, p99
  nginx-fanout-nats-1 / nginx-fanout-durable and nginx-fanout-nats-3 / nginx-fanout-durable (NATS / embedded):
      throughput, p99, CPU per write of fanout alone, and of fanout and its store (fanout + NATS over fanout)
  nginx-fanout-durable / baseline (with --baseline-bin): throughput, p99, fanout CPU per write
Before the first round the NATS tiers are left idle for a few seconds and their CPU per second is reported: the
pulls that wait on every consumer cost a little even with no write, during every scenario.
Output: the tables and ratios on stdout and in bench/results/bench.md; every raw run, the medians and the ratios in
bench/results/bench.json; with --workdir DIR, every process's log and store stay in DIR. Exits non-zero when any
request failed (non-2xx or socket error). This machine is shared and noisy: absolute numbers drift between runs,
ratios within one run hold.

Standard library only. Needs wrk, nginx (Debian's), nats-server (Debian's, unless --no-nats) and the release
binaries (make bench builds them).
"""
import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchlib import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
RESULTS = ROOT / "bench" / "results"
SCENARIOS = ["direct", "nginx-proxy", "nginx-mirror", "fanout", "nginx-fanout-first", "nginx-fanout-all",
             "nginx-fanout-durable"]
NATS_SCENARIOS = ["nginx-fanout-nats-1", "nginx-fanout-nats-3"]
BASELINE = "nginx-fanout-durable-baseline"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# fanout on the NATS store reads its consumers' lag (fanout_pending_deliveries, and the in-flight gauge made of
# it) from the servers every 2 s (STATS_INTERVAL in crates/fanout/src/jetstream/mod.rs): a reading is trusted as
# "idle" only once this long has passed since the load ended, so that it comes from a read made after the end.
NATS_STATS_FRESH = 3.0
# How long fanout on the NATS store may take to answer /healthz: it makes or checks its streams, buckets and one
# consumer per (backend, partition) first, each replicated three times on the cluster.
NATS_START = 120.0
# Seconds the NATS tiers are left idle before the first round, to report what they cost with no write.
NATS_IDLE_SAMPLE = 5.0


class Stack:
    """Three demo backends; fanout tiers (ack first, ack all, durable; with NATS, one instance on one nats-server
    and three instances on a three-node JetStream cluster; with a baseline build, a durable fanout from it), each
    behind its own nginx, plus an nginx with the mirror module; every one on a free loopback port, all stopped by
    close().

    A tier is a dict: "instances" (each with "proc", "api", "metrics"), "nats" (the nats-server processes of its
    store, empty for the embedded store)."""

    def __init__(self, workdir: Path, nginx: str, baseline_bin: Path | None = None, nats_bin: str | None = None):
        self.procs: list[subprocess.Popen] = []
        self.workdir = workdir
        logs = workdir / "logs"
        logs.mkdir(parents=True)
        self.logs = logs
        self.backends = []
        for i in (1, 2, 3):
            port = free_port()
            env = {"SERVER_NAME": f"server{i}", "SERVER_HOST": "127.0.0.1", "SERVER_PORT": str(port),
                   "SKIP_SOME_REQUESTS": "false", "RUST_LOG": "warn"}
            p = self.spawn(f"server{i}", [str(BIN / "demo-backend")], env)
            wait_http(f"http://127.0.0.1:{port}/healthz", p, f"server{i}")
            self.backends.append(f"127.0.0.1:{port}")
        self.fanout = {}
        for name, ack, durable, bindir in [("first", "first", False, BIN), ("all", "all", False, BIN),
                                           ("durable", "first", True, BIN)]:
            self.fanout[name] = {"instances": [self.fanout_instance(name, bindir, {
                "ACK_POLICY": ack, "NO_OUTBOX": "false" if durable else "true"})], "nats": []}
        if baseline_bin is not None:
            self.fanout["baseline"] = {"instances": [self.fanout_instance("baseline", baseline_bin, {
                "ACK_POLICY": "first", "NO_OUTBOX": "false"})], "nats": []}
        if nats_bin is not None:
            for nodes in (1, 3):
                name = f"nats-{nodes}"
                servers = self.nats_cluster(name, nats_bin, nodes)
                store = ",".join(url for url, _ in servers)
                instances = [self.fanout_instance(f"{name}-{i}", BIN, {
                    "ACK_POLICY": "first", "STORE": store, "STORE_REPLICAS": str(nodes), "INSTANCE": f"bench{i}"},
                    timeout=NATS_START) for i in range(1, nodes + 1)]
                self.fanout[name] = {"instances": instances, "nats": [p for _, p in servers]}
        self.nginx = {}
        fronts = [(name, None, tier) for name, tier in self.fanout.items()]
        fronts.append(("mirror", ROOT / "bench" / "nginx-mirror.conf.template", None))
        for name, template, tier in fronts:
            port = free_port()
            prefix = workdir / f"nginx-{name}"
            env = dict(os.environ, BACKEND_1=self.backends[0], BACKEND_2=self.backends[1],
                       BACKEND_3=self.backends[2], NGINX_LISTEN=f"127.0.0.1:{port}")
            if tier:
                env.update(LB=",".join(i["api"] for i in tier["instances"]),
                           LB_METRICS=",".join(i["metrics"] for i in tier["instances"]))
            args = [str(ROOT / "nginx" / "render.sh"), str(prefix)] + ([str(template)] if template else [])
            subprocess.run(args, env=env, check=True)
            p = self.spawn(f"nginx-{name}", [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                             "-e", str(prefix / "logs" / "error.log")], {})
            if tier:
                wait_http(f"http://127.0.0.1:{port}/nginx_status", p, f"nginx-{name}")
            else:  # the mirror config has no status page: its port opening is enough
                self.wait_port(port, p, f"nginx-{name}")
            self.nginx[name] = {"proc": p, "addr": f"127.0.0.1:{port}"}

    def spawn(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        full_env = {"PATH": os.environ.get("PATH", "")} | env
        log = open(self.logs / f"{name}.log", "w")
        p = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def fanout_instance(self, name: str, bindir: Path, extra: dict, timeout: float = 20.0) -> dict:
        """Starts one fanout process on the three backends with `extra` settings (env names) and waits for it."""
        api, metrics = free_port(), free_port()
        env = {"BACKEND_POOL": ",".join(self.backends), "LISTEN_ADDR": f"127.0.0.1:{api}",
               "METRICS_PORT": str(metrics), "RUST_LOG": "info", "DATA_DIR": str(self.workdir / f"outbox-{name}")}
        p = self.spawn(f"fanout-{name}", [str(bindir / "fanout")], env | extra)
        wait_http(f"http://127.0.0.1:{api}/healthz", p, f"fanout-{name}", timeout=timeout)
        return {"proc": p, "api": f"127.0.0.1:{api}", "metrics": f"127.0.0.1:{metrics}"}

    def nats_cluster(self, name: str, nats_bin: str, nodes: int) -> list[tuple[str, subprocess.Popen]]:
        """Starts `nodes` nats-server processes with JetStream (one alone, or several routed into one cluster),
        each with its own store directory; returns (client URL, process) per node once each is ready and, for a
        cluster, once each has seen the JetStream metadata leader elected."""
        ports = [free_port() for _ in range(nodes)]
        routes = [free_port() for _ in range(nodes)]
        out = []
        for i in range(nodes):
            args = [nats_bin, "-js", "-a", "127.0.0.1", "-p", str(ports[i]), "-sd", str(self.workdir / f"{name}-n{i}"),
                    "--server_name", f"{name}-n{i}"]
            if nodes > 1:
                args += ["--cluster_name", name, "--cluster", f"nats://127.0.0.1:{routes[i]}",
                         "--routes", ",".join(f"nats://127.0.0.1:{r}" for r in routes)]
            log = f"{name}-n{i}"
            p = self.spawn(log, args, {})
            self.wait_log(log, "Server is ready", p, 20)
            out.append((f"nats://127.0.0.1:{ports[i]}", p))
        if nodes > 1:
            for i, (_, p) in enumerate(out):
                self.wait_log(f"{name}-n{i}", "metadata leader", p, 60)
        return out

    def wait_log(self, log: str, text: str, proc: subprocess.Popen, timeout: float) -> None:
        path = self.logs / f"{log}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in path.read_text(errors="replace"):
                return
            if proc.poll() is not None:
                sys.exit(f"bench: {log} exited with {proc.returncode} (see {path})")
            time.sleep(0.05)
        sys.exit(f"bench: {log} did not log {text!r} within {timeout:.0f} s (see {path})")

    @staticmethod
    def wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                sys.exit(f"bench: {what} exited with {proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        sys.exit(f"bench: {what} did not listen on {port}")

    def target(self, scenario: str):
        """(URL, method, fanout tier or None, nginx instance or None) of a scenario."""
        n, f = self.nginx, self.fanout
        if scenario == "direct":
            return f"http://{self.backends[0]}/register", "POST", None, None
        if scenario == "nginx-proxy":
            return f"http://{n['first']['addr']}/login", "GET", None, n["first"]
        if scenario == "nginx-mirror":
            return f"http://{n['mirror']['addr']}/register", "POST", None, n["mirror"]
        if scenario == "fanout":
            return f"http://{f['first']['instances'][0]['api']}/register", "POST", f["first"], None
        tier = {"nginx-fanout-first": "first", "nginx-fanout-all": "all", "nginx-fanout-durable": "durable",
                "nginx-fanout-nats-1": "nats-1", "nginx-fanout-nats-3": "nats-3", BASELINE: "baseline"}[scenario]
        return f"http://{n[tier]['addr']}/register", "POST", f[tier], n[tier]

    def close(self) -> None:
        """Stops every process, the last started first (nginx before fanout, fanout before its NATS servers)."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=35)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def children(pid: int) -> set[int]:
    """The live child processes of `pid`: from /proc/PID/task/*/children, or, on a kernel without that file, by
    scanning /proc/*/stat for ppid == pid."""
    try:
        kids = set()
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids.update(int(k) for k in (task / "children").read_text().split())
        return kids
    except OSError:
        pass
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.add(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return kids


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of `pid` and each of its children (an nginx master and its workers), per pid."""
    out = {}
    for p in {pid} | children(pid):
        try:
            out[p] = cpu_seconds(p)
        except OSError:  # exited between the listing and the read
            continue
    return out


def tree_cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU spent between two tree_cpu() snapshots; a worker that appeared in between counts from zero."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def reset_peak_rss(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def peak_rss_mib(pid: int) -> float:
    m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) / 1024


def metric_values(text: str, name: str) -> list[float]:
    """Every sample of metric `name` in a Prometheus text page, whatever its labels."""
    return [float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)]


def tier_busy(tier: dict) -> bool:
    """True while any instance of the tier reports a delivery in flight or, on the NATS store, a write left in a
    backend's consumers (the sum of fanout_pending_deliveries). A build without the gauges (an old baseline)
    reads as idle."""
    for inst in tier["instances"]:
        text = urllib.request.urlopen(f"http://{inst['metrics']}/metrics", timeout=5).read().decode()
        gauges = metric_values(text, "fanout_deliveries_in_flight")
        if tier["nats"]:
            gauges += metric_values(text, "fanout_pending_deliveries")
        if any(v != 0 for v in gauges):
            return True
    return False


def wait_idle(tier: dict, load_ended: float | None = None, timeout: float = 60) -> bool:
    """Waits until the tier is idle (tier_busy), so that runs do not overlap and a run's CPU covers its writes'
    deliveries. On the NATS store the gauges come from a read of the consumers every 2 s, so after a load (which
    ended at monotonic time `load_ended`) no reading counts before NATS_STATS_FRESH has passed. Returns False when
    `timeout` passed first (the run is kept, and flagged)."""
    if tier["nats"] and load_ended is not None:
        time.sleep(max(0.0, load_ended + NATS_STATS_FRESH - time.monotonic()))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not tier_busy(tier):
            return True
        time.sleep(0.1)
    return False


def procs_cpu(procs: list[subprocess.Popen]) -> float:
    return sum(cpu_seconds(p.pid) for p in procs)


def idle_cost(stack: Stack, seconds: float) -> dict:
    """CPU seconds per second that each NATS tier's fanout instances and nats-server nodes spend with no write."""
    tiers = {name: t for name, t in stack.fanout.items() if t["nats"]}
    if not tiers:
        return {}
    for t in tiers.values():
        wait_idle(t, time.monotonic())
    procs = {name: ([i["proc"] for i in t["instances"]], t["nats"]) for name, t in tiers.items()}
    before = {name: (procs_cpu(f), procs_cpu(n)) for name, (f, n) in procs.items()}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return {name: {"fanout_cpu_per_s": (procs_cpu(f) - before[name][0]) / elapsed,
                   "nats_cpu_per_s": (procs_cpu(n) - before[name][1]) / elapsed}
            for name, (f, n) in procs.items()}


def wrk(url: str, method: str, threads: int, conns: int, seconds: int) -> dict:
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s",
           "-s", str(ROOT / "bench" / "wrk.lua"), url, "--", method]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("BENCH "))
    return json.loads(line[len("BENCH "):])


def run_one(stack: Stack, scenario: str, threads: int, conns: int, args) -> dict:
    url, method, tier, nginx = stack.target(scenario)
    if tier:
        wait_idle(tier)
    wrk(url, method, threads, conns, args.warmup)  # warm-up, not counted
    if tier:
        idle_before = wait_idle(tier, time.monotonic())
        fanout_procs = [i["proc"] for i in tier["instances"]]
        rss_reset = all([reset_peak_rss(p.pid) for p in fanout_procs])
        fanout_before = [cpu_seconds(p.pid) for p in fanout_procs]
        nats_before = procs_cpu(tier["nats"])
    if nginx:
        nginx_before = tree_cpu(nginx["proc"].pid)
    r = wrk(url, method, threads, conns, args.duration)
    ended = time.monotonic()
    if nginx:
        nginx_after = tree_cpu(nginx["proc"].pid)
    requests = max(r["requests"], 1)
    result = {
        "rps": r["requests"] / (r["duration_us"] / 1e6),
        "requests": r["requests"],
        "duration_s": r["duration_us"] / 1e6,
        "p50_ms": r["p50_us"] / 1000,
        "p90_ms": r["p90_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "non2xx": r["non2xx"],
        "socket_errors": r["socket_errors"],
    }
    if nginx:
        result["nginx_cpu_s"] = tree_cpu_delta(nginx_before, nginx_after)
        result["nginx_cpu_s_per_1k"] = result["nginx_cpu_s"] / requests * 1000
        result["nginx_processes"] = len(nginx_after)
    if tier:
        # The deliveries of the counted writes that were still in flight belong to them.
        idle_after = wait_idle(tier, ended)
        result["idle_wait_s"] = time.monotonic() - ended
        by_instance = [cpu_seconds(p.pid) - b for p, b in zip(fanout_procs, fanout_before)]
        result["fanout_cpu_s"] = sum(by_instance)
        result["fanout_cpu_s_per_1k"] = result["fanout_cpu_s"] / requests * 1000
        result["peak_rss_mib"] = max(peak_rss_mib(p.pid) for p in fanout_procs)
        result["peak_rss_since_start"] = not rss_reset
        if len(fanout_procs) > 1:
            result["fanout_cpu_s_by_instance"] = by_instance
        if tier["nats"]:
            result["nats_cpu_s"] = procs_cpu(tier["nats"]) - nats_before
            result["nats_cpu_s_per_1k"] = result["nats_cpu_s"] / requests * 1000
        if not (idle_before and idle_after):
            result["not_idle"] = "before the run" if not idle_before else "60 s after the run"
    if nginx or tier:
        result["total_cpu_s_per_1k"] = sum(result.get(k, 0.0) for k in (
            "nginx_cpu_s_per_1k", "fanout_cpu_s_per_1k", "nats_cpu_s_per_1k"))
    return result


def summarize(runs: dict) -> dict:
    out = {}
    for name, rs in runs.items():
        rps = [r["rps"] for r in rs]
        s = {
            "rounds": len(rs),
            "rps_median": statistics.median(rps),
            "rps_min": min(rps),
            "rps_max": max(rps),
            "p50_ms": statistics.median(r["p50_ms"] for r in rs),
            "p90_ms": statistics.median(r["p90_ms"] for r in rs),
            "p99_ms": statistics.median(r["p99_ms"] for r in rs),
            "non2xx": sum(r["non2xx"] for r in rs),
            "socket_errors": sum(r["socket_errors"] for r in rs),
        }
        for key in ("fanout_cpu_s_per_1k", "nats_cpu_s_per_1k", "nginx_cpu_s_per_1k", "total_cpu_s_per_1k"):
            if key in rs[0]:
                s[key] = statistics.median(r[key] for r in rs)
        if "peak_rss_mib" in rs[0]:
            s["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rs)
        not_idle = sum(1 for r in rs if "not_idle" in r)
        if not_idle:
            s["runs_not_idle"] = not_idle
        out[name] = s
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(summary: dict) -> dict:
    """The ratios of one concurrency, as numbers (None where a denominator is zero or missing)."""
    def get(scn, key):
        return summary.get(scn, {}).get(key)

    def pair(a, b):
        return {"throughput": ratio(get(a, "rps_median"), get(b, "rps_median")),
                "p99": ratio(get(a, "p99_ms"), get(b, "p99_ms"))}

    out = {
        "nginx-fanout-durable / nginx-mirror": pair("nginx-fanout-durable", "nginx-mirror"),
        "fanout CPU per durable write / nginx CPU per mirrored write": ratio(
            get("nginx-fanout-durable", "fanout_cpu_s_per_1k"), get("nginx-mirror", "nginx_cpu_s_per_1k")),
        "nginx-fanout-first / nginx-mirror": pair("nginx-fanout-first", "nginx-mirror"),
        "fanout / direct": pair("fanout", "direct"),
        "nginx-fanout-durable / nginx-fanout-first": pair("nginx-fanout-durable", "nginx-fanout-first"),
    }
    for nats in NATS_SCENARIOS:
        if nats in summary:
            store_cpu = get(nats, "fanout_cpu_s_per_1k") + get(nats, "nats_cpu_s_per_1k")
            out[f"{nats} / nginx-fanout-durable"] = pair(nats, "nginx-fanout-durable") | {
                "fanout_cpu_per_write": ratio(get(nats, "fanout_cpu_s_per_1k"),
                                              get("nginx-fanout-durable", "fanout_cpu_s_per_1k")),
                "fanout_and_store_cpu_per_write": ratio(store_cpu, get("nginx-fanout-durable", "fanout_cpu_s_per_1k")),
                "total_cpu_per_write": ratio(get(nats, "total_cpu_s_per_1k"),
                                             get("nginx-fanout-durable", "total_cpu_s_per_1k")),
            }
    if BASELINE in summary:
        out["nginx-fanout-durable / baseline"] = pair("nginx-fanout-durable", BASELINE) | {
            "fanout_cpu_per_write": ratio(get("nginx-fanout-durable", "fanout_cpu_s_per_1k"),
                                          get(BASELINE, "fanout_cpu_s_per_1k"))}
    return out


def fmt_x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def report(results: list, scenarios: list, args, started: str, idle: dict) -> str:
    concs = ", ".join(f"-t{c['threads']} -c{c['connections']}" for c in results)
    lines = [
        f"Run {started}: {args.rounds} round(s) x {len(scenarios)} scenarios x {len(results)} concurrencies "
        f"(wrk {concs}), -d{args.duration}s each (after a {args.warmup}s warm-up), {os.cpu_count()} CPUs shared "
        "by wrk, nginx, fanout and the backends."
        + (f" Baseline fanout: {args.baseline_bin}/fanout." if args.baseline_bin else ""),
    ]
    if args.nats:
        version = subprocess.run([args.nats_server, "--version"], capture_output=True, text=True).stdout.strip()
        lines[0] += (f" NATS store: {version or args.nats_server}, fanout's default --partitions (16), --ack first;"
                     " nats-1: one instance on one node (replicas 1), nats-3: three instances on three nodes"
                     " (replicas 3).")
    if idle:
        lines += ["", "Idle, before the first round (no write; CPU seconds per second): " + "; ".join(
            f'nginx-fanout-{name}: fanout {c["fanout_cpu_per_s"]:.3f}, NATS {c["nats_cpu_per_s"]:.3f}'
            for name, c in idle.items()) + ". NATS CPU per write counts this too."]

    def cell(s, key, fmt):
        return fmt.format(s[key]) if key in s else ""

    for c in results:
        summary, rt = c["summary"], c["ratios"]
        lines += [
            "",
            f"### wrk -t{c['threads']} -c{c['connections']}",
            "",
            "| scenario | req/s (median) | spread (min-max) | p50 ms | p90 ms | p99 ms | non-2xx | fanout peak RSS MiB "
            "| fanout CPU s / 1k req | NATS CPU s / 1k req | nginx CPU s / 1k req | total CPU s / 1k req |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in scenarios:
            s = summary[name]
            lines.append(
                f'| {name} | {s["rps_median"]:.0f} | {s["rps_min"]:.0f}-{s["rps_max"]:.0f} | {s["p50_ms"]:.2f} '
                f'| {s["p90_ms"]:.2f} | {s["p99_ms"]:.2f} | {s["non2xx"] + s["socket_errors"]} '
                f'| {cell(s, "peak_rss_mib", "{:.1f}")} | {cell(s, "fanout_cpu_s_per_1k", "{:.3f}")} '
                f'| {cell(s, "nats_cpu_s_per_1k", "{:.3f}")} '
                f'| {cell(s, "nginx_cpu_s_per_1k", "{:.3f}")} | {cell(s, "total_cpu_s_per_1k", "{:.3f}")} |'
            )

        def tp(key):
            return f'throughput {fmt_x(rt[key]["throughput"])}, p99 {fmt_x(rt[key]["p99"])}'

        lines += [
            "",
            f'nginx-fanout-durable / nginx-mirror: {tp("nginx-fanout-durable / nginx-mirror")}',
            "fanout CPU per durable write / nginx CPU per mirrored write: "
            f'{fmt_x(rt["fanout CPU per durable write / nginx CPU per mirrored write"])}',
            f'nginx-fanout-first / nginx-mirror: {tp("nginx-fanout-first / nginx-mirror")}',
            f'fanout / direct: {tp("fanout / direct")}',
            "nginx-fanout-durable / nginx-fanout-first (durable / in memory): "
            f'{tp("nginx-fanout-durable / nginx-fanout-first")}',
        ]
        for nats in NATS_SCENARIOS:
            key = f"{nats} / nginx-fanout-durable"
            if key in rt:
                n = rt[key]
                lines.append(f"{nats} / nginx-fanout-durable (NATS / embedded): {tp(key)}, CPU per write: fanout "
                             f'{fmt_x(n["fanout_cpu_per_write"])}, fanout + store '
                             f'{fmt_x(n["fanout_and_store_cpu_per_write"])}, tier {fmt_x(n["total_cpu_per_write"])}')
        flagged = [f'{name} ({s["runs_not_idle"]} run(s))' for name, s in summary.items() if "runs_not_idle" in s]
        if flagged:
            lines.append("Not idle within 60 s around a run (its CPU misses part of its deliveries): "
                         + ", ".join(flagged))
        if "nginx-fanout-durable / baseline" in rt:
            b = rt["nginx-fanout-durable / baseline"]
            lines.append(f'nginx-fanout-durable / baseline: {tp("nginx-fanout-durable / baseline")}, '
                         f'fanout CPU per write {fmt_x(b["fanout_cpu_per_write"])}')
    return "\n".join(lines) + "\n"


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of uncounted warm-up before each run")
    ap.add_argument("--connections", type=int_list, default=[32, 256],
                    help="wrk connections, a comma list: one table per value (default 32,256)")
    ap.add_argument("--threads", type=int_list, default=None,
                    help="wrk threads, a comma list matched by position with --connections, or one value for all "
                         "(default: 1 for up to 32 connections, else 2, i.e. 1,2 for 32,256)")
    ap.add_argument("--baseline-bin", type=Path, default=None, metavar="DIR",
                    help="a directory holding another fanout build: adds nginx-fanout-durable-baseline and its ratios")
    ap.add_argument("--nats", action=argparse.BooleanOptionalAction, default=True,
                    help="the NATS store's scenarios, nginx-fanout-nats-1 and -3 (default on; --no-nats leaves them "
                         "out)")
    ap.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                    help="keep the processes' logs and stores in DIR (a new directory) instead of a temporary one "
                         "removed at the end")
    ap.add_argument("--nginx", default=os.environ.get("NGINX_BIN", "nginx"))
    ap.add_argument("--nats-server", default=os.environ.get("NATS_SERVER_BIN", "nats-server"))
    args = ap.parse_args()
    if args.threads is None:
        args.threads = [1 if c <= 32 else 2 for c in args.connections]
    if len(args.threads) == 1:
        args.threads = args.threads * len(args.connections)
    if len(args.threads) != len(args.connections):
        ap.error(f"--threads has {len(args.threads)} values, --connections {len(args.connections)}")
    concurrencies = list(zip(args.threads, args.connections))
    if len(set(concurrencies)) != len(concurrencies):
        ap.error("a (threads, connections) pair is given twice")
    if any(t > c for t, c in concurrencies):
        ap.error("wrk needs at least as many connections as threads")
    for tool in ("wrk", args.nginx) + ((args.nats_server,) if args.nats else ()):
        if not (Path(tool).exists() or any((Path(d) / tool).exists() for d in os.environ["PATH"].split(":"))):
            sys.exit(f"bench: {tool} is missing (apt-get install wrk nginx nats-server; or --no-nats)")
    for b in ("fanout", "demo-backend"):
        if not (BIN / b).exists():
            sys.exit(f"bench: {BIN / b} is missing: cargo build --release --workspace --bins")
    if args.baseline_bin is not None:
        args.baseline_bin = args.baseline_bin.resolve()
        if not os.access(args.baseline_bin / "fanout", os.X_OK):
            sys.exit(f"bench: {args.baseline_bin / 'fanout'} is missing or not executable (--baseline-bin)")
    scenarios = SCENARIOS + (NATS_SCENARIOS if args.nats else []) + ([BASELINE] if args.baseline_bin else [])

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    clock = time.monotonic()
    runs = {tc: {name: [] for name in scenarios} for tc in concurrencies}
    if args.workdir is not None:
        args.workdir = args.workdir.resolve()
        args.workdir.mkdir(parents=True)  # refuses an existing one: the logs of two runs would mix
    with tempfile.TemporaryDirectory(prefix="fanout-bench-") as tmp:
        stack = Stack(args.workdir or Path(tmp), args.nginx, args.baseline_bin, args.nats_server if args.nats else None)
        try:
            print(f"stack up in {time.monotonic() - clock:.0f} s", flush=True)
            idle = idle_cost(stack, NATS_IDLE_SAMPLE)
            for rnd in range(1, args.rounds + 1):
                for threads, conns in concurrencies:
                    for name in scenarios:
                        began = time.monotonic()
                        r = run_one(stack, name, threads, conns, args)
                        r["wall_s"] = time.monotonic() - began
                        runs[(threads, conns)][name].append(r)
                        cpu = "".join(f"  {label} {r[key]:.3f}" for label, key in (
                            ("fanout CPU/1k", "fanout_cpu_s_per_1k"), ("NATS CPU/1k", "nats_cpu_s_per_1k"),
                            ("nginx CPU/1k", "nginx_cpu_s_per_1k")) if key in r)
                        flag = f"  NOT IDLE {r['not_idle']}" if "not_idle" in r else ""
                        print(f"round {rnd} -t{threads} -c{conns:<4} {name:<30} {r['rps']:>8.0f} req/s  "
                              f"p99 {r['p99_ms']:.2f} ms  non-2xx {r['non2xx'] + r['socket_errors']}{cpu}{flag}",
                              flush=True)
        finally:
            stack.close()
    results = []
    for (threads, conns), by_scenario in runs.items():
        summary = summarize(by_scenario)
        results.append({"threads": threads, "connections": conns, "summary": summary, "ratios": ratios(summary),
                        "runs": by_scenario})
    elapsed = time.monotonic() - clock
    text = report(results, scenarios, args, started, idle) + f"\nThe run took {elapsed / 60:.1f} min.\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench.md").write_text(text)
    args_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (RESULTS / "bench.json").write_text(json.dumps({"started": started, "args": args_json, "scenarios": scenarios,
                                                    "cpus": os.cpu_count(), "clk_tck": CLK_TCK,
                                                    "elapsed_s": elapsed, "nats_idle": idle,
                                                    "concurrencies": results}, indent=2))
    print()
    print(text, end="")
    errors = sum(s["non2xx"] + s["socket_errors"] for c in results for s in c["summary"].values())
    if errors:
        print(f"bench: {errors} requests failed (non-2xx or socket errors): the numbers above are not comparable")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
