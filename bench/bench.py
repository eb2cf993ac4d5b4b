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
                      is sent); the other fanout scenarios run with --no-outbox
  nginx-fanout-durable-baseline  only with --baseline-bin DIR: as nginx-fanout-durable, with DIR/fanout (another
                      build, e.g. an older commit's) behind its own nginx, with its own data dir

Concurrencies: --connections takes a comma list (default 32,256) and --threads a list matched by position (one
value applies to every connection count; by default 1 thread up to 32 connections, else 2: wrk -t1 -c32, then
-t2 -c256). Every (scenario, concurrency) pair is a row. Each round runs every scenario at the first concurrency,
then every scenario at the next, and so on (A B C ... at c32, A B C ... at c256), for --rounds rounds; each run is
preceded by a short warm-up that is not counted and, for the fanout scenarios, waits until fanout has no delivery
in flight.

The report gives, per concurrency, one table with, per scenario, the median over rounds and the spread (min-max)
of requests/s, the median p50/p90/p99 latency, the non-2xx count (socket errors included), and the median of:
  fanout peak RSS MiB      fanout's VmHWM, reset before each run (fanout scenarios)
  fanout CPU s / 1k req    fanout's utime+stime during the run, read once its deliveries in flight are back to
                           zero, so that it covers every counted write's delivery to all three backends
  nginx CPU s / 1k req     utime+stime of that scenario's nginx instance, master and workers (the master's
                           children), during the run (every scenario through nginx)
  total CPU s / 1k req     fanout + nginx: the load-balancing tier's CPU, whichever of the two the scenario goes
                           through (the backends' and wrk's CPU are not counted)
Then, per concurrency, the ratios (medians over medians):
  nginx-fanout-durable / nginx-mirror: throughput, p99
  fanout CPU per durable write / nginx CPU per mirrored write: fanout's CPU s/1k in nginx-fanout-durable over
      nginx's CPU s/1k in nginx-mirror
  nginx-fanout-first / nginx-mirror: throughput, p99
  fanout / direct: throughput, p99
  nginx-fanout-durable / nginx-fanout-first (durable / in memory): throughput, p99
  nginx-fanout-durable / baseline (with --baseline-bin): throughput, p99, fanout CPU per write
Output: the tables and ratios on stdout and in bench/results/bench.md; every raw run, the medians and the ratios in
bench/results/bench.json. Exits non-zero when any request failed (non-2xx or socket error). This machine is
shared and noisy: absolute numbers drift between runs, ratios within one run hold.

