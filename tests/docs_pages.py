"""The README and the docs/ pages as the tests read them: their code blocks
(with the markers of the few that are not run here), links, headings and
sections. tests/test_docs.py checks the pages with it; the tests of what a
page states (its tables, recipes, quoted messages) find the text with it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# A code block that is not run by the suite says why, on the line right
# before its fence: <!-- not run: KEY: reason -->, KEY one of these.
NOT_RUN_KEYS = {
    "mlx-lm": "needs mlx-lm (optional; tests/test_mlx_lm.py runs it when installed)",
    "ranks": "launches several ranks (tests/test_distributed.py launches them)",
    "long": "takes minutes or hours",
    "install": "builds or installs the package",
    "mac": "needs Apple silicon and Metal",
}
MARKER = re.compile(r"^<!-- not run: ([\w-]+): (.+) -->$")
FENCE = re.compile(r"^( *)```(\S*)\s*$")


def pages() -> list[Path]:
    """The README and every Markdown page under docs/."""
    return [README] + sorted(DOCS.rglob("*.md"))


def name(page: Path) -> str:
    """The page's path in the repository, e.g. docs/memory.md."""
    return page.relative_to(ROOT).as_posix()


def read(relative: str) -> str:
    return (ROOT / relative).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str  # dedented to the fence
    not_run: Optional[tuple[str, str]]  # (key, reason) of its marker

    def __str__(self) -> str:
        return f"{name(self.page)}:{self.line} ({self.language or 'no language'})"


def blocks(page: Path) -> list[Block]:
    """Every fenced code block of a page, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, language = opening.groups()
        end = next(j for j in range(i + 1, len(lines)) if lines[j] == indent + "```")
        code = "\n".join(line[len(indent):] for line in lines[i + 1:end])
        marker = MARKER.match(lines[i - 1].strip()) if i > 0 else None
        out.append(Block(page, i + 1, language, code, marker.groups() if marker else None))
        i = end + 1
    return out


def prose(page: Path) -> str:
    """The page without its fenced code blocks (their lines left empty) and
    without inline code, so that a heading or a link is only what Markdown
    renders as one."""
    lines = page.read_text(encoding="utf-8").splitlines()
    inside: Optional[str] = None
    kept = []
    for line in lines:
        fence = FENCE.match(line)
        if inside is None and fence:
            inside = fence.group(1) + "```"
            kept.append("")
        elif inside is not None:
            kept.append("")
            if line == inside:
                inside = None
        else:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def headings(page: Path) -> list[tuple[int, str]]:
    """(level, text) of every heading."""
    return [(len(m[1]), m[2].strip()) for m in re.finditer(r"^(#{1,6}) (.+)$", prose(page), re.M)]


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (``_``
    and ``-`` kept), spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, text in headings(page):
        base = anchor(text)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(page: Path) -> list[str]:
    """The targets of every link and image of a page, code excluded."""
    text = prose(page)
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    targets += re.findall(r"<img[^>]+src=\"([^\"]+)\"", text)
    return targets


def is_relative(target: str) -> bool:
    return not re.match(r"[a-z][a-z0-9+.-]*:", target, re.I)


def section(text: str, heading: str) -> str:
    """From ``heading`` (a whole heading line, e.g. "## Checkpoints") to the
    next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(heading + "\n")
    after = re.search(rf"^#{{1,{level}}} ", text[start + len(heading):], re.M)
    return text[start:start + len(heading) + after.start()] if after else text[start:]


def python_block(text: str, heading: str) -> str:
    """The first Python block after ``heading`` in a Markdown text."""
    start = text.index(heading)
    block = text.index("```python", start) + len("```python")
    return text[block:text.index("```", block)]
