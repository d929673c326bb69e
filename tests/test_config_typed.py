# The typed configuration (mailhub/config.py): one frozen dataclass per section, built and validated
# once by load(); changes are new objects (with_overrides, dataclasses.replace), the original stays.
import dataclasses
import ipaddress
import sys
import tomllib
from pathlib import Path

import pytest

from mailhub import config
from relay.outbound.routes import Route

EXAMPLE = Path(config.__file__).with_name("example.toml")


def test_every_section_and_the_whole_are_frozen_with_slots():
    cfg = config.load(None, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hostname = "other.example"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.smtp.max_recipients = 5  # type: ignore[misc]
    for section, cls in config.SECTIONS.items():
        params = cls.__dataclass_params__  # type: ignore[attr-defined]
        assert params.frozen, section
        assert "__slots__" in cls.__dict__ and not hasattr(cfg if not section else getattr(cfg, section), "__dict__"), (
            section
        )
        with pytest.raises((AttributeError, TypeError)):  # no new attributes either
            (cfg if not section else getattr(cfg, section)).surprise = 1
    assert isinstance(cfg.smtp, config.SmtpConfig) and isinstance(cfg.relay, config.RelayConfig)
    assert hash(cfg.smtp) == hash(config.load(None, environ={}).smtp)  # hashable: lists are tuples


def test_values_have_their_declared_types():
    cfg = config.load(
        None,
        environ={
            "MAILHUB_SMTP_PEER_NETWORKS": "10.0.0.0/8, ::1/128",
            "MAILHUB_RELAY_ROUTES": "example.org=127.0.0.1:2526",
        },
    )
    assert isinstance(cfg.data_dir, Path) and cfg.domain == ("hub.test",)
    assert cfg.smtp.listen == ("127.0.0.1", 2525) and isinstance(cfg.smtp.max_message_size, int)
    assert cfg.smtp.peer_networks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert cfg.relay.routes == (Route("example.org", "127.0.0.1", 2526),)
    assert isinstance(cfg.smtp.idle_timeout, float) and cfg.pop3.pop3s_listen is None
    assert cfg.quotas.mailbox_bytes == 50 * 1024**3 and cfg.tls.cert_file is None
    for (section, key), option in config.SCHEMA.items():  # every list-valued key is a tuple
        value = getattr(getattr(cfg, section) if section else cfg, key)
        assert not isinstance(value, (list, dict, set)), (section, key, value)
        assert option.doc and option.kind, (section, key)


def test_the_schema_is_read_from_the_dataclass_fields():
    fields = [
        (s, f.name) for s, cls in config.SECTIONS.items() for f in dataclasses.fields(cls) if "option" in f.metadata
    ]
    assert list(config.SCHEMA) == fields and len(fields) >= 90
    assert next(iter(config.SCHEMA)) == ("", "data_dir") and ("relay", "routes") in config.SCHEMA
    for (section, key), option in config.SCHEMA.items():  # each field's default is its parsed TOML default
        cls = config.SECTIONS[section]
        default = next(f.default for f in dataclasses.fields(cls) if f.name == key)
        if (section, key) != ("", "hostname"):
            assert default == option.parse(option.default), (section, key)


@pytest.mark.parametrize(
    "environ, message",
    [
        (
            {"MAILHUB_SMTP_MAX_RECIPIENTS": "many"},
            "smtp.max_recipients: expected an integer >= 1, got 'many' (from MAILHUB_SMTP_MAX_RECIPIENTS)",
        ),
        (
            {"MAILHUB_SMTP_LISTEN": "nowhere"},
            "smtp.listen: expected HOST:PORT, got 'nowhere' (from MAILHUB_SMTP_LISTEN)",
        ),
        ({"MAILHUB_DOMAIN": ""}, "domain: at least one domain is needed (from MAILHUB_DOMAIN)"),
        (
            {"MAILHUB_LOG_LEVEL": "loud"},
            "log.level: expected one of debug, info, warning, error, got 'loud' (from MAILHUB_LOG_LEVEL)",
        ),
        (
            {"MAILHUB_RELAY_MIN_BACKOFF": "100", "MAILHUB_RELAY_MAX_BACKOFF": "10"},
            "relay.max_backoff: must not be less than relay.min_backoff",
        ),
        ({"MAILHUB_POP3_POP3S_LISTEN": "127.0.0.1:0"}, "pop3.pop3s_listen: needs tls.cert_file and tls.key_file"),
    ],
)
def test_validation_errors_are_one_line_naming_the_key(environ, message):
    with pytest.raises(config.ConfigError) as caught:
        config.load(None, environ=environ)
    assert str(caught.value) == message and "\n" not in str(caught.value)


def test_a_postgresql_index_without_psycopg_is_one_line_naming_the_extra(monkeypatch):
    """A hub pointed at PostgreSQL on a machine without the optional extra stops with one line at
    its configuration, not with a traceback at the first connection."""
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` raises ImportError
    environ = {"MAILHUB_STORAGE_INDEX": "postgresql://mailhub:secret-pw@db.example/mailhub"}
    with pytest.raises(config.ConfigError) as caught:
        config.load(None, environ=environ)
    message = str(caught.value)
    assert message.startswith("storage.index: a PostgreSQL index needs psycopg") and "\n" not in message
    assert "pip install 'dicom-mail-hub[postgresql]'" in message and "secret-pw" not in message


def test_the_environment_overrides_the_file(tmp_path):
    path = tmp_path / "hub.toml"
    path.write_text('domain = ["one.example"]\n[smtp]\nmax_recipients = 7\nidle_timeout = 9\n')
    cfg = config.load(path, environ={"MAILHUB_SMTP_MAX_RECIPIENTS": "3", "MAILHUB_RELAY_ENABLED": "off"})
    assert (cfg.smtp.max_recipients, cfg.smtp.idle_timeout, cfg.relay.enabled) == (3, 9.0, False)
    assert cfg.domain == ("one.example",) and cfg.hostname == "one.example" and cfg.config_file == path
    assert dict(cfg.sources)[("smtp", "max_recipients")] == ("3", "MAILHUB_SMTP_MAX_RECIPIENTS")


def test_example_toml_round_trips_to_the_defaults():
    document = tomllib.loads(EXAMPLE.read_text())
    from_example = config.load(EXAMPLE, environ={})
    defaults = config.load(None, environ={})
    assert dataclasses.replace(from_example, config_file=None) == defaults  # sources do not compare
    assert dataclasses.asdict(from_example.smtp) == dataclasses.asdict(defaults.smtp)
    assert set(document["smtp"]) == {key for section, key in config.SCHEMA if section == "smtp"}
    # and every section written back from the typed values loads to the same object
    rebuilt = config.build({key: (option.default, "example") for key, option in config.SCHEMA.items()})
    assert rebuilt == defaults


def test_with_overrides_makes_a_new_validated_object_and_leaves_the_original():
    cfg = config.load(None, environ={"MAILHUB_SMTP_MAX_RECIPIENTS": "9"})
    before = dataclasses.asdict(cfg)
    changed = cfg.with_overrides(
        {"smtp.max_recipients": 5, "domain": "a.example, b.example", "storage.reserve_bytes": "1M"}
    )
    assert (changed.smtp.max_recipients, changed.domain, changed.hostname) == (
        5,
        ("a.example", "b.example"),
        "a.example",
    )
    assert changed.storage.reserve_bytes == 1024**2 and changed is not cfg
    assert changed.pop3 == cfg.pop3  # untouched sections stay equal
    assert dataclasses.asdict(cfg) == before and cfg.smtp.max_recipients == 9 and cfg.domain == ("hub.test",)
    # earlier sources stay unless overridden again
    assert changed.with_overrides({"log.level": "debug"}).smtp.max_recipients == 5
    with pytest.raises(
        config.ConfigError,
        match=r"^smtp\.max_recipients: expected an integer >= 1, got 0 "
        r"\(from override\)$",
    ):
        cfg.with_overrides({"smtp.max_recipients": 0})
    with pytest.raises(config.ConfigError, match=r"^smtp\.no_such_key: unknown key \(in override\)$"):
        cfg.with_overrides({"smtp.no_such_key": 1})
    # typed changes: dataclasses.replace, again a new object
    tighter = dataclasses.replace(cfg, smtp=dataclasses.replace(cfg.smtp, max_recipients=2))
    assert (tighter.smtp.max_recipients, cfg.smtp.max_recipients) == (2, 9)


def test_repr_hides_secrets(tmp_path):
    secret = "s3cret-relay-password"
    path = tmp_path / "hub.toml"
    path.write_text(
        '[[relay.routes]]\ndomain = "*"\nhost = "127.0.0.1"\ntls = "none"\n'
        f'auth_user = "hub"\nauth_password = "{secret}"\n'
    )
    cfg = config.load(path, environ={})
    assert cfg.relay.routes[0].auth_password == secret
    for text in (repr(cfg), str(cfg), repr(cfg.relay), repr(cfg.relay.routes[0])):
        assert secret not in text
    assert "auth_user='hub'" in repr(cfg.relay.routes[0]) and "max_recipients=1000" in repr(cfg)
