# A size given on the command line beyond what the index can hold (SQLite INTEGER, 2^63 - 1) is
# refused with a one-line error instead of a traceback from SQLite (mailhub.config.parse_size, used
# by `mailhub mailbox list --larger-than`, `site set --max-message-size` and the config file).
import pytest
from test_config_cli import clean_env, mailhub

from mailhub import config

HUGE = "99999999999999999999999"


def test_parse_size_refuses_what_sqlite_cannot_hold():
    assert config.parse_size(str(config.MAX_SIZE)) == 2**63 - 1
    for value in (HUGE, 2**63, "9000000T"):
        with pytest.raises(ValueError, match="expected a size in octets"):
            config.parse_size(value)


def test_commands_answer_a_huge_size_with_one_line(tmp_path):
    env = {**clean_env(), "MAILHUB_DATA_DIR": str(tmp_path / "data"), "MAILHUB_DOMAIN": "hub.test"}
    assert mailhub("site", "add", "x", "--address", "x@hub.test", "--generate-password", env=env).returncode == 0
    for args in (("mailbox", "list", "x", "--larger-than", HUGE), ("site", "set", "x", "--max-message-size", HUGE)):
        result = mailhub(*args, env=env)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1 and HUGE in result.stderr, result.stderr
