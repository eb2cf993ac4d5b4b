#!/usr/bin/env python3
"""Writes and convergence checks for the Docker stacks (scripts/compose-test.sh, scripts/compose-cluster-test.sh).
Standard library only.

  compose-check.py writes --url URL --prefix P --count N [--change-every K] [--concurrency C] --ledger FILE
                          [--tolerate N] [--over S [--until FILE --after M]]
      Registers users P-0 .. P-(N-1) through URL (nginx), then changes the password of every K-th one (after its
      register was answered, so that its two writes are in order). Appends to FILE one line per acknowledged write
      ("username version": the user's write count on a backend once it has them all; the demo backend counts
      register and changePassword alike). Acknowledged: 201 (a backend applied it) or 202 (on fanout's disk, still
      being delivered), both with an X-Delivery-Id. Exits 1 on any other answer or a transport error, or with
      --tolerate N only on more than N of them (an instance killed mid-request): a failed write ends its user's
      writes and is written down as "username version?" (it may or may not have been taken). With --over S the
      users start evenly over S seconds instead of all at once (a load that lasts, to kill something under).
      With --until FILE as well, the load lasts until the caller says so: users keep starting at that pace past N
      until FILE exists, then M more start and the writes end (at least N in all). So the load is on both sides of
      whatever the caller does before it creates FILE, however long that takes; with no FILE by 10 * N users it
      gives up and exits 1.

  compose-check.py converge --ledger FILE --backend URL [--backend URL ...] [--timeout S] [--exact]
      Polls every backend's GET /users until each holds every user of the ledger at its final version and all
      backends agree on every user (version and password fingerprint), or until S seconds (default 120) have
      passed: then prints what is missing or differs and exits 1. With --exact a user above the last write sent
      for it (its version counts writes applied) is a write applied twice, and fails too.
"""
import argparse
import concurrent.futures
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


