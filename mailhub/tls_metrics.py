# The TLS certificate's expiry as a metric (issue 26, alert "certificate expiring"): the notAfter of
# the first certificate in tls.cert_file, read at scrape time and cached while the file's mtime and
# size stay the same, so a renewed certificate shows at the next scrape (also before a reload).
# Must never: raise into the scrape (an unreadable file is a log line and no sample), or read the key.
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

log = logging.getLogger("mailhub.metrics")


def not_after(pem: bytes) -> float:
    """Unix time at which the first certificate of a PEM chain expires; ValueError if none."""
    from cryptography import x509  # pgpy's dependency; imported here, only hubs with TLS need it

    return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()


class CertificateCollector:
    def __init__(self, cert_file: Path | None):
        self.cert_file = cert_file
        self._seen: tuple[tuple[int, int], float] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.cert_file is None:
            return
        try:
            st = os.stat(self.cert_file)
            key = (st.st_mtime_ns, st.st_size)
            if self._seen is None or self._seen[0] != key:
                self._seen = (key, not_after(Path(self.cert_file).read_bytes()))
        except (OSError, ValueError) as exc:
            log.warning("certificate expiry unknown (%s): %s", self.cert_file, exc)
            return
        yield GaugeMetricFamily(
            "mailhub_tls_certificate_expiry_timestamp_seconds",
            "When the certificate in tls.cert_file expires (its notAfter, Unix time).",
            value=self._seen[1],
        )

    def describe(self) -> list[Metric]:
        return []
