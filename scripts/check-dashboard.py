#!/usr/bin/env python3
"""The Grafana dashboard parses and every metric its panels query exists in what fanout and the nginx exporter
really expose.

  usage: check-dashboard.py DASHBOARD_JSON METRICS_TEXT [METRICS_TEXT ...]

METRICS_TEXT files are scrapes (Prometheus text format) of a live local stack. Exits 1 naming each unknown metric.
"""
import json
import re
import sys
from pathlib import Path

# PromQL words that look like metric names but are functions, aggregations or keywords.
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile", "by", "without",
    "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "topk", "bottomk", "le",
}


def exposed_names(paths: list[str]) -> set[str]:
    names = set()
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line and not line.startswith("#"):
                names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


def main() -> int:
    dashboard = json.loads(Path(sys.argv[1]).read_text())
    exposed = exposed_names(sys.argv[2:])
    problems, checked = [], 0
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            # Drop label matchers, label lists, ranges and strings before looking for metric names.
            bare = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]', " ", expr)
            bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", bare)
            for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare):
                if word in PROMQL_WORDS or re.fullmatch(r"[0-9.]+", word):
                    continue
                checked += 1
                if word not in exposed:
                    problems.append(f"panel {panel['title']!r}: {word} is not exposed")
    for p in problems:
        print(f"check-dashboard: {p}")
    if checked == 0:
        problems.append("no metric found in the dashboard")
        print("check-dashboard: no metric found in the dashboard")
    if not problems:
        print(f"check-dashboard: {len(dashboard['panels'])} panels, {checked} metric references, all exposed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
