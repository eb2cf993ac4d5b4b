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

The scenarios alternate (A B C ... A B C ...) for --rounds rounds, each run preceded by a short warm-up that is not
counted. The report gives, per scenario, the median over rounds and the spread (min-max) of requests/s, the median
p50/p90/p99 latency, the non-2xx count, and for the fanout scenarios fanout's peak RSS (VmHWM, reset before each
run) and CPU seconds per 1000 requests; then the ratios. Output: a markdown table on stdout and in
bench/results/bench.md, and bench/results/bench.json. This machine is shared and noisy: absolute numbers drift
between runs, ratios within one run hold.

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
CLK_TCK = os.sysconf("SC_CLK_TCK")




class Stack:
    """Three demo backends, two fanout instances (ack first, ack all) and three nginx instances (fanout-first,
    fanout-all, mirror), every one on a free loopback port, all stopped by close()."""

    def __init__(self, workdir: Path, nginx: str):
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
        for name, ack, durable in (("first", "first", False), ("all", "all", False), ("durable", "first", True)):
            api, metrics = free_port(), free_port()
            env = {"BACKEND_POOL": ",".join(self.backends), "LISTEN_ADDR": f"127.0.0.1:{api}",
                   "METRICS_PORT": str(metrics), "ACK_POLICY": ack, "RUST_LOG": "info",
                   "DATA_DIR": str(workdir / f"outbox-{name}"), "NO_OUTBOX": "false" if durable else "true"}
            p = self.spawn(f"fanout-{name}", [str(BIN / "fanout")], env)
            wait_http(f"http://127.0.0.1:{api}/healthz", p, f"fanout-{name}")
            self.fanout[name] = {"proc": p, "api": f"127.0.0.1:{api}", "metrics": f"127.0.0.1:{metrics}"}
        self.nginx = {}
        for name, template, lb in (
            ("first", None, self.fanout["first"]),
            ("all", None, self.fanout["all"]),
            ("durable", None, self.fanout["durable"]),
            ("mirror", ROOT / "bench" / "nginx-mirror.conf.template", None),
        ):
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
            self.nginx[name] = f"127.0.0.1:{port}"

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
        """(URL, method, fanout instance or None) of a scenario."""
        return {
            "direct": (f"http://{self.backends[0]}/register", "POST", None),
            "nginx-proxy": (f"http://{self.nginx['first']}/login", "GET", None),
            "nginx-mirror": (f"http://{self.nginx['mirror']}/register", "POST", None),
            "fanout": (f"http://{self.fanout['first']['api']}/register", "POST", self.fanout["first"]),
            "nginx-fanout-first": (f"http://{self.nginx['first']}/register", "POST", self.fanout["first"]),
            "nginx-fanout-all": (f"http://{self.nginx['all']}/register", "POST", self.fanout["all"]),
            "nginx-fanout-durable": (f"http://{self.nginx['durable']}/register", "POST", self.fanout["durable"]),
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
    """Waits until the fanout instance has no delivery in flight, so runs do not overlap."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://{fanout['metrics']}/metrics", timeout=5).read().decode()
        m = re.search(r"^fanout_deliveries_in_flight (\S+)$", text, re.M)
        if m and float(m.group(1)) == 0:
            return
        time.sleep(0.1)


def wrk(url: str, method: str, threads: int, conns: int, seconds: int) -> dict:
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s",
           "-s", str(ROOT / "bench" / "wrk.lua"), url, "--", method]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("BENCH "))
    return json.loads(line[len("BENCH "):])


def run_one(stack: Stack, scenario: str, args) -> dict:
    url, method, fanout = stack.target(scenario)
    if fanout:
        wait_idle(fanout)
    wrk(url, method, args.threads, args.connections, args.warmup)  # warm-up, not counted
    if fanout:
        wait_idle(fanout)
        pid = fanout["proc"].pid
        rss_reset = reset_peak_rss(pid)
        cpu_before = cpu_seconds(pid)
    r = wrk(url, method, args.threads, args.connections, args.duration)
    result = {
        "rps": r["requests"] / (r["duration_us"] / 1e6),
        "requests": r["requests"],
        "p50_ms": r["p50_us"] / 1000,
        "p90_ms": r["p90_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "non2xx": r["non2xx"],
        "socket_errors": r["socket_errors"],
    }
    if fanout:
        result["cpu_s_per_1k"] = (cpu_seconds(pid) - cpu_before) / max(r["requests"], 1) * 1000
        result["peak_rss_mib"] = peak_rss_mib(pid)
        result["peak_rss_since_start"] = not rss_reset
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
        if "cpu_s_per_1k" in rs[0]:
            s["cpu_s_per_1k"] = statistics.median(r["cpu_s_per_1k"] for r in rs)
            s["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rs)
        out[name] = s
    return out


def report(summary: dict, args, started: str) -> str:
    lines = [
        f"Run {started}: {args.rounds} round(s) x {len(SCENARIOS)} scenarios, wrk -t{args.threads} "
        f"-c{args.connections} -d{args.duration}s (after a {args.warmup}s warm-up), {os.cpu_count()} CPUs shared "
        "by wrk, nginx, fanout and the backends.",
        "",
        "| scenario | req/s (median) | spread (min-max) | p50 ms | p90 ms | p99 ms | non-2xx | fanout peak RSS MiB "
        "| fanout CPU s / 1k req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in SCENARIOS:
        s = summary[name]
        rss = f'{s["peak_rss_mib"]:.1f}' if "peak_rss_mib" in s else ""
        cpu = f'{s["cpu_s_per_1k"]:.3f}' if "cpu_s_per_1k" in s else ""
        lines.append(
            f'| {name} | {s["rps_median"]:.0f} | {s["rps_min"]:.0f}-{s["rps_max"]:.0f} | {s["p50_ms"]:.2f} '
            f'| {s["p90_ms"]:.2f} | {s["p99_ms"]:.2f} | {s["non2xx"] + s["socket_errors"]} | {rss} | {cpu} |'
        )
    nf, nm, fo, di, nd = (summary[k] for k in ("nginx-fanout-first", "nginx-mirror", "fanout", "direct",
                                                 "nginx-fanout-durable"))
    lines += [
        "",
        f'nginx-fanout-first / nginx-mirror: throughput {nf["rps_median"] / nm["rps_median"]:.2f}x, '
        f'p99 {nf["p99_ms"] / nm["p99_ms"]:.2f}x',
        f'fanout / direct: throughput {fo["rps_median"] / di["rps_median"]:.2f}x, '
        f'p99 {fo["p99_ms"] / di["p99_ms"]:.2f}x',
        f'nginx-fanout-durable / nginx-fanout-first (outbox / in memory): throughput '
        f'{nd["rps_median"] / nf["rps_median"]:.2f}x, p99 {nd["p99_ms"] / nf["p99_ms"]:.2f}x',
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of uncounted warm-up before each run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--nginx", default=os.environ.get("NGINX_BIN", "nginx"))
    args = ap.parse_args()
    for tool in ("wrk", args.nginx):
        if not (Path(tool).exists() or any((Path(d) / tool).exists() for d in os.environ["PATH"].split(":"))):
            sys.exit(f"bench: {tool} is missing (apt-get install wrk nginx)")
    for b in ("fanout", "demo-backend"):
        if not (BIN / b).exists():
            sys.exit(f"bench: {BIN / b} is missing: cargo build --release --workspace --bins")

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    runs: dict[str, list] = {name: [] for name in SCENARIOS}
    with tempfile.TemporaryDirectory(prefix="fanout-bench-") as tmp:
        stack = Stack(Path(tmp), args.nginx)
        try:
            for rnd in range(1, args.rounds + 1):
                for name in SCENARIOS:
                    r = run_one(stack, name, args)
                    runs[name].append(r)
                    print(f"round {rnd} {name:<20} {r['rps']:>8.0f} req/s  p99 {r['p99_ms']:.2f} ms  "
                          f"non-2xx {r['non2xx'] + r['socket_errors']}", flush=True)
        finally:
            stack.close()
    summary = summarize(runs)
    text = report(summary, args, started)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench.md").write_text(text)
    (RESULTS / "bench.json").write_text(json.dumps({"started": started, "args": vars(args), "summary": summary,
                                                    "runs": runs}, indent=2))
    print()
    print(text, end="")
    errors = sum(s["non2xx"] + s["socket_errors"] for s in summary.values())
    if errors:
        print(f"bench: {errors} requests failed (non-2xx or socket errors): the numbers above are not comparable")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
