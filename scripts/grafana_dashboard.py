#!/usr/bin/env python3
# Writes the Grafana dashboard of the hub (ansible/roles/mailhub/files/grafana-dashboard.json) from
# the panel list below: traffic, backlog and drain time per site, deferrals, ingest latency, disk.
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
                    {"datasource": DATASOURCE, "refId": chr(65 + i), "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)
                ],
            }
        )
        self.x += w


layout = Layout()
newrow, panel = layout.row, layout.panel

newrow("Traffic per site")
panel(
    "Received (by sending site)",
    [(f"sum by (site) (rate(mailhub_smtp_received_bytes_total{{{I}, {S}}}[{R}]))", "{{site}}")],
    "Bps",
    desc="Octets of accepted mails per second, by the site that sent them ('-': unauthenticated peer networks).",
)
panel(
    "Delivered (by receiving site)",
    [(f"sum by (site) (rate(mailhub_smtp_delivered_bytes_total{{{I}, {S}}}[{R}]))", "{{site}}")],
    "Bps",
    desc="Octets per second put into each site's mailbox.",
)
panel(
    "Downloaded (POP3, by site)",
    [(f"sum by (site) (rate(mailhub_pop3_served_bytes_total{{{I}, {S}}}[{R}]))", "{{site}}")],
    "Bps",
    desc="Octets per second the sites fetched from their mailboxes.",
)
panel(
    "Mails received per second",
    [(f"sum by (site) (rate(mailhub_smtp_received_messages_total{{{I}, {S}}}[{R}]))", "{{site}}")],
    "ops",
)
panel(
    "Mails delivered per second",
    [(f"sum by (site) (rate(mailhub_smtp_delivered_messages_total{{{I}, {S}}}[{R}]))", "{{site}}")],
    "ops",
)
panel(
    "Mails downloaded per second",
    [(f"sum by (site) (rate(mailhub_pop3_messages_served_total{{{I}, {S}}}[{R}]))", "{{site}}")],
    "ops",
)

newrow("Backlog and drain time per site")
panel(
    "Backlog (octets waiting)",
    [(f"sum by (site) (mailhub_mailbox_bytes{{{I}, {S}}})", "{{site}}")],
    "bytes",
    desc="Octets waiting in each site's mailbox.",
)
panel("Backlog (mails waiting)", [(f"sum by (site) (mailhub_mailbox_messages{{{I}, {S}}})", "{{site}}")], "short")
panel(
    "Age of the oldest waiting mail",
    [(f"time() - max by (site) (mailhub_mailbox_oldest_message_timestamp_seconds{{{I}, {S}}})", "{{site}}")],
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
    "Not yet downloaded",
    [(f"max by (site) (mailhub_site_waiting_bytes{{{I}, {S}}})", "{{site}}")],
    "bytes",
    desc="Octets waiting for each site that it has not downloaded yet (what the drain time is computed from).",
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
    [(f"sum(mailhub_smtp_sessions_active{{{I}}})", "SMTP"), (f"sum(mailhub_pop3_sessions_active{{{I}}})", "POP3")],
    "short",
)
panel(
    "Sessions per second",
    [
        (f"sum by (outcome) (rate(mailhub_smtp_sessions_total{{{I}}}[{R}]))", "SMTP {{outcome}}"),
        (f"sum by (outcome) (rate(mailhub_pop3_sessions_total{{{I}}}[{R}]))", "POP3 {{outcome}}"),
        (f"sum(rate(mailhub_imap_sessions_total{{{I}}}[{R}]))", "IMAP"),
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
    "description": "DICOM Mail Hub: traffic, backlog and drain time per site, deferrals, ingest latency, disk.",
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
            var("site", "Site", 'label_values(mailhub_mailbox_messages{instance=~"$instance"}, site)'),
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
