# Tests of how storage/db.py puts the schema into an SQLite index: once per version of the schema
# (its stamp in user_version), again whenever the stamp differs (an index of another hub version).
import sqlite3

from storage import db


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_a_new_index_gets_the_schema_and_its_stamp(tmp_path):
    conn = db.connect(tmp_path)
    assert {"messages", "mailbox", "sites", "damaged"} <= _tables(conn)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == db._SCHEMA_STAMP != 0
    conn.close()


def test_an_index_with_the_stamp_is_opened_without_the_script(tmp_path):
    db.connect(tmp_path).close()
    conn = sqlite3.connect(db.index_path(tmp_path))
    conn.execute("DROP TABLE damaged")  # (never done to a real index: shows the script is skipped)
    conn.close()
    conn = db.connect(tmp_path)
    assert "damaged" not in _tables(conn)
    conn.close()


def test_an_index_of_another_schema_version_gets_the_schema_again(tmp_path):
    db.connect(tmp_path).close()
    conn = sqlite3.connect(db.index_path(tmp_path))
    conn.execute("DROP TABLE damaged")
    conn.execute("ALTER TABLE outbound DROP COLUMN claimed_until")  # (an ADDED_COLUMNS column)
    conn.execute("PRAGMA user_version = 12345")  # another hub version's stamp
    conn.close()
    conn = db.connect(tmp_path)
    assert "damaged" in _tables(conn)
    assert "claimed_until" in {row[1] for row in conn.execute("PRAGMA table_info(outbound)")}
    assert conn.execute("PRAGMA user_version").fetchone()[0] == db._SCHEMA_STAMP
    conn.close()
