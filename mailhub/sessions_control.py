# `mailhub sessions`: who is connected to the running hub (protocol, site, client address, since,
# bytes in and out, last command) and `--kick SITE`, which ends that site's sessions with each
# protocol's goodbye (SMTP 421, once a transaction in flight is answered; POP3 -ERR, without
# applying deletions; IMAP * BYE). The hub's side registers the control commands `sessions` and
# `sessions.kick`; the CLI side asks them and prints the answer. In a cluster (several nodes on one
# PostgreSQL index) a node lists its own sessions only, each row naming the node; `--all` asks every
# node through PostgreSQL (their cluster links answer) and names those that do not; `--kick SITE`
# always asks every node that way (the node holding the site's sessions ends them).
# Must never: show a command's arguments (relay/sessions.py keeps the verb only).
import json
import sys
import time

from relay.sessions import SessionRegistry

from .control import ControlError, ControlServer
from .report_format import human_size, iso_time, printable

EXIT_FAILED = 1


def register_session_commands(control: ControlServer, registry: SessionRegistry, node: str = "") -> None:
    """`node`: this node's name when it is one of a cluster (named in the answers), else ""."""

    def rows(infos) -> list[dict]:
        return [{**info.as_dict(), "node": node} if node else info.as_dict() for info in infos]

    def listing(_request: dict) -> dict:
        answer = {"sessions": rows(registry.listing()), "now": time.time()}
        return {**answer, "node": node} if node else answer

    def kick(request: dict) -> dict:
        site = request.get("site")
        if not isinstance(site, str) or not site:
            raise ControlError('sessions.kick needs "site", a site name')
        answer = {"site": site, "ended": rows(registry.kick(site))}
        return {**answer, "node": node} if node else answer

    control.register("sessions", listing)
    control.register("sessions.kick", kick)


def sessions_command(cfg, args) -> int:
    from .cli import ask_hub

    if args.kick is not None and cfg.storage.index:
        return _kick_on_every_node(cfg, args)
    if getattr(args, "all", False):
        return _all_nodes(cfg, args)
    if args.kick is not None:
        return _kick_here(cfg, args)
    answer = ask_hub(cfg, "sessions")
    if answer is None:
        return EXIT_FAILED
    if args.json:
        print(json.dumps(answer["sessions"], indent=2))
    elif not answer["sessions"]:
        print("no open sessions" + (f" on node {printable(answer['node'])}" if answer.get("node") else ""))
    else:
        _table(answer["sessions"], answer["now"])
        if answer.get("node"):
            print(f"(node {printable(answer['node'])} only: `mailhub sessions --all` lists every node's)")
    return 0


def _all_nodes(cfg, args) -> int:
    """`mailhub sessions --all`: every node's sessions, asked through the PostgreSQL index (each
    node's cluster link answers); the nodes that did not answer are named."""
    from storage import StorageError

    url = cfg.storage.index
    if not url:
        print(
            "mailhub: --all needs several nodes on a PostgreSQL index (storage.index); one hub: mailhub sessions",
            file=sys.stderr,
        )
        return EXIT_FAILED
    from storage.postgres.cluster import ask_nodes

    try:
        answers, missing = ask_nodes(url, "sessions")
    except StorageError as exc:
        print(f"mailhub: {exc}", file=sys.stderr)
        return EXIT_FAILED
    rows = [{**row, "node": node} for node in sorted(answers) for row in answers[node]]
    if args.json:
        print(json.dumps({"sessions": rows, "nodes": sorted(answers), "no_answer": missing}, indent=2))
    elif not rows:
        print(f"no open sessions on {len(answers)} node(s)")
    else:
        _table(rows, time.time(), nodes=True)
    for node in missing:
        print(f"mailhub: node {printable(node)} did not answer (its sessions are not listed)", file=sys.stderr)
    return EXIT_FAILED if missing else 0


def _kick_here(cfg, args) -> int:
    """`mailhub sessions --kick SITE` on this node (the running hub's control socket)."""
    from .cli import ask_hub

    answer = ask_hub(cfg, "sessions.kick", site=args.kick)
    if answer is None:
        return EXIT_FAILED
    if args.json:
        print(json.dumps(answer, indent=2))
    elif not answer["ended"]:
        print(f"site {printable(args.kick)} has no open session")
    else:
        print(f"ending {len(answer['ended'])} session(s) of site {printable(args.kick)}:")
        _table(answer["ended"], time.time())
    return 0 if answer["ended"] else EXIT_FAILED


def _kick_on_every_node(cfg, args) -> int:
    """`mailhub sessions --kick SITE` on several nodes (a PostgreSQL index): every node is asked
    through PostgreSQL to end the site's sessions (the node holding them does); says which node ended
    what and names the nodes that did not answer (their sessions, if any, are still open)."""
    from storage import StorageError
    from storage.cluster_events import ARGUMENT_MAX
    from storage.postgres.cluster import ask_nodes

    site = args.kick
    if not site or len(site) > ARGUMENT_MAX:
        print(f"mailhub: --kick needs a site name of 1 to {ARGUMENT_MAX} characters", file=sys.stderr)
        return EXIT_FAILED
    try:
        answers, missing = ask_nodes(cfg.storage.index, "sessions.kick", argument=site)
    except StorageError as exc:
        print(f"mailhub: {exc}", file=sys.stderr)
        print("mailhub: the other nodes were not asked; ending this node's sessions of the site only", file=sys.stderr)
        _kick_here(cfg, args)
        return EXIT_FAILED
    rows = [{**row, "node": node} for node in sorted(answers) for row in answers[node]]
    if args.json:
        print(json.dumps({"site": site, "ended": rows, "nodes": sorted(answers), "no_answer": missing}, indent=2))
    elif not rows:
        print(f"site {printable(site)} has no open session on {len(answers)} node(s)")
    else:
        nodes = sorted({row["node"] for row in rows})
        print(f"ending {len(rows)} session(s) of site {printable(site)} on node(s) {', '.join(map(printable, nodes))}:")
        _table(rows, time.time(), nodes=True)
    for node in missing:
        print(
            f"mailhub: node {printable(node)} did not answer (its sessions of the site, if any, are open)",
            file=sys.stderr,
        )
    return 0 if rows and not missing else EXIT_FAILED


def _table(rows: list[dict], now: float, nodes: bool = False) -> None:
    node = "NODE".ljust(16) + " " if nodes else ""
    print(f"{node}{'PROTO':<5} {'SITE':<20} {'CLIENT':<39} {'SINCE':<20} {'FOR':>8} {'IN':>10} {'OUT':>10}  COMMAND")
    for row in rows:
        where = f"{printable(row['node']):<16} " if nodes else ""
        print(
            f"{where}{row['protocol']:<5} {printable(row['site'] or '-'):<20} {row['client']:<39}"
            f" {iso_time(row['since'], millis=False):<20} {_duration(now - row['since']):>8}"
            f" {human_size(row['bytes_in']):>10} {human_size(row['bytes_out']):>10}  {row['command'] or '-'}"
        )


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
