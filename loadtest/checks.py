# Integrity checks after a run: every mail the server accepted must have been downloaded exactly
# once by its receiver, with the body bytes sent, and decrypt with the receiving site's key to
# the DICOM files sent (SHA-256 each). Counts lost, duplicated, corrupted, not accepted and
# unexpected mails. Must never change the server's data or the corpus.
from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .recorder import Recorder

_KEYS: dict = {}


def _deep_check(args: tuple[str, str, list[str]]) -> str | None:
    """Worker: decrypt one saved mail; None if its DICOM digests match, else what is wrong."""
    path, key_path, expected = args
    from . import pgpmime

    key = _KEYS.get(key_path)
    if key is None:
        key = _KEYS[key_path] = pgpmime.load_key(Path(key_path).read_text())
    try:
        got = pgpmime.dicom_digests(key, Path(path).read_bytes())
    except Exception as exc:  # any failure to decrypt or parse is corruption
        return f"cannot decrypt/parse: {type(exc).__name__}: {exc}"
    if got != expected:
        return f"DICOM SHA-256 differ: got {len(got)} file(s), {sum(a != b for a, b in zip(got, expected))} differ"
    return None


def check(manifest: dict, corpus: Path, rec: Recorder, deep: bool = True, workers: int | None = None) -> dict:
    expected = {m["message_id"]: (s, m) for s in manifest["studies"] for m in s["mails"]}
    by_id = defaultdict(list)
    for item in rec.received:
        by_id[item.message_id].append(item)
    counts = {
        "planned": len(expected),
        "accepted": 0,
        "rejected": 0,
        "gave_up": 0,
        "not_sent": 0,
        "received": len(rec.received),
        "lost": 0,
        "duplicated": 0,
        "corrupted": 0,
        "unexpected": 0,
        "deep_checked": 0,
    }
    problems: list[str] = []
    jobs = []
    for mid, (study, mail) in expected.items():
        sent = rec.sent.get(mid)
        got = by_id.get(mid, [])
        outcome = sent.outcome if sent else "not-sent"
        if outcome == "accepted":
            counts["accepted"] += 1
        else:
            counts[{"rejected": "rejected", "gave-up": "gave_up"}.get(outcome, "not_sent")] += 1
            if sent is not None:
                problems.append(f"{mid}: not accepted ({outcome}): {sent.reply}")
        if outcome == "accepted" and not got:
            counts["lost"] += 1
            problems.append(f"{mid}: LOST (accepted by the server, never downloaded by {study['receiver']})")
        if len(got) > 1:
            counts["duplicated"] += len(got) - 1
            problems.append(f"{mid}: DUPLICATED ({len(got)} downloads)")
        for item in got:
            if item.receiver != study["receiver"] or item.body_sha256 != mail["body_sha256"]:
                counts["corrupted"] += 1
                problems.append(
                    f"{mid}: CORRUPTED (downloaded by {item.receiver}, body digest "
                    f"{'ok' if item.body_sha256 == mail['body_sha256'] else 'differs'})"
                )
            elif deep:
                key = corpus / manifest["sites"][study["receiver"]]["key"]
                jobs.append((mid, (item.path, str(key), mail["dicom_sha256"])))
    for mid, items in by_id.items():
        if mid not in expected:
            counts["unexpected"] += len(items)
            problems.append(f"<{mid}>: unexpected mail downloaded by {items[0].receiver} (not in the corpus)")
    if jobs:
        workers = workers or min(8, os.cpu_count() or 1, max(1, len(jobs) // 20))
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                verdicts = list(pool.map(_deep_check, [j for _, j in jobs], chunksize=16))
        else:
            verdicts = [_deep_check(j) for _, j in jobs]
        for (mid, _), verdict in zip(jobs, verdicts):
            counts["deep_checked"] += 1
            if verdict is not None:
                counts["corrupted"] += 1
                problems.append(f"{mid}: CORRUPTED ({verdict})")
    failed = any(counts[k] for k in ("lost", "duplicated", "corrupted", "rejected", "gave_up", "not_sent"))
    return {"passed": not failed, "counts": counts, "problems": problems[:200], "problems_total": len(problems)}
