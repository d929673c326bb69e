# What `mailhub check` finds beyond a configuration that loads and a certificate that loads with its
# key (mailhub/cli.py): the certificate expired, not valid yet or expiring within 30 days; MAILHUB_*
# environment variables that are no setting (with the nearest setting's name: a misspelt variable
# is silently ignored otherwise); a data folder the hub could not write to or whose disk is nearly
# full; lifecycle.operator_address set to postmaster@ of a local domain (it names itself: mail to
# postmaster would be deferred for ever and the operator's notices dropped); a PostgreSQL index
# (storage.index) that cannot be reached, or was migrated by a newer hub. Errors stop `check`
# with exit status 2 (and so systemd's ExecStartPre); warnings are printed and the check passes.
# Must never: create or change a file, or print a private key.
import datetime
import difflib
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import certificates
from .config import ENV_PREFIX, SCHEMA, Config, env_name

ERROR = "error"
WARNING = "warning"

# Variables read by the code beside the schema (test-only fault injection, docs/storage.md).
OTHER_VARIABLES = frozenset({"MAILHUB_FAULT", "MAILHUB_FAULT_FILE"})


@dataclass(frozen=True)
class Finding:
    level: str  # ERROR or WARNING
    text: str  # one line, starting with the key or variable it is about


def findings(cfg: Config, environ: Mapping[str, str], now: datetime.datetime | None = None) -> list[Finding]:
    """Everything `mailhub check` reports about a configuration that loaded, errors first."""
    now = now or datetime.datetime.now(datetime.UTC)
    found: list[Finding] = []
    if cfg.tls.cert_file is not None:
        for fatal, problem in certificates.problems(cfg.tls.cert_file, now):
            found.append(Finding(ERROR if fatal else WARNING, problem))
    found += unknown_variables(environ)
    found += data_dir_problems(cfg)
    found += operator_address_problems(cfg)
    found += index_problems(cfg)
    return sorted(found, key=lambda f: f.level != ERROR)


def unknown_variables(environ: Mapping[str, str]) -> list[Finding]:
    known = {env_name(section, key) for section, key in SCHEMA}
    found = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known or name in OTHER_VARIABLES:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else " (docs/configuration.md lists the settings)"
        found.append(Finding(WARNING, f"{name}: no such setting, ignored{hint}"))
    return found


def data_dir_problems(cfg: Config) -> list[Finding]:
    """A data folder (or, before the first start, the folder it would be made in) the hub's user
    cannot write, and a file system with less free space than /healthz accepts
    (metrics.health_min_free_bytes) or than storage.min_free_bytes."""
    folder = Path(cfg.data_dir).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    found = []
    if not existing.is_dir():
        found.append(Finding(ERROR, f"data_dir: {existing} is not a folder"))
        return found
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the data folder" if existing == folder else f"{existing}, where the data folder would be made,"
        found.append(Finding(ERROR, f"data_dir: {what} is not writable by this user (uid {os.getuid()})"))
    free = shutil.disk_usage(existing).free
    floor = max(cfg.metrics.health_min_free_bytes, cfg.storage.min_free_bytes)
    if free < floor:
        found.append(
            Finding(
                WARNING,
                f"data_dir: only {free / 1024**2:.0f} MB free on the file system of {existing} "
                f"(under {floor / 1024**2:.0f} MB: /healthz answers 503"
                f"{', new mail is refused' if free < cfg.storage.min_free_bytes else ''})",
            )
        )
    return found


def index_problems(cfg: Config) -> list[Finding]:
    """A PostgreSQL index (storage.index) that cannot be reached now, or that a newer hub migrated: a
    warning (`check` may run where the service's PGPASSWORD is not set; the hub's start says it
    again, in one line, if it is so then)."""
    if not cfg.storage.index:
        return []
    from storage import StorageError

    index = cfg.index_location
    try:
        conn = index.connect_readonly(timeout=5)
    except StorageError as exc:
        return [Finding(WARNING, f"storage.index: {exc}")]
    try:
        from storage.postgres import latest_version, schema_version

        version = schema_version(conn.raw)  # type: ignore[attr-defined]  # a PgConnection
    finally:
        conn.close()
    if version > latest_version():
        return [
            Finding(
                WARNING,
                f"storage.index: the database at {index.where()} is at schema version {version}, newer than"
                f" this hub knows ({latest_version()}): the hub refuses to start on it",
            )
        ]
    return []


def operator_address_problems(cfg: Config) -> list[Finding]:
    """lifecycle.operator_address naming postmaster@ itself (relay/smtp/postmaster.py sends
    postmaster@ there: it has to be a site's address or a remote one)."""
    address = cfg.lifecycle.operator_address
    local, at, domain = address.rpartition("@")
    if address.lower() == "postmaster" or at and local.lower() == "postmaster" and domain.lower() in cfg.domain:
        return [
            Finding(
                WARNING,
                f"lifecycle.operator_address: {address} is the postmaster address itself, which goes to"
                " lifecycle.operator_address: name a site's address (or, with the relay, a remote one)",
            )
        ]
    return []
