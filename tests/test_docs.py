# Tests of the documentation as a product part: the configuration reference and the example file
# are what `python -m mailhub.config_reference` makes of the schema (and change when it does), every
# key is described, every relative link and #anchor in README.md and docs/*.md resolves, and the
# README stays a landing page. No network.
import dataclasses
import importlib.util
from pathlib import Path

from mailhub import config, config_reference

REPO = Path(__file__).resolve().parent.parent


def _check_links():
    spec = importlib.util.spec_from_file_location("check_links", REPO / "scripts" / "check_links.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_config_key_has_a_description_and_a_type():
    undocumented = [f"{s}.{k}" for (s, k), o in config.SCHEMA.items() if len(o.doc.split()) < 3]
    assert undocumented == []
    assert all(o.kind for o in config.SCHEMA.values())
    assert set(config.SECTION_DOCS) == {s for s, _ in config.SCHEMA}


def test_configuration_reference_and_example_are_up_to_date(capsys):
    status = config_reference.main(["--check"])  # what `python -m mailhub.config_reference --check` runs
    assert (status, capsys.readouterr().out) == (0, "")
    text = (REPO / "docs" / "configuration.md").read_text()
    for (section, key), option in config.SCHEMA.items():
        dotted = f"{section}.{key}" if section else key
        assert f"| `{dotted}` | {config_reference._cell(option.kind)} |" in text


def test_the_check_notices_a_schema_change(monkeypatch, tmp_path):
    key = ("smtp", "max_recipients")
    changed = dataclasses.replace(config.SCHEMA[key], default=7, doc="Recipients per transaction, changed.")
    for name in ("REFERENCE", "EXAMPLE"):
        copy = tmp_path / getattr(config_reference, name).name
        copy.write_text(getattr(config_reference, name).read_text())
        monkeypatch.setattr(config_reference, name, copy)
    monkeypatch.setattr(config_reference, "REPO", tmp_path)
    assert config_reference.main(["--check"]) == 0
    monkeypatch.setitem(config.SCHEMA, key, changed)
    assert config_reference.main(["--check"]) == 1
    assert config_reference.main([]) == 0  # rewrites both
    assert (
        "| `smtp.max_recipients` | integer >= 1 | `7` | Recipients per transaction, changed. |"
        in config_reference.REFERENCE.read_text()
    )
    assert "# Recipients per transaction, changed.\nmax_recipients = 7\n" in config_reference.EXAMPLE.read_text()
    assert config_reference.main(["--check"]) == 0


def test_every_relative_link_and_anchor_in_the_docs_resolves():
    check = _check_links()
    files = check.default_files()
    assert len(files) >= 8 and all(f.exists() for f in files)
    assert check.problems(files) == []


def test_the_link_check_finds_broken_files_and_anchors(tmp_path):
    check = _check_links()
    (tmp_path / "other.md").write_text(
        "# Other page\n\n## Running `mailhub serve` (twice)\n\n## Steps\n## Steps\n"
        '<a id="custom"></a>\n```\n# not a heading\n```\n'
    )
    (tmp_path / "my page.md").write_text("# Top\n")
    page = tmp_path / "page.md"
    page.write_text(
        "\n".join(
            [
                "# Page",
                "[fine](other.md) [fine](other.md#running-mailhub-serve-twice) [fine](#page)",
                "[fine](other.md#steps-1) [fine](other.md#custom) [web](https://example.org/x#y)"
                " [fine](my%20page.md#top)",
                "[missing](gone.md) [bad anchor](other.md#not-a-heading)",
                "`[in code](nowhere.md)`",
                "```",
                "[in a block](nowhere.md)",
                "```",
                "[ref]: other.md#nope",
                "",
            ]
        )
    )
    found = check.problems([page])
    assert [line.split(": ", 1)[1] for line in found] == [
        "gone.md: no such file",
        "other.md#not-a-heading: no heading or anchor #not-a-heading in other.md",
        "other.md#nope: no heading or anchor #nope in other.md",
    ]
    assert [line.split(":")[1] for line in found] == ["4", "4", "9"]


def test_the_readme_is_a_landing_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "bash scripts/test.sh" in readme and "mailhub serve" in readme
    linked = set(_check_links().links(REPO / "README.md"))
    for doc in ("operator-guide.md", "gateway-guide.md", "architecture.md", "configuration.md", "benchmarks.md"):
        assert any(target.startswith(f"docs/{doc}") for _, target in linked), doc
