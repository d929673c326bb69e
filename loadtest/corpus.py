# The corpus: every mail of a profile's run, built once before the run (DICOM made, encrypted to
# the receiving site's throw-away key, wrapped in PGP/MIME) plus manifest.json with what the checks
# need (Message-ID, body and DICOM digests). Must never be built during a measured run: encryption
# cost belongs to the gateways' side, not to the server under test.
from __future__ import annotations

import hashlib
import json
import random
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from . import arrivals, dicomgen, pgpmime
from .profile import Profile

FORMAT = 1


class CorpusError(RuntimeError):
    pass


def _site_keys(profile: Profile, keys_dir: Path) -> dict:
    keys_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for site in profile.sites:
        path = keys_dir / f"{site.name}.asc"
        address = f"{site.name}@{profile.domain}"
        if path.exists():
            key = pgpmime.load_key(path.read_text())
        else:
            key = pgpmime.new_site_key(site.name, address)
            path.write_text(str(key))
            path.chmod(0o600)
        out[site.name] = key
    return out


def generate(profile: Profile, corpus: Path, progress=None) -> dict:
    """Build the corpus for `profile` into `corpus`; return the manifest."""
    corpus.mkdir(parents=True, exist_ok=True)
    keys = _site_keys(profile, corpus / "keys")
    old = corpus / "manifest.json"
    passwords = {}
    if old.exists():  # keep the passwords of an earlier generation (sites may exist already)
        passwords = {n: s["password"] for n, s in json.loads(old.read_text()).get("sites", {}).items()}
    sites = {
        s.name: {
            "address": f"{s.name}@{profile.domain}",
            "key": f"keys/{s.name}.asc",
            "password": passwords.get(s.name) or secrets.token_urlsafe(12),
        }
        for s in profile.sites
    }
    plan = arrivals.plan(profile)
    rng = random.Random(profile.seed * 7919 + 1)
    studies: list[dict[str, Any]] = []  # the manifest's JSON
    total_bytes, started = 0, time.monotonic()
    for n, study in enumerate(plan, 1):
        kind = profile.studies[study.kind]
        study_uid, series_uid = dicomgen.study_uids(rng)
        patient = f"LT{study.number:07d}"
        images = [
            (
                f"IM{i:05d}.dcm",
                dicomgen.dicom_image(rng, kind.modality, study_uid, series_uid, i, kind.bytes_per_image, patient),
            )
            for i in range(1, study.images + 1)
        ]
        groups = [images] if kind.per_mail == "study" else [[img] for img in images]
        set_id = f"{study_uid}"
        mails = []
        folder = corpus / "mails" / f"{study.number:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        sender, receiver = sites[study.sender]["address"], sites[study.receiver]["address"]
        for part, files in enumerate(groups, 1):
            message_id = f"lt{study.number:06d}.{part:04d}.{secrets.token_hex(4)}@{study.sender}.{profile.domain}"
            raw = pgpmime.pgp_mime_mail(
                sender=sender,
                recipient=receiver,
                public_key=keys[study.receiver].pubkey,
                files=files,
                set_id=set_id,
                set_part=part,
                set_total=len(groups),
                message_id=message_id,
                subject=f"{kind.modality} study {patient} part {part}/{len(groups)}",
            )
            path = folder / f"{part:04d}.eml"
            path.write_bytes(raw)
            total_bytes += len(raw)
            mails.append(
                {
                    "file": str(path.relative_to(corpus)),
                    "message_id": message_id,
                    "size": len(raw),
                    "part": part,
                    "total": len(groups),
                    "body_sha256": pgpmime.body_digest(raw),
                    "dicom_sha256": [hashlib.sha256(d).hexdigest() for _, d in files],
                }
            )
        studies.append(
            {
                "number": study.number,
                "at_s": study.at_s,
                "sender": study.sender,
                "receiver": study.receiver,
                "modality": kind.modality,
                "per_mail": kind.per_mail,
                "images": study.images,
                "set_id": set_id,
                "mails": mails,
            }
        )
        if progress:
            progress(n, len(plan), total_bytes, time.monotonic() - started)
    manifest = {
        "format": FORMAT,
        "profile": profile.name,
        "profile_sha256": profile.sha256,
        "domain": profile.domain,
        "sites": sites,
        "studies": studies,
        "mails": sum(len(s["mails"]) for s in studies),
        "bytes": total_bytes,
    }
    tmp = corpus / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(corpus / "manifest.json")
    return manifest


def load(profile: Profile, corpus: Path) -> dict:
    path = corpus / "manifest.json"
    if not path.exists():
        raise CorpusError(f"no corpus in {corpus}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("profile_sha256") != profile.sha256:
        raise CorpusError(f"the corpus in {corpus} was built from another profile (or version)")
    return manifest


def print_progress(n: int, total: int, nbytes: int, seconds: float) -> None:
    sys.stderr.write(f"\rgenerate: study {n}/{total}, {nbytes / 1e6:.1f} MB, {seconds:.1f} s ")
    if n == total:
        sys.stderr.write("\n")
    sys.stderr.flush()
