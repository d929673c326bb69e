#!/usr/bin/env python3
# Writes the Grafana dashboard of the hub (ansible/roles/mailhub/files/grafana-dashboard.json) from
# the panel list below: overview and stale sites, top-N sites (backlog, bytes in and out, deferrals;
# the $top variable), IMAP, a per-site drill-down (the $site variable), deferrals, ingest latency, disk.
# Edit the panels here and run it; `--check` exits 1 when the JSON file is out of date.
import json
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent.parent / "ansible" / "roles" / "mailhub" / "files" / "grafana-dashboard.json"
INSTANCE = 'instance=~"$instance"'
SITE = 'site=~"$site"'
RATE = "$__rate_interval"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
I, S, R = INSTANCE, SITE, RATE  # noqa: E741 -- short names keep the query lines below readable


class Layout:
    """Panels placed left to right in rows of 24 grid units, each section under a row header."""

    def __init__(self):
        self.panels: list[dict] = []
        self.x = self.y = 0

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y = 0, self.y + 8
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "id": len(self.panels) + 1,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def panel(self, title, targets, unit="short", kind="timeseries", w=8, desc="") -> None:
        if self.x + w > 24:
            self.x, self.y = 0, self.y + 8
        options = (
            {
                "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                "tooltip": {"mode": "multi", "sort": "desc"},
            }
            if kind == "timeseries"
            else {}
        )
        self.panels.append(
            {
                "type": kind,
                "title": title,
                "id": len(self.panels) + 1,
                "datasource": DATASOURCE,
                "description": desc,
                "gridPos": {"h": 8, "w": w, "x": self.x, "y": self.y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": options,
                "targets": [
                    {
                        "datasource": DATASOURCE,
                        "refId": chr(65 + i),
                        "expr": expr,
                        "legendFormat": legend,
                        **({"instant": True, "format": "table"} if kind == "table" else {}),
                    }
                    for i, (expr, legend) in enumerate(targets)
                ],
            }
        )
        self.x += w


layout = Layout()
newrow, panel = layout.row, layout.panel
TOP = "$top"  # the top-N variable: at 650 sites one line per site is unreadable


def top(expr: str) -> str:
    return f"topk({TOP}, {expr})"


newrow("Overview")
panel(
    "Stale sites",
    [(f"sum(mailhub_site_stale{{{I}}})", "stale")],
    "short",
    kind="stat",
    w=6,
    desc="Sites with mail waiting that have fetched none for liveness.stale_after (alert MailhubSiteStale).",
)
panel(
    "Sites with mail waiting",
    [(f"count(mailhub_site_waiting_messages{{{I}}} > 0)", "sites")],
    "short",
    kind="stat",
    w=6,
)
panel(
    "Mail waiting (all sites)",
    [(f"sum(mailhub_site_waiting_bytes{{{I}}})", "waiting")],
    "bytes",
    kind="stat",
    w=6,
    desc="Octets in mailboxes not fetched yet by their sites.",
)
panel(
    "Oldest waiting mail", [(f"max(mailhub_site_oldest_waiting_age_seconds{{{I}}})", "oldest")], "s", kind="stat", w=6
)
panel(
    "Stale sites: age of their oldest waiting mail",
    [
        (
            f"max by (site) (mailhub_site_oldest_waiting_age_seconds{{{I}}})"
            f" and on (site) (max by (site) (mailhub_site_stale{{{I}}}) == 1)",
            "{{site}}",
        )
    ],
    "s",
    kind="table",
    w=24,
    desc="Each stale site and how long its oldest mail has waited. `mailhub site show NAME` tells more.",
)

newrow("Top sites (top $top)")
panel(
    "Backlog: octets waiting",
    [(top(f"max by (site) (mailhub_site_waiting_bytes{{{I}}})"), "{{site}}")],
    "bytes",
    desc="The sites with the most octets not fetched yet.",
)
panel(
    "Backlog: oldest waiting mail",
    [(top(f"max by (site) (mailhub_site_oldest_waiting_age_seconds{{{I}}})"), "{{site}}")],
    "s",
    desc="The sites whose oldest unfetched mail is the oldest.",
)
panel(
    "Deferrals",
    [(top(f"sum by (site, side) (rate(mailhub_site_deferrals_total{{{I}}}[{R}]))"), "{{site}} ({{side}})")],
    "ops",
    desc="4xx deferrals by the quota and drain-time policy, by the site they were for.",
)
panel(
    "Bytes in (sent by the site)",
    [(top(f"sum by (site) (rate(mailhub_smtp_received_bytes_total{{{I}}}[{R}]))"), "{{site}}")],
    "Bps",
)
panel(
    "Bytes out (fetched by the site, POP3 + IMAP)",
    [
        (
            top(
                f"sum by (site) (rate(mailhub_pop3_served_bytes_total{{{I}}}[{R}]))"
                f" or sum by (site) (rate(mailhub_imap_served_bytes_total{{{I}}}[{R}]))"
            ),
            "{{site}}",
        )
    ],
    "Bps",
    desc="POP3 where a site uses POP3, else IMAP (a site using both shows its POP3 rate).",
)
panel(
    "Mailbox quota usage",
    [
        (
            top(f'max by (site) (mailhub_site_quota_usage_ratio{{{I}, quota=~"mailbox_bytes|mailbox_messages"}})'),
            "{{site}}",
        )
    ],
    "percentunit",
    desc="At 1 the hub defers new mail for the site (alert MailhubMailboxNearQuota at 0.9).",
)

newrow("IMAP")
panel(
    "Open IMAP sessions",
    [(f"sum(mailhub_imap_sessions_active{{{I}}})", "IMAP"), (f"sum(mailhub_pop3_sessions_active{{{I}}})", "POP3")],
    "short",
)
panel(
    "IMAP sessions ended, by outcome",
    [(f"sum by (outcome) (rate(mailhub_imap_sessions_total{{{I}}}[{R}]))", "{{outcome}}")],
    "ops",
)
panel(
    "IMAP downloads",
    [
        (f"sum(rate(mailhub_imap_served_bytes_total{{{I}}}[{R}]))", "octets/s"),
        (f"sum(rate(mailhub_imap_messages_served_total{{{I}}}[{R}]))", "mails/s"),
    ],
    "short",
    desc="Body literals sent by FETCH (octets) and whole mails fetched.",
)

newrow("Site drill-down: $site")
panel(
    "Received and delivered",
    [
        (f"sum by (site) (rate(mailhub_smtp_received_bytes_total{{{I}, {S}}}[{R}]))", "sent by {{site}}"),
        (f"sum by (site) (rate(mailhub_smtp_delivered_bytes_total{{{I}, {S}}}[{R}]))", "delivered to {{site}}"),
    ],
    "Bps",
    desc="Octets per second the site sent, and put into its mailbox.",
)
panel(
    "Fetched (POP3, IMAP)",
    [
        (f"sum by (site) (rate(mailhub_pop3_served_bytes_total{{{I}, {S}}}[{R}]))", "POP3 {{site}}"),
        (f"sum by (site) (rate(mailhub_imap_served_bytes_total{{{I}, {S}}}[{R}]))", "IMAP {{site}}"),
    ],
    "Bps",
)
panel(
    "Waiting and held",
    [
        (f"max by (site) (mailhub_site_waiting_bytes{{{I}, {S}}})", "waiting {{site}}"),
        (f"max by (site) (mailhub_mailbox_bytes{{{I}, {S}}})", "held {{site}}"),
    ],
    "bytes",
    desc="Waiting: not fetched yet. Held: in the mailbox, fetched or not (what the mailbox quota counts).",
)
panel(
    "Liveness",
    [
        (f"max by (site) (mailhub_site_oldest_waiting_age_seconds{{{I}, {S}}})", "oldest waiting {{site}}"),
        (
            f"time() - max by (site) (mailhub_site_last_fetch_timestamp_seconds{{{I}, {S}}})",
            "since last fetch {{site}}",
        ),
        (
            f"time() - max by (site) (mailhub_site_last_login_timestamp_seconds{{{I}, {S}}})",
            "since last login {{site}}",
        ),
        (f"max(mailhub_liveness_stale_after_seconds{{{I}}})", "stale after"),
    ],
    "s",
)
panel(
    "Drain rate",
    [(f"max by (site) (mailhub_site_drain_rate_bytes_per_second{{{I}, {S}}})", "{{site}}")],
    "Bps",
    desc="How fast each site downloads, as the hub estimates it.",
)
panel(
    "Drain time (backlog / drain rate)",
    [
        (f"max by (site) (mailhub_site_drain_time_seconds{{{I}, {S}}})", "{{site}}"),
        (f"max by (site) (mailhub_site_max_drain_time_seconds{{{I}, {S}}})", "limit {{site}}"),
    ],
    "s",
    desc="Time each site needs to fetch what waits for it at its drain rate, and its limit"
    " (new mail that would pass it is deferred).",
)
panel(
    "Pacing of senders",
    [(f"max by (site) (mailhub_site_pacing_rate_bytes_per_second{{{I}, {S}}})", "{{site}}")],
    "Bps",
    desc="Rate at which senders' data for each site is read while paced (0: not paced).",
)
panel(
    "Quota usage",
    [(f"max by (site, quota) (mailhub_site_quota_usage_ratio{{{I}, {S}}})", "{{site}} {{quota}}")],
    "percentunit",
    desc="Share of each quota used; at 1 the hub defers new mail for the site.",
)
panel(
    "Deferrals",
    [(f"sum by (site, side) (rate(mailhub_site_deferrals_total{{{I}, {S}}}[{R}]))", "{{site}} ({{side}})")],
    "ops",
)

newrow("Deferrals and refusals")
panel(
    "Deferrals by reason",
    [(f"sum by (reason) (rate(mailhub_smtp_deferrals_total{{{I}}}[{R}]))", "{{reason}}")],
    "ops",
    desc="4xx replies given by policy (quotas, fairness, disk), by reason.",
)
panel(
    "Transactions by outcome",
    [(f"sum by (outcome, code) (rate(mailhub_smtp_transactions_total{{{I}}}[{R}]))", "{{outcome}} {{code}}")],
    "ops",
)
panel(
    "MAIL/RCPT refusals",
    [(f"sum by (command, code) (rate(mailhub_smtp_refusals_total{{{I}}}[{R}]))", "{{command}} {{code}}")],
    "ops",
)

newrow("Ingest latency")
panel(
    "End of data to 250 (quantiles)",
    [
        (
            f"histogram_quantile(0.5, sum by (le) (rate(mailhub_smtp_ingest_duration_seconds_bucket{{{I}}}[{R}])))",
            "p50",
        ),
        (
            f"histogram_quantile(0.95, sum by (le) (rate(mailhub_smtp_ingest_duration_seconds_bucket{{{I}}}[{R}])))",
            "p95",
        ),
        (
            f"histogram_quantile(0.99, sum by (le) (rate(mailhub_smtp_ingest_duration_seconds_bucket{{{I}}}[{R}])))",
            "p99",
        ),
    ],
    "s",
    w=12,
    desc="Time from the end of data to the durable commit and 250 reply of accepted mails.",
)
panel(
    "End of data to 250 (mean)",
    [
        (
            f"sum(rate(mailhub_smtp_ingest_duration_seconds_sum{{{I}}}[{R}]))"
            f" / sum(rate(mailhub_smtp_ingest_duration_seconds_count{{{I}}}[{R}]))",
            "mean",
        )
    ],
    "s",
    w=12,
)

newrow("Sessions and outbound queue")
panel(
    "Open sessions",
    [
        (f"sum(mailhub_smtp_sessions_active{{{I}}})", "SMTP"),
        (f"sum(mailhub_pop3_sessions_active{{{I}}})", "POP3"),
        (f"sum(mailhub_imap_sessions_active{{{I}}})", "IMAP"),
    ],
    "short",
)
panel(
    "Sessions per second",
    [
        (f"sum by (outcome) (rate(mailhub_smtp_sessions_total{{{I}}}[{R}]))", "SMTP {{outcome}}"),
        (f"sum by (outcome) (rate(mailhub_pop3_sessions_total{{{I}}}[{R}]))", "POP3 {{outcome}}"),
        (f"sum by (outcome) (rate(mailhub_imap_sessions_total{{{I}}}[{R}]))", "IMAP {{outcome}}"),
    ],
    "ops",
)
panel(
    "Outbound queue",
    [
        (f"sum(mailhub_outbound_queue_messages{{{I}}})", "mails"),
        (f"max(mailhub_outbound_queue_oldest_age_seconds{{{I}}})", "oldest (s)"),
    ],
    "short",
    desc="Mails waiting for relay to other networks, and the age of the oldest.",
)

newrow("Event loop")
panel(
    "Event loop lag (quantiles)",
    [
        (f"histogram_quantile(0.5, sum by (le) (rate(mailhub_event_loop_lag_seconds_bucket{{{I}}}[{R}])))", "p50"),
        (f"histogram_quantile(0.99, sum by (le) (rate(mailhub_event_loop_lag_seconds_bucket{{{I}}}[{R}])))", "p99"),
        (f"histogram_quantile(1, sum by (le) (rate(mailhub_event_loop_lag_seconds_bucket{{{I}}}[{R}])))", "max"),
    ],
    "s",
    w=12,
    desc="How late the hub's event loop runs its callbacks: every SMTP, POP3 and IMAP reply waits this long.",
)
panel(
    "Event loop stalls",
    [(f"sum(increase(mailhub_event_loop_stalls_total{{{I}}}[{R}]))", "stalls")],
    "short",
    w=12,
    desc="Times the loop was late by log.stall_threshold or more; the hub's log names what it was doing.",
)

newrow("Disk and storage")
panel(
    "Free disk (data folder)",
    [(f"min(mailhub_disk_free_bytes{{{I}}} / mailhub_disk_size_bytes{{{I}}})", "free")],
    "percentunit",
    kind="gauge",
    w=6,
    desc="Share of the data folder's file system that is free.",
)
panel(
    "Disk",
    [
        (f"mailhub_disk_free_bytes{{{I}}}", "free {{instance}}"),
        (f"mailhub_disk_size_bytes{{{I}}}", "size {{instance}}"),
    ],
    "bytes",
    w=6,
)
panel(
    "Message files",
    [
        (f"sum(mailhub_storage_blobs_bytes{{{I}}})", "stored"),
        (f"sum(mailhub_storage_single_instance_saved_bytes{{{I}}})", "saved by single instance"),
    ],
    "bytes",
    w=6,
)
panel("Message files (count)", [(f"sum(mailhub_storage_blobs{{{I}}})", "blobs")], "short", w=6)

newrow("Process")
panel("Hub up", [(f"up{{{I}}}", "{{instance}}")], "short", kind="stat", w=6)
panel(
    "Certificate expires in",
    [(f"min(mailhub_tls_certificate_expiry_timestamp_seconds{{{I}}}) - time()", "tls.cert_file")],
    "s",
    kind="stat",
    w=6,
)
panel("Resident memory", [(f"process_resident_memory_bytes{{{I}}}", "{{instance}}")], "bytes", w=6)
panel("CPU", [(f"rate(process_cpu_seconds_total{{{I}}}[{R}])", "{{instance}}")], "percentunit", w=6)
panel(
    "Open file descriptors",
    [(f"process_open_fds{{{I}}}", "open {{instance}}"), (f"process_max_fds{{{I}}}", "limit {{instance}}")],
    "short",
    w=6,
)


def var(name, label, query):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "refresh": 2,
        "query": {"query": query, "refId": name},
        "definition": query,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


dashboard = {
    "title": "DICOM Mail Hub",
    "uid": "dicom-mail-hub",
    "editable": True,
    "schemaVersion": 39,
    "version": 1,
    "tags": ["mailhub", "dicom"],
    "timezone": "browser",
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "graphTooltip": 1,
    "description": "DICOM Mail Hub: stale sites, top sites by backlog, traffic and deferrals, IMAP, a per-site"
    " drill-down ($site), ingest latency, disk.",
    "annotations": {"list": []},
    "links": [],
    "templating": {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
                "regex": "",
            },
            var("instance", "Hub", "label_values(mailhub_smtp_sessions_total, instance)"),
            {
                **var("site", "Site", 'label_values(mailhub_site_waiting_messages{instance=~"$instance"}, site)'),
                "multi": False,
                "includeAll": False,
                "current": {},
                "description": "The site the drill-down rows show.",
            },
            {
                "name": "top",
                "label": "Top N",
                "type": "custom",
                "query": "5,10,20,50",
                "current": {"selected": True, "text": "10", "value": "10"},
                "options": [{"selected": n == "10", "text": n, "value": n} for n in ("5", "10", "20", "50")],
                "multi": False,
                "includeAll": False,
                "description": "How many sites the top-N panels show.",
            },
        ]
    },
    "panels": layout.panels,
}
text = json.dumps(dashboard, indent=2) + "\n"
if sys.argv[1:] == ["--check"]:
    if OUTPUT.read_text() != text:
        sys.exit(f"{OUTPUT} is out of date: run {sys.argv[0]}")
else:
    OUTPUT.write_text(text)
