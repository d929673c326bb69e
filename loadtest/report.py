# The HTML report of one result: headline, counts, throughput/latency tables, and plots (matplotlib,
# PNG embedded as base64) of throughput over time, the submit-to-download latency CDF with
# p50/p95/p99, per-receiver backlog over time and deferrals. Reads only the result dict; must
# never need the corpus or the server, so a report can be rebuilt from RESULT.json alone.
from __future__ import annotations

import base64
import html
import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .results import headline  # noqa: E402

TOP_RECEIVERS = 8


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _rates(timeline: list[dict], key: str, scale: float = 1.0, window_s: float = 2.0):
    """Rate of a cumulative counter, averaged over a sliding window (raw 0.5 s samples are spiky)."""
    ts, rs, j = [], [], 0
    for b in timeline[1:]:
        while j < len(timeline) - 1 and b["t"] - timeline[j]["t"] > window_s:
            j += 1
        a = timeline[j]
        if b["t"] > a["t"]:
            ts.append(b["t"])
            rs.append((b[key] - a[key]) / (b["t"] - a["t"]) / scale)
    return ts, rs


def plot_throughput(result: dict) -> str:
    tl = result["timeline"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    for key, label in (("accepted_bytes", "accepted by SMTP"), ("received_bytes", "downloaded")):
        top.plot(*_rates(tl, key, 1e6), label=label)
    top.set_ylabel("MB/s")
    top.legend()
    top.set_title("Throughput over time (2 s sliding average)")
    for key, label in (("accepted", "accepted"), ("received", "downloaded")):
        bottom.plot(*_rates(tl, key), label=label)
    bottom.set_ylabel("mails/s")
    bottom.set_xlabel("time since start (s)")
    bottom.legend()
    return _png(fig)


def plot_latency(result: dict) -> str:
    values = result["latencies_s"]
    fig, ax = plt.subplots(figsize=(9, 4))
    if values:
        n = len(values)
        ax.step(values, [(i + 1) / n for i in range(n)], where="post")
        lat = result["latency_s"]
        for p, style in (("p50", ":"), ("p95", "--"), ("p99", "-.")):
            ax.axvline(lat[p], linestyle=style, color="grey")
            ax.text(lat[p], 0.02 + 0.1 * ("p50", "p95", "p99").index(p), f" {p} {lat[p]:.3f} s", fontsize=8)
    ax.set_xlabel("submit-to-download latency (s)")
    ax.set_ylabel("fraction of mails")
    ax.set_title("Latency CDF (first SMTP attempt to end of download)")
    return _png(fig)


def plot_backlog(result: dict) -> str:
    tl = result["timeline"]
    names: dict[str, int] = {}
    for point in tl:
        for name, n in point["backlog"].items():
            names[name] = max(names.get(name, 0), n)
    top = sorted(names, key=names.__getitem__, reverse=True)[:TOP_RECEIVERS]
    fig, ax = plt.subplots(figsize=(9, 4))
    ts = [p["t"] for p in tl]
    ax.plot(ts, [sum(v for v in p["backlog"].values() if v > 0) for p in tl], color="black", label="all receivers")
    server = result.get("server_backlog", {})
    for name in top:
        (line,) = ax.plot(ts, [p["backlog"].get(name, 0) for p in tl], label=name, linewidth=1)
        readings = server.get(name, [])
        if readings:  # what the server itself reported at each poll (STAT / SEARCH)
            ax.plot([r[0] for r in readings], [r[1] for r in readings], ".", color=line.get_color(), markersize=4)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("accepted, not yet downloaded")
    ax.set_title(f"Backlog per receiver (top {len(top)} of {len(names)} by peak; dots: server's count at each poll)")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def plot_deferrals(result: dict) -> str:
    fig, ax = plt.subplots(figsize=(9, 3))
    tl = result["timeline"]
    ax.plot([p["t"] for p in tl], [p.get("deferrals", 0) for p in tl])
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("deferrals (cumulative)")
    ax.set_title("SMTP deferrals (4xx replies and dropped connections, each retried)")
    return _png(fig)


def _table(rows: Sequence[tuple[str, object]]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        return html.escape("-" if v is None else str(v))

    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{cell(v)}</td></tr>" for k, v in rows) + "</table>"


def render(result: dict) -> str:
    c, lat, acc, th = result["counts"], result["latency_s"], result["smtp_accept_latency_s"], result["throughput"]
    plots = [
        ("Throughput", plot_throughput(result)),
        ("Latency", plot_latency(result)),
        ("Backlog", plot_backlog(result)),
        ("Deferrals", plot_deferrals(result)),
    ]
    reasons = Counter(d["reply"][:60] for d in result["deferrals"])
    problems = "".join(f"<li>{html.escape(p)}</li>" for p in result["problems"])
    body = [
        f"<h1>mailhub-loadtest: {html.escape(result['profile']['name'])}"
        f" against {html.escape(result['target']['label'])}</h1>",
        f"<p class={'pass' if result['passed'] else 'fail'}>{html.escape(headline(result))}</p>",
        "<h2>Mails</h2>",
        _table([(k, v) for k, v in c.items()]),
        "<h2>Throughput</h2>",
        _table(
            [(k, v) for k, v in th.items()]
            + [
                ("accepted bytes", result["bytes"]["accepted"]),
                ("downloaded bytes", result["bytes"]["downloaded"]),
                ("wall time (s)", result["run"]["wall_s"]),
            ]
        ),
        "<h2>Latency (s)</h2>",
        _table(
            [(f"submit-to-download {k}", v) for k, v in lat.items()]
            + [(f"submit-to-250 {k}", v) for k, v in acc.items()]
        ),
        "<h2>Target</h2>",
        _table(
            [(k, v) for k, v in result["target"].items()]
            + [("started", result["started_at"]), ("profile sha256", result["profile"]["sha256"][:16])]
        ),
    ]
    body += [f"<h2>{name}</h2><img src='data:image/png;base64,{png}'>" for name, png in plots]
    if reasons:
        body += ["<h2>Deferral replies</h2>", _table(reasons.most_common())]
    receivers = result.get("per_receiver", {})
    if receivers:
        worst = sorted(receivers.items(), key=lambda kv: -(kv[1]["latency_p95_s"] or 0))[:15]
        head = (
            "<tr><th>receiver</th><th>downlink Mbit/s</th><th>mails</th><th>MB</th>"
            "<th>latency p50 / p95 (s)</th><th>peak backlog</th><th>polls</th></tr>"
        )
        rows = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{r['downlink_mbit_s'] or 'unlimited'}</td>"
            f"<td>{r['downloaded']}/{r['accepted']}</td>"
            f"<td>{r['bytes'] / 1e6:.1f}</td><td>{(r['latency_p50_s'] or 0):.2f} / {(r['latency_p95_s'] or 0):.2f}</td>"
            f"<td>{r['peak_backlog']}</td><td>{r['polls']}</td></tr>"
            for name, r in worst
        )
        body += [
            f"<h2>Receivers (slowest {len(worst)} of {len(receivers)} by p95 latency)</h2><table>{head}{rows}</table>"
        ]
    errors = Counter(e["text"][:80] for e in result.get("errors", []))
    if errors:
        body += [
            "<h2>Client-side errors (sessions retried)</h2>",
            _table(errors.most_common()),
        ]
    if problems:
        body += [f"<h2>Problems ({result['problems_total']})</h2><ul>{problems}</ul>"]
    style = (
        "body{font-family:sans-serif;max-width:960px;margin:1em auto}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}.pass{color:#060}.fail{color:#a00;"
        "font-weight:bold}img{max-width:100%}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>mailhub-loadtest {html.escape(result['profile']['name'])}"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
    )


def write_report(result: dict, path: Path) -> None:
    Path(path).write_text(render(result))
