# Prometheus metrics of the participant directory (the signed directory mails it stores), in a
# registry of the directory package's own; mailhub/metrics.py adds it to the one it exposes.
# Must never: raise into the directory mailer, or import from relay/ or mailhub/.
from prometheus_client import CollectorRegistry, Counter

REGISTRY = CollectorRegistry(auto_describe=True)

DIRECTORY_MAILS = Counter(
    "mailhub_directory_mails_total",
    "Signed participant-directory mails stored, by kind (reply to a request, "
    "update after a change, key_rotation announcing a new hub key; an update or announcement is one mail "
    "for all sites).",
    ["kind"],
    registry=REGISTRY,
)


def directory_mail(kind: str) -> None:
    DIRECTORY_MAILS.labels(kind).inc()
