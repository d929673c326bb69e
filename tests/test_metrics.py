# The Prometheus endpoint (issue 7) against a real hub process: scripted SMTP and POP3 traffic,
# then one scrape of /metrics whose counters must match the traffic exactly; /healthz; the scraped
# text passes `promtool check metrics`; a real Prometheus server scrapes the hub and answers a query.
import json
import poplib
import shutil
import smtplib
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.ports import free_port

from conftest import ALPHA_BETA, ALPHA_BETA_B2, PASSWORD, make_message, wait_for

MAX_SIZE = 100_000


def fetch(hub, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{hub.ports['metrics']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, ((label, value), ...)): value}"""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scraped: dict, name: str, **labels) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


def smtp(hub, login: str | None) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", hub.smtp_port, timeout=30)
    client.ehlo("gateway.test")
    if login:
        client.login(login, PASSWORD)
    return client


def send(hub, login: str, rcpts: list[str], message: bytes) -> tuple[int, bytes]:
    client = smtp(hub, login)
    try:
        assert client.mail(f"{login}@hub.test")[0] == 250
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        return client.data(message)
    finally:
        client.quit()


@pytest.fixture
def traffic_hub(make_hub):
    hub = make_hub(sites=ALPHA_BETA_B2 + (("gamma", "gamma@hub.test"),), MAILHUB_SMTP_MAX_MESSAGE_SIZE=str(MAX_SIZE))
    return hub.start()


def run_traffic(hub) -> dict:
    """Scripted traffic; returns what the counters must show."""
    sizes = {}
    to_beta = [make_message(n, subject=f"m{n}") for n in (1_000, 5_000, 20_000)]
    for message in to_beta:
        code, reply = send(hub, "alpha", ["beta@hub.test"], message)
        assert code == 250, reply
    both = make_message(3_000, subject="both")
    assert send(hub, "alpha", ["beta@hub.test", "b2@hub.test", "gamma@hub.test"], both)[0] == 250
    back = make_message(2_000, subject="back")
    assert send(hub, "beta", ["alpha@hub.test"], back)[0] == 250
    sizes["alpha"] = sum(map(len, to_beta)) + len(both)
    sizes["beta_in"] = sum(map(len, to_beta)) + len(both)
    sizes["gamma_in"] = len(both)
    sizes["beta"] = len(back)

    # Refusals at MAIL and RCPT, and one transaction refused at the end of data (too big).
    client = smtp(hub, "alpha")
    try:
        assert client.mail("beta@hub.test")[0] == 553  # sender not owned
        assert client.mail("alpha@hub.test", [f"SIZE={MAX_SIZE + 1}"])[0] == 552
        assert client.mail("alpha@hub.test")[0] == 250
        assert client.rcpt("nobody@hub.test")[0] == 550  # unknown user
        assert client.rcpt("someone@example.org")[0] == 550  # no route
        assert client.rcpt("beta@hub.test")[0] == 250
        code, _ = client.data(make_message(MAX_SIZE + 5_000))
        assert code == 552
    finally:
        client.quit()
    unauthenticated = smtp(hub, None)
    try:
        assert unauthenticated.mail("x@example.org")[0] == 250
        assert unauthenticated.rcpt("beta@hub.test")[0] == 530  # authentication required
    finally:
        unauthenticated.quit()
    sizes["smtp_sessions"] = 3 + 1 + 1 + 1 + 1

    # POP3: beta and gamma download everything (RETR) and delete it.
    served = {}
    for site in ("beta", "gamma"):
        rows = hub.query(
            "SELECT m.size FROM mailbox b JOIN messages m ON m.queue_id = b.queue_id"
            " JOIN sites s ON s.id = b.site_id WHERE s.name = ? ORDER BY b.uid",
            site,
        )
        served[site] = (len(rows), sum(size for (size,) in rows))
        pop = poplib.POP3("127.0.0.1", hub.ports["pop3"], timeout=30)
        pop.user(site)
        pop.pass_(PASSWORD)
        count, _ = pop.stat()
        assert count == len(rows)
        for number in range(1, count + 1):
            pop.retr(number)
            pop.dele(number)
        pop.quit()
    sizes["served"] = served
    return sizes


def test_counters_match_scripted_traffic(traffic_hub):
    hub = traffic_hub
    expected = run_traffic(hub)
    status, text = fetch(hub, "/metrics")
    assert status == 200
    m = samples(text)

    assert value(m, "mailhub_smtp_sessions_total", outcome="admitted") == expected["smtp_sessions"]
    assert value(m, "mailhub_smtp_transactions_total", outcome="accepted", code="250") == 5
    assert value(m, "mailhub_smtp_transactions_total", outcome="rejected", code="552") == 1
    assert sum(v for (name, _), v in m.items() if name == "mailhub_smtp_transactions_total") == 6
    assert value(m, "mailhub_smtp_refusals_total", command="mail", code="553") == 1
    assert value(m, "mailhub_smtp_refusals_total", command="mail", code="552") == 1
    assert value(m, "mailhub_smtp_refusals_total", command="rcpt", code="550") == 2
    assert value(m, "mailhub_smtp_refusals_total", command="rcpt", code="530") == 1

    assert value(m, "mailhub_smtp_received_messages_total", site="alpha") == 4
    assert value(m, "mailhub_smtp_received_bytes_total", site="alpha") == expected["alpha"]
    assert value(m, "mailhub_smtp_received_messages_total", site="beta") == 1
    assert value(m, "mailhub_smtp_received_bytes_total", site="beta") == expected["beta"]
    assert value(m, "mailhub_smtp_delivered_messages_total", site="beta") == 4  # b2 + beta: one entry
    assert value(m, "mailhub_smtp_delivered_bytes_total", site="beta") == expected["beta_in"]
    assert value(m, "mailhub_smtp_delivered_messages_total", site="gamma") == 1
    assert value(m, "mailhub_smtp_delivered_bytes_total", site="gamma") == expected["gamma_in"]
    assert value(m, "mailhub_smtp_delivered_messages_total", site="alpha") == 1
    assert value(m, "mailhub_smtp_ingest_duration_seconds_count") == 5
    assert value(m, "mailhub_smtp_ingest_duration_seconds_bucket", le="+Inf") == 5
    assert 0 < value(m, "mailhub_smtp_ingest_duration_seconds_sum") < 30

    for site in ("beta", "gamma"):
        messages, octets = expected["served"][site]
        assert value(m, "mailhub_pop3_messages_served_total", site=site) == messages
        assert value(m, "mailhub_pop3_served_bytes_total", site=site) == octets
    assert value(m, "mailhub_pop3_sessions_total", outcome="quit") == 2

    # Storage gauges from the index: after the downloads only alpha's mail from beta is left.
    ((blobs, size),) = hub.query("SELECT count(*), sum(size) FROM messages")
    assert blobs == 1
    assert value(m, "mailhub_storage_blobs") == blobs
    assert value(m, "mailhub_storage_blobs_bytes") == size
    assert value(m, "mailhub_storage_single_instance_saved_bytes") == 0
    assert value(m, "mailhub_mailbox_messages", site="alpha") == 1
    assert value(m, "mailhub_mailbox_bytes", site="alpha") == size
    assert value(m, "mailhub_mailbox_messages", site="beta") == 0
    assert ("mailhub_mailbox_messages", (("site", "gamma"),)) in m
    assert value(m, "mailhub_disk_free_bytes") > 0
    assert value(m, "mailhub_disk_size_bytes") >= value(m, "mailhub_disk_free_bytes")
    assert value(m, "process_resident_memory_bytes") > 0
    assert value(m, "mailhub_smtp_sessions_active") == 0

    promtool = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert promtool.returncode == 0 and not promtool.stdout.strip() and not promtool.stderr.strip(), (
        promtool.stdout + promtool.stderr
    )


def test_single_instance_savings_and_empty_hub(make_hub):
    hub = make_hub(sites=ALPHA_BETA + (("gamma", "gamma@hub.test"),))
    hub.start()
    message = make_message(4_000)
    assert send(hub, "alpha", ["beta@hub.test", "gamma@hub.test"], message)[0] == 250
    m = samples(fetch(hub, "/metrics")[1])
    ((size,),) = hub.query("SELECT size FROM messages")
    assert value(m, "mailhub_storage_blobs") == 1
    assert value(m, "mailhub_storage_blobs_bytes") == size
    assert value(m, "mailhub_storage_single_instance_saved_bytes") == size
    for site in ("beta", "gamma"):
        assert value(m, "mailhub_mailbox_messages", site=site) == 1
        assert value(m, "mailhub_mailbox_bytes", site=site) == size
        ((delivered,),) = hub.query(
            "SELECT b.delivered_at FROM mailbox b JOIN sites s ON s.id = b.site_id WHERE s.name = ?", site
        )
        assert value(m, "mailhub_mailbox_oldest_message_timestamp_seconds", site=site) == delivered
    assert value(m, "mailhub_mailbox_messages", site="alpha") == 0
    assert value(m, "mailhub_mailbox_bytes", site="alpha") == 0
    assert ("mailhub_mailbox_oldest_message_timestamp_seconds", (("site", "alpha"),)) not in m


def test_healthz(make_hub):
    hub = make_hub()
    hub.start()
    assert fetch(hub, "/healthz") == (200, "ok\n")
    assert fetch(hub, "/nothing")[0] == 404
    hub.stop()

    low = make_hub(MAILHUB_METRICS_HEALTH_MIN_FREE_BYTES=str(10**18))
    low.start()
    status, text = fetch(low, "/healthz")
    assert status == 503
    assert text.startswith("disk low:"), text


def test_node_label_on_every_sample_and_at_reload(make_hub, tmp_path):
    settings = tmp_path / "hub.toml"
    settings.write_text('[metrics]\nnode = "hub-a"\n')
    hub = make_hub(sites=ALPHA_BETA)
    hub.config = settings
    hub.start()
    assert send(hub, "alpha", ["beta@hub.test"], make_message(2_000))[0] == 250
    families = list(text_string_to_metric_families(fetch(hub, "/metrics")[1]))
    labelled = [s for family in families for s in family.samples]
    assert len(labelled) > 50
    assert {s.labels.get("node") for s in labelled} == {"hub-a"}  # process, storage, relay, throttle alike
    m = samples(fetch(hub, "/metrics")[1])
    assert value(m, "mailhub_mailbox_messages", site="beta", node="hub-a") == 1
    assert value(m, "mailhub_smtp_received_messages_total", site="alpha", node="hub-a") == 1

    settings.write_text("")  # metrics.node is live at a reload: back to no label (one hub)
    result = hub.cli("reload", check=False)
    assert result.returncode == 0 and "metrics.node" in result.stdout, result
    plain = [s for family in text_string_to_metric_families(fetch(hub, "/metrics")[1]) for s in family.samples]
    assert plain and not [s for s in plain if "node" in s.labels]
    assert value(samples(fetch(hub, "/metrics")[1]), "mailhub_mailbox_messages", site="beta") == 1


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs the Debian prometheus package")
def test_real_prometheus_scrapes_the_hub(hub, tmp_path):
    for _ in range(3):
        assert send(hub, "alpha", ["beta@hub.test"], make_message(1_500))[0] == 250
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: mailhub\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{hub.ports['metrics']}']\n"
    )
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        query = urllib.parse.urlencode({"query": 'mailhub_smtp_received_messages_total{site="alpha"}'})

        def scraped() -> list | None:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=5) as r:
                    return json.load(r)["data"]["result"]
            except (urllib.error.URLError, ConnectionError):
                return None

        result = wait_for(
            scraped,
            timeout=60,
            interval=0.5,
            message=lambda: "Prometheus has the hub's series\n" + (tmp_path / "prometheus.log").read_text()[-3000:],
        )
        (series,) = result
        assert series["metric"]["job"] == "mailhub"
        assert float(series["value"][1]) == 3
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_a_node_name_with_quotes_backslashes_and_newlines_is_escaped_and_a_metrics_own_node_label_kept():
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from mailhub.metrics import WithNodeLabel

    registry = CollectorRegistry()
    Counter("mailhub_test_total", "a metric without node", ["site"], registry=registry).labels("alpha").inc()
    Counter("mailhub_test_own_total", "a metric with one", ["node"], registry=registry).labels("its-own").inc()
    hostile = 'hub "a"\\b\nmailhub_fake_total 1e9\n} {'
    text = generate_latest(WithNodeLabel(registry, hostile)).decode()
    assert "\nmailhub_fake_total" not in text, text  # no sample injected by the node name
    samples = {s.name: s.labels for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["mailhub_test_total"] == {"node": hostile, "site": "alpha"}
    assert samples["mailhub_test_own_total"] == {"node": "its-own"}
