# Turns a run's records into the RESULT.json document: counts, throughput, latency percentiles,
# timeline, backlog and deferrals. Pure computation over the recorder; must never do I/O (the CLI
# writes the file) and never change the verdict of checks.py.
from __future__ import annotations

import platform
import time

from .profile import Profile
from .recorder import Recorder

FORMAT = 1


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": sum(values) / len(values),
    }


def _rate(amount: float, start: float | None, end: float | None) -> float | None:
    if start is None or end is None or end <= start:
        return None
    return amount / (end - start)


def build(
    profile: Profile,
    manifest: dict,
    target_label: str,
    target: dict,
    rec: Recorder,
    timeline: list[dict],
    outcome: dict,
    verdict: dict,
    started_at: float,
) -> dict:
    accepted = [s for s in rec.sent.values() if s.outcome == "accepted"]
    sent_by_id = {s.message_id: s for s in accepted}
    first_download = {}
    for r in rec.received:
        if r.message_id in sent_by_id and r.message_id not in first_download:
            first_download[r.message_id] = r
    latency = [round(first_download[m].at_s - s.submit_s, 4) for m, s in sent_by_id.items() if m in first_download]
    per_receiver: dict = {}
    for m, s in sent_by_id.items():
        entry = per_receiver.setdefault(s.receiver, {"accepted": 0, "downloaded": 0, "bytes": 0, "lat": []})
        entry["accepted"] += 1
        if m in first_download:
            entry["downloaded"] += 1
            entry["bytes"] += first_download[m].size
            entry["lat"].append(first_download[m].at_s - s.submit_s)
    peaks: dict = {}
    for point in timeline:
        for name, n in point["backlog"].items():
            peaks[name] = max(peaks.get(name, 0), n)
    for name, entry in per_receiver.items():
        lat = entry.pop("lat")
        entry.update(
            latency_p50_s=percentile(lat, 50),
            latency_p95_s=percentile(lat, 95),
            peak_backlog=peaks.get(name, 0),
            polls=len(rec.backlog.get(name, [])),
            downlink_mbit_s=profile.site(name).downlink_mbit_s,
        )
    smtp_latency = [round(s.accepted_s - s.submit_s, 4) for s in accepted]
    first_submit = min((s.submit_s for s in rec.sent.values()), default=None)
    last_accept = max((s.accepted_s for s in accepted), default=None)
    downloads = [r.at_s for r in rec.received]
    last_download = max(downloads, default=None)
    mb = 1e6
    throughput = {
        "accepted_mails_per_s": _rate(len(accepted), first_submit, last_accept),
        "accepted_mb_per_s": _rate(sum(s.size for s in accepted) / mb, first_submit, last_accept),
        "downloaded_mails_per_s": _rate(len(rec.received), first_submit, last_download),
        "downloaded_mb_per_s": _rate(rec.received_bytes / mb, first_submit, last_download),
    }
    return {
        "format": FORMAT,
        "tool": "mailhub-loadtest",
        "passed": verdict["passed"],
        "profile": {
            "name": profile.name,
            "sha256": profile.sha256,
            "duration_s": profile.duration_s,
            "sites": len(profile.sites),
            "senders": len(profile.senders),
            "receivers": len(profile.receivers),
        },
        "target": {"label": target_label, **target},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "host": {"python": platform.python_version(), "machine": platform.machine(), "node": platform.node()},
        "corpus": {"mails": manifest["mails"], "bytes": manifest["bytes"], "studies": len(manifest["studies"])},
        "run": {**outcome, "wall_s": rec.now()},
        "counts": {
            **verdict["counts"],
            "deferrals": len(rec.deferrals),
            "errors": len(rec.errors),
            "smtp_sessions": rec.smtp_sessions,
            "smtp_tls_sessions": rec.smtp_tls_sessions,
        },
        "bytes": {"accepted": rec.accepted_bytes, "downloaded": rec.received_bytes},
        "throughput": throughput,
        "latency_s": summary(latency),
        "smtp_accept_latency_s": summary(smtp_latency),
        "latencies_s": sorted(latency),
        "per_receiver": per_receiver,
        "timeline": timeline,
        "server_backlog": {k: v for k, v in rec.backlog.items()},
        "deferrals": [{"t": round(t, 3), "site": site, "reply": reply} for t, site, reply in rec.deferrals[:5000]],
        "errors": [{"t": round(t, 3), "who": who, "text": text} for t, who, text in rec.errors[:500]],
        "problems": verdict["problems"],
        "problems_total": verdict["problems_total"],
    }


def headline(result: dict) -> str:
    c, lat, th = result["counts"], result["latency_s"], result["throughput"]

    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    return (
        f"{'PASSED' if result['passed'] else 'FAILED'}: {result['profile']['name']} against "
        f"{result['target']['label']}: {c['accepted']}/{c['planned']} accepted, {c['received']} downloaded, "
        f"lost {c['lost']}, duplicated {c['duplicated']}, corrupted {c['corrupted']}, "
        f"not accepted {c['rejected'] + c['gave_up'] + c['not_sent']}, deferrals {c['deferrals']}; "
        f"in {f(th['accepted_mails_per_s'])} mails/s {f(th['accepted_mb_per_s'])} MB/s; "
        f"latency p50 {f(lat['p50'], '{:.3f}')} s p95 {f(lat['p95'], '{:.3f}')} s p99 {f(lat['p99'], '{:.3f}')} s"
    )