def post(url: str, fields: dict) -> tuple[int, str]:
    """POST a form; returns (status, X-Delivery-Id or ""). HTTP error statuses are returned, not raised."""
    data = urllib.parse.urlencode(fields).encode()
    req = urllib.request.Request(url, data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            return resp.status, resp.headers.get("X-Delivery-Id", "")
    except urllib.error.HTTPError as err:
        err.read()
        return err.code, err.headers.get("X-Delivery-Id", "")


def writes(args) -> int:
    base = args.url.rstrip("/")

    started = time.monotonic()

    def one_user(i: int) -> tuple[list[str], str | None]:
        """The user's writes, in order, up to the first unacknowledged one: (ledger lines, failure or None)."""
        name = f"{args.prefix}-{i}"
        lines = []
        plan = [("register", f"pw-{i}")]
        if args.change_every and i % args.change_every == 0:
            plan.append(("changePassword", f"pw-{i}-2"))
        for version, (route, password) in enumerate(plan, start=1):
            try:
                status, delivery = post(f"{base}/{route}", {"username": name, "password": password})
            except OSError as err:  # a transport error
                status, delivery = f"no answer ({err})", ""
            if status not in (201, 202) or not delivery:
                lines.append(f"{name} {version}?")
                return lines, f"{route} {name}: status {status}, X-Delivery-Id {delivery or 'missing'}"
            lines.append(f"{name} {version}")
        return lines, None

    def users():
        """The users' numbers, each yielded at its start time (with --over); until_seen[0] becomes the number of
        users started before --until's file was seen, started_users[0] counts them all."""
        i = 0
        while True:
            if args.over:
                time.sleep(max(0.0, started + args.over * i / args.count - time.monotonic()))
            if args.until and until_seen[0] is None and os.path.exists(args.until):
                until_seen[0] = i
            if i >= args.count and (not args.until or (until_seen[0] is not None and i - until_seen[0] >= args.after)):
                return
            if args.until and until_seen[0] is None and i >= 10 * args.count:
                return
            yield i
            i += 1
            started_users[0] = i

    until_seen: list[int | None] = [None]
    started_users = [0]
    lines, failures = [], []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        for fut in concurrent.futures.as_completed([pool.submit(one_user, i) for i in users()]):
            user_lines, failure = fut.result()
            if failure is None or args.tolerate > 0:
                lines.extend(user_lines)
            if failure is not None:
                failures.append(failure)
    with open(args.ledger, "a") as f:
        f.writelines(line + "\n" for line in lines)
    acknowledged = sum(1 for line in lines if not line.endswith("?"))
    print(f"writes: {acknowledged} acknowledged, {len(failures)} failed"
          f"{f' (at most {args.tolerate} tolerated)' if args.tolerate else ''}, {time.monotonic() - started:.1f} s")
    for line in failures[:10]:
        print(f"  failed: {line}")
    if args.until:
        if until_seen[0] is None:
            print(f"  {args.until} never appeared: gave up after {10 * args.count} users")
            return 1
        print(f"  users started: {until_seen[0]} before {args.until} appeared, {started_users[0] - until_seen[0]} after")
    return 1 if len(failures) > args.tolerate else 0


def converge(args) -> int:
    expected: dict[str, int] = {}  # the last acknowledged write's version: every backend must reach it
    sent: dict[str, int] = {}  # the last write sent, acknowledged or not: no backend may go past it
    for line in open(args.ledger):
        name, version = line.split()
        if not version.endswith("?"):
            expected[name] = max(expected.get(name, 0), int(version))
        sent[name] = max(sent.get(name, 0), int(version.rstrip("?")))
    started = time.monotonic()
    problems: list[str] = []
    while True:
        problems = []
        views = {}
        for url in args.backend:
            try:
                with urllib.request.urlopen(url.rstrip("/") + "/users", timeout=10) as resp:
                    users = json.load(resp)["users"]
                views[url] = {u["username"]: (u["version"], u["password_fingerprint"]) for u in users}
            except OSError as err:
                problems.append(f"{url}/users unreachable: {err}")
        for url, view in views.items():
            behind = [n for n, v in expected.items() if n not in view or view[n][0] < v]
            if behind:
                problems.append(f"{url}: {len(behind)} of {len(expected)} users missing or behind (e.g. {behind[0]})")
            if args.exact:
                twice = [n for n, v in sent.items() if n in view and view[n][0] > v]
                if twice:
                    problems.append(f"{url}: {len(twice)} users past their last write, a write applied twice (e.g. {twice[0]})")
        names = set().union(*(v.keys() for v in views.values())) if views else set()
        differing = sorted(n for n in names if len({v.get(n) for v in views.values()}) != 1)
        if differing:
            problems.append(f"{len(differing)} users differ between backends (e.g. {differing[0]})")
        elapsed = time.monotonic() - started
        if not problems:
            counts = ", ".join(f"{len(v)}" for v in views.values())
            print(f"converged: {len(expected)} users, every backend holds them all ({counts} users), {elapsed:.1f} s")
            return 0
        if elapsed > args.timeout:
            print(f"NOT converged after {args.timeout:.0f} s:")
            for p in problems:
                print(f"  {p}")
            return 1
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("writes")
    w.add_argument("--url", required=True)
    w.add_argument("--prefix", required=True)
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--change-every", type=int, default=3)
    w.add_argument("--concurrency", type=int, default=8)
    w.add_argument("--ledger", required=True)
    w.add_argument("--tolerate", type=int, default=0)
    w.add_argument("--over", type=float, default=0.0)
    w.add_argument("--until", default="")
    w.add_argument("--after", type=int, default=0)
    c = sub.add_parser("converge")
    c.add_argument("--ledger", required=True)
    c.add_argument("--backend", action="append", required=True)
    c.add_argument("--timeout", type=float, default=120.0)
    c.add_argument("--exact", action="store_true")
    args = ap.parse_args()
    if args.cmd == "writes" and args.until and not args.over:
        ap.error("--until needs --over (the pace at which users keep starting)")
    return writes(args) if args.cmd == "writes" else converge(args)


if __name__ == "__main__":
    sys.exit(main())
