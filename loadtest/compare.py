# `mailhub-loadtest compare A.json B.json`: the key figures of two results side by side with the
# ratio B/A (throughput: higher is better; latency: lower is better). Pure formatting; must never
# hide that either run failed its integrity checks.
from __future__ import annotations

import json
from pathlib import Path

FIGURES = [
    ("throughput", "accepted_mails_per_s", "accepted mails/s", "higher"),
    ("throughput", "accepted_mb_per_s", "accepted MB/s", "higher"),
    ("throughput", "downloaded_mails_per_s", "downloaded mails/s", "higher"),
    ("throughput", "downloaded_mb_per_s", "downloaded MB/s", "higher"),
    ("latency_s", "p50", "latency p50 (s)", "lower"),
    ("latency_s", "p95", "latency p95 (s)", "lower"),
    ("latency_s", "p99", "latency p99 (s)", "lower"),
    ("smtp_accept_latency_s", "p50", "submit-to-250 p50 (s)", "lower"),
    ("smtp_accept_latency_s", "p99", "submit-to-250 p99 (s)", "lower"),
    ("counts", "deferrals", "deferrals", "lower"),
    ("counts", "errors", "client-side errors", "lower"),
    ("run", "wall_s", "wall time (s)", "lower"),
]


def ratios(a: dict, b: dict) -> list[tuple[str, object, object, float | None, str]]:
    rows = []
    for section, key, label, better in FIGURES:
        va, vb = a.get(section, {}).get(key), b.get(section, {}).get(key)
        ratio = vb / va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va else None
        rows.append((label, va, vb, ratio, better))
    return rows


def format_comparison(a: dict, b: dict) -> str:
    def fmt(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    la, lb = a["target"]["label"], b["target"]["label"]
    lines = [
        f"A = {la} ({a['profile']['name']}, {'passed' if a['passed'] else 'FAILED'})",
        f"B = {lb} ({b['profile']['name']}, {'passed' if b['passed'] else 'FAILED'})",
    ]
    if a["profile"]["sha256"] != b["profile"]["sha256"]:
        lines.append("warning: the two results come from different profiles")
    lines.append(f"{'figure':<26}{'A':>12}{'B':>12}{'B/A':>9}  better")
    for label, va, vb, ratio, better in ratios(a, b):
        lines.append(f"{label:<26}{fmt(va):>12}{fmt(vb):>12}{fmt(ratio):>9}  {better}")
    return "\n".join(lines)


def compare_files(path_a: Path, path_b: Path) -> str:
    return format_comparison(json.loads(Path(path_a).read_text()), json.loads(Path(path_b).read_text()))
