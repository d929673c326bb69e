# The Prometheus alert rules the Ansible role installs (ansible/roles/mailhub/files/prometheus-alerts.yml):
# `promtool check rules` accepts them, `promtool test rules` runs the cases of
# tests/prometheus/alerts-test.yml (each alert fires on its series and not on those just short of
# it), every metric they read is one the hub exports, and every query of the Grafana dashboard is
# valid PromQL (checked by promtool as recording rules, the dashboard's variables filled in); the
# certificate-expiry metric follows tls.cert_file.
# promtool comes with Debian's `prometheus` package (bench/debian-packages.txt).
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from mailhub.tls_metrics import CertificateCollector

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "ansible" / "roles" / "mailhub" / "files" / "prometheus-alerts.yml"
RULE_TESTS = REPO / "tests" / "prometheus" / "alerts-test.yml"
DASHBOARD = REPO / "ansible" / "roles" / "mailhub" / "files" / "grafana-dashboard.json"
ALERTS = {
    "MailhubDown",
    "MailhubSiteStale",
    "MailhubMailboxNearQuota",
    "MailhubSiteDeferrals",
    "MailhubRelayQueueBacklog",
    "MailhubRelayQueueOldEntry",
    "MailhubDiskNearlyFull",
    "MailhubCertificateExpiring",
    "MailhubEventLoopLag",
}


def promtool(*args: str, cwd: Path = REPO) -> str:
    result = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_rules_pass_promtool_check():
    assert f"SUCCESS: {len(ALERTS)} rules found" in promtool("check", "rules", str(RULES))
    assert {rule["alert"] for rule in alert_rules()} == ALERTS


def test_rules_unit_tests():
    out = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert "SUCCESS" in out
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == ALERTS  # every alert has its cases


def test_rules_read_metrics_the_hub_defines():
    """Each mailhub_* name in the rules is defined in the code (a renamed metric fails here)."""
    source = "\n".join(
        p.read_text() for folder in ("mailhub", "relay", "storage", "directory") for p in (REPO / folder).rglob("*.py")
    )
    used = {name for rule in alert_rules() for name in re.findall(r"\bmailhub_[a-z_]+", rule["expr"])}
    assert used
    for name in used:
        base = name.removesuffix("_bucket")
        assert f'"{base}"' in source, f"{name} is not a metric of the hub"


def test_dashboard_queries_are_valid_promql(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    filled = [
        e.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$site", "beta").replace("$top", "10")
        for e in exprs
    ]
    assert all("$" not in e for e in filled), [e for e in filled if "$" in e]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"q{i}", "expr": e} for i, e in enumerate(filled)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    assert f"SUCCESS: {len(filled)} rules found" in promtool("check", "rules", str(path))
    # the top-N panels and the drill-down variable are there
    assert sum("topk($top," in e for e in exprs) >= 5
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["site"]["multi"] is False and "mailhub_site_waiting_messages" in variables["site"]["query"]["query"]
    )
    assert any("mailhub_imap_" in e for e in exprs)


def test_certificate_expiry_metric_follows_the_file(self_signed_certificate, tmp_path):
    """The metric MailhubCertificateExpiring reads: the notAfter of tls.cert_file, read again when the
    file is replaced (a renewed certificate shows at the next scrape); no sample, no exception, for a
    file that is not a certificate."""

    def expiry(collector) -> list[float]:
        return [s.value for family in collector.collect() for s in family.samples]

    cert, key = self_signed_certificate
    path = tmp_path / "cert.pem"
    shutil.copy(cert, path)
    collector = CertificateCollector(path)
    (first,) = expiry(collector)
    assert abs(first - (time.time() + 86400)) < 600  # made with -days 1
    subprocess.run(
        ["openssl", "req", "-x509", "-key", key, "-subj", "/CN=localhost", "-days", "30", "-out", str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    (renewed,) = expiry(collector)
    assert abs(renewed - (time.time() + 30 * 86400)) < 600
    path.write_text("not a certificate\n")
    assert expiry(collector) == []
    assert expiry(CertificateCollector(None)) == []
