#!/usr/bin/env python3
# Checks the relative links of the documentation (README.md and docs/*.md, or the files given):
# every linked file exists and every #anchor names a heading (GitHub's slugs) or an <a id/name> of
# the linked Markdown file. Links to other schemes (https:, mailto:) are not fetched: no network.
# Prints one line per broken link and exits 1 if there is any (tests/test_docs.py runs it).
import re
import sys
import unicodedata
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parent.parent
_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`+[^`]*`+")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:[^>]*\s)?(?:id|name)=\"([^\"]+)\"", re.I)


def default_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading)  # inline HTML
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    text = text.replace("`", "").strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def anchors(path: Path) -> set[str]:
    """Every anchor a link may name in a Markdown file."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in _prose_lines(path):
        found.update(_HTML_ANCHOR.findall(line))
        if heading := _HEADING.match(line):
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and reference definition outside code."""
    found = []
    for number, line in _prose_lines(path):
        line = _INLINE_CODE.sub("", line)
        found.extend((number, target) for target in _LINK.findall(line))
        if reference := _REFERENCE.match(line):
            found.append((number, reference.group(1)))
    return found


def problems(files: list[Path]) -> list[str]:
    """One message per broken relative link or anchor in the files."""
    out, anchor_cache = [], {}
    for path in files:
        for number, target in links(path):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue  # https:, mailto: ... (not checked: no network)
            file_part, _, anchor = unquote(target).partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path.resolve()
            where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{number}"
            if not linked.exists():
                out.append(f"{where}: {target}: no such file")
                continue
            if anchor and linked.suffix == ".md":
                if linked not in anchor_cache:
                    anchor_cache[linked] = anchors(linked)
                if anchor not in anchor_cache[linked]:
                    out.append(f"{where}: {target}: no heading or anchor #{anchor} in {linked.name}")
    return out


def main(argv: list[str]) -> int:
    files = [Path(a).resolve() for a in argv[1:]] or default_files()
    found = problems(files)
    for line in found:
        print(line)
    print(f"{len(files)} files checked, {len(found)} broken links", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