Standard library only. Needs wrk, nginx (Debian's) and the release binaries (make bench builds them).
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
BASELINE = "nginx-fanout-durable-baseline"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Stack:
    """Three demo backends, three fanout instances (ack first, ack all, durable) and four nginx instances
    (fanout-first, fanout-all, fanout-durable, mirror), plus, with a baseline build, a durable fanout from it and
    an nginx in front of that; every one on a free loopback port, all stopped by close()."""

    def __init__(self, workdir: Path, nginx: str, baseline_bin: Path | None = None):
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
        instances = [("first", "first", False, BIN), ("all", "all", False, BIN), ("durable", "first", True, BIN)]
        if baseline_bin is not None:
            instances.append(("baseline", "first", True, baseline_bin))
        for name, ack, durable, bindir in instances:
            api, metrics = free_port(), free_port()
            env = {"BACKEND_POOL": ",".join(self.backends), "LISTEN_ADDR": f"127.0.0.1:{api}",
                   "METRICS_PORT": str(metrics), "ACK_POLICY": ack, "RUST_LOG": "info",
                   "DATA_DIR": str(workdir / f"outbox-{name}"), "NO_OUTBOX": "false" if durable else "true"}
            p = self.spawn(f"fanout-{name}", [str(bindir / "fanout")], env)
            wait_http(f"http://127.0.0.1:{api}/healthz", p, f"fanout-{name}")
            self.fanout[name] = {"proc": p, "api": f"127.0.0.1:{api}", "metrics": f"127.0.0.1:{metrics}"}
        self.nginx = {}
        fronts = [("first", None, self.fanout["first"]), ("all", None, self.fanout["all"]),
                  ("durable", None, self.fanout["durable"]),
                  ("mirror", ROOT / "bench" / "nginx-mirror.conf.template", None)]
        if baseline_bin is not None:
            fronts.append(("baseline", None, self.fanout["baseline"]))
        for name, template, lb in fronts:
            port = free_port()
            prefix = workdir / f"nginx-{name}"
            env = dict(os.environ, BACKEND_1=self.backends[0], BACKEND_2=self.backends[1],
                       BACKEND_3=self.backends[2], NGINX_LISTEN=f"127.0.0.1:{port}")
            if lb:
                env.update(LB=lb["api"], LB_METRICS=lb["metrics"])
            args = [str(ROOT / "nginx" / "render.sh"), str(prefix)] + ([str(template)] if template else [])
            subprocess.run(args, env=env, check=True)
            p = self.spawn(f"nginx-{name}", [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                             "-e", str(prefix / "logs" / "error.log")], {})
            if lb:
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
        """(URL, method, fanout instance or None, nginx instance or None) of a scenario."""
        n, f = self.nginx, self.fanout
        return {
            "direct": (f"http://{self.backends[0]}/register", "POST", None, None),
            "nginx-proxy": (f"http://{n['first']['addr']}/login", "GET", None, n["first"]),
            "nginx-mirror": (f"http://{n['mirror']['addr']}/register", "POST", None, n["mirror"]),
            "fanout": (f"http://{f['first']['api']}/register", "POST", f["first"], None),
            "nginx-fanout-first": (f"http://{n['first']['addr']}/register", "POST", f["first"], n["first"]),
            "nginx-fanout-all": (f"http://{n['all']['addr']}/register", "POST", f["all"], n["all"]),
            "nginx-fanout-durable": (f"http://{n['durable']['addr']}/register", "POST", f["durable"], n["durable"]),
            BASELINE: (f"http://{n['baseline']['addr']}/register", "POST", f["baseline"], n["baseline"])
            if "baseline" in n else None,
        }[scenario]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=35)
            except subprocess.TimeoutExpired:
                p.kill()


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


def wait_idle(fanout: dict, timeout: float = 60) -> None:
    """Waits until the fanout instance has no delivery in flight, so runs do not overlap. A build without the
    gauge (an old baseline) is not waited for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://{fanout['metrics']}/metrics", timeout=5).read().decode()
        m = re.search(r"^fanout_deliveries_in_flight (\S+)$", text, re.M)
        if m is None or float(m.group(1)) == 0:
            return
        time.sleep(0.1)


def wrk(url: str, method: str, threads: int, conns: int, seconds: int) -> dict:
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s",
           "-s", str(ROOT / "bench" / "wrk.lua"), url, "--", method]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("BENCH "))
    return json.loads(line[len("BENCH "):])


def run_one(stack: Stack, scenario: str, threads: int, conns: int, args) -> dict:
    url, method, fanout, nginx = stack.target(scenario)
    if fanout:
        wait_idle(fanout)
    wrk(url, method, threads, conns, args.warmup)  # warm-up, not counted
    if fanout:
        wait_idle(fanout)
        pid = fanout["proc"].pid
        rss_reset = reset_peak_rss(pid)
        cpu_before = cpu_seconds(pid)
    if nginx:
        nginx_before = tree_cpu(nginx["proc"].pid)
    r = wrk(url, method, threads, conns, args.duration)
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
    if fanout:
        wait_idle(fanout)  # the deliveries of the counted writes that were still in flight belong to them
        result["fanout_cpu_s"] = cpu_seconds(pid) - cpu_before
        result["fanout_cpu_s_per_1k"] = result["fanout_cpu_s"] / requests * 1000
        result["peak_rss_mib"] = peak_rss_mib(pid)
        result["peak_rss_since_start"] = not rss_reset
    if nginx or fanout:
        result["total_cpu_s_per_1k"] = result.get("nginx_cpu_s_per_1k", 0.0) + result.get("fanout_cpu_s_per_1k", 0.0)
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
        for key in ("fanout_cpu_s_per_1k", "nginx_cpu_s_per_1k", "total_cpu_s_per_1k"):
            if key in rs[0]:
                s[key] = statistics.median(r[key] for r in rs)
        if "peak_rss_mib" in rs[0]:
            s["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rs)
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
    if BASELINE in summary:
        out["nginx-fanout-durable / baseline"] = pair("nginx-fanout-durable", BASELINE) | {
            "fanout_cpu_per_write": ratio(get("nginx-fanout-durable", "fanout_cpu_s_per_1k"),
                                          get(BASELINE, "fanout_cpu_s_per_1k"))}
    return out


def fmt_x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def report(results: list, scenarios: list, args, started: str) -> str:
    concs = ", ".join(f"-t{c['threads']} -c{c['connections']}" for c in results)
    lines = [
        f"Run {started}: {args.rounds} round(s) x {len(scenarios)} scenarios x {len(results)} concurrencies "
        f"(wrk {concs}), -d{args.duration}s each (after a {args.warmup}s warm-up), {os.cpu_count()} CPUs shared "
        "by wrk, nginx, fanout and the backends."
        + (f" Baseline fanout: {args.baseline_bin}/fanout." if args.baseline_bin else ""),
    ]

    def cell(s, key, fmt):
        return fmt.format(s[key]) if key in s else ""

    for c in results:
        summary, rt = c["summary"], c["ratios"]
        lines += [
            "",
            f"### wrk -t{c['threads']} -c{c['connections']}",
            "",
            "| scenario | req/s (median) | spread (min-max) | p50 ms | p90 ms | p99 ms | non-2xx | fanout peak RSS MiB "
            "| fanout CPU s / 1k req | nginx CPU s / 1k req | total CPU s / 1k req |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in scenarios:
            s = summary[name]
            lines.append(
                f'| {name} | {s["rps_median"]:.0f} | {s["rps_min"]:.0f}-{s["rps_max"]:.0f} | {s["p50_ms"]:.2f} '
                f'| {s["p90_ms"]:.2f} | {s["p99_ms"]:.2f} | {s["non2xx"] + s["socket_errors"]} '
                f'| {cell(s, "peak_rss_mib", "{:.1f}")} | {cell(s, "fanout_cpu_s_per_1k", "{:.3f}")} '
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
    ap.add_argument("--nginx", default=os.environ.get("NGINX_BIN", "nginx"))
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
    for tool in ("wrk", args.nginx):
        if not (Path(tool).exists() or any((Path(d) / tool).exists() for d in os.environ["PATH"].split(":"))):
            sys.exit(f"bench: {tool} is missing (apt-get install wrk nginx)")
    for b in ("fanout", "demo-backend"):
        if not (BIN / b).exists():
            sys.exit(f"bench: {BIN / b} is missing: cargo build --release --workspace --bins")
    if args.baseline_bin is not None:
        args.baseline_bin = args.baseline_bin.resolve()
        if not os.access(args.baseline_bin / "fanout", os.X_OK):
            sys.exit(f"bench: {args.baseline_bin / 'fanout'} is missing or not executable (--baseline-bin)")
    scenarios = SCENARIOS + ([BASELINE] if args.baseline_bin else [])

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    runs = {tc: {name: [] for name in scenarios} for tc in concurrencies}
    with tempfile.TemporaryDirectory(prefix="fanout-bench-") as tmp:
        stack = Stack(Path(tmp), args.nginx, args.baseline_bin)
        try:
            for rnd in range(1, args.rounds + 1):
                for threads, conns in concurrencies:
                    for name in scenarios:
                        r = run_one(stack, name, threads, conns, args)
                        runs[(threads, conns)][name].append(r)
                        cpu = "".join(f"  {label} {r[key]:.3f}" for label, key in (
                            ("fanout CPU/1k", "fanout_cpu_s_per_1k"), ("nginx CPU/1k", "nginx_cpu_s_per_1k"))
                            if key in r)
                        print(f"round {rnd} -t{threads} -c{conns:<4} {name:<30} {r['rps']:>8.0f} req/s  "
                              f"p99 {r['p99_ms']:.2f} ms  non-2xx {r['non2xx'] + r['socket_errors']}{cpu}",
                              flush=True)
        finally:
            stack.close()
    results = []
    for (threads, conns), by_scenario in runs.items():
        summary = summarize(by_scenario)
        results.append({"threads": threads, "connections": conns, "summary": summary, "ratios": ratios(summary),
                        "runs": by_scenario})
    text = report(results, scenarios, args, started)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench.md").write_text(text)
    args_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (RESULTS / "bench.json").write_text(json.dumps({"started": started, "args": args_json, "scenarios": scenarios,
                                                    "cpus": os.cpu_count(), "clk_tck": CLK_TCK,
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
