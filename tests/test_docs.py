"""The README and docs/ as a whole: the README stays a short front page that
links every page, each page opens with its question, every relative link and
anchor resolves, every code block runs (or says, rarely and for a listed
reason, why it does not), and what a page copies from the committed bench
run or counts in the mutant catalogue is what is there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import docs_pages
from docs_pages import DOCS, README, ROOT

PAGES = docs_pages.pages()
TOPICS = ["numerics", "options", "memory", "training", "distributed", "reliability",
          "benchmarks", "gpu", "compatibility"]
BLOCKS = [b for page in PAGES for b in docs_pages.blocks(page)]
# What a code block may be: run (python, bash) or shown (text: formulas,
# messages, listings).
LANGUAGES = {"python", "bash", "text"}
# The blocks that need mlx-lm (3), several ranks (1), a Mac (1), a build (the
# README's two commands) or minutes to hours (4): raising this needs a reason.
MAX_NOT_RUN = 10


def test_the_readme_is_a_front_page_of_at_most_200_lines():
    assert len(README.read_text().splitlines()) <= 200


def linked_pages(page: Path) -> set[Path]:
    return {(page.parent / t.split("#")[0]).resolve() for t in docs_pages.links(page)
            if docs_pages.is_relative(t) and t.split("#")[0].endswith(".md")}


def test_the_readme_links_every_topic_and_every_page_is_reached():
    """The README links each topic page; every other page under docs/ (the
    evidence, and the tables its script writes) is linked from a page."""
    for topic in TOPICS:
        assert (DOCS / f"{topic}.md").resolve() in linked_pages(README), topic
    reached, todo = set(), [README.resolve()]
    while todo:
        page = todo.pop()
        if page not in reached:
            reached.add(page)
            todo.extend(linked_pages(page))
    for page in PAGES:
        assert page.resolve() in reached, f"no page links {docs_pages.name(page)}"


@pytest.mark.parametrize("page", [DOCS / f"{t}.md" for t in TOPICS] + [DOCS / "memory" / "evidence.md"],
                         ids=docs_pages.name)
def test_each_page_opens_with_the_question_it_answers(page):
    """The title, then the question (the title itself may be it)."""
    paragraphs = [p.strip() for p in page.read_text().split("\n\n") if p.strip()]
    title, first = paragraphs[0], paragraphs[1]
    assert title.startswith("# ") and "\n" not in title, title
    assert title.endswith("?") or first.endswith("?"), first


@pytest.mark.parametrize("page", PAGES, ids=docs_pages.name)
def test_every_relative_link_resolves_in_the_repository(page):
    """Relative links and images point at a file of the repository (not out
    of it), and an #anchor at a heading of the page it names."""
    for target in docs_pages.links(page):
        if not docs_pages.is_relative(target):
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page.resolve()
        assert resolved.is_relative_to(ROOT) and resolved.is_file(), f"{target} in {docs_pages.name(page)}"
        if fragment:
            assert resolved.suffix == ".md", target
            assert fragment in docs_pages.anchors(resolved), f"{target} in {docs_pages.name(page)}"


def test_anchor_matches_github():
    """The anchors the link check expects are GitHub's."""
    assert docs_pages.anchor("Porting: one line") == "porting-one-line"
    assert docs_pages.anchor("`mx.compile`") == "mxcompile"
    assert docs_pages.anchor("The targets this run misses, and what bounds them") == \
        "the-targets-this-run-misses-and-what-bounds-them"
    assert docs_pages.anchor("8-bit state") == "8-bit-state"


def test_code_blocks_are_fenced_with_a_language():
    """A block either runs (python, bash) or is shown (text); an indented
    block would hide code from the run below, so there is none."""
    for block in BLOCKS:
        assert block.language in LANGUAGES, block
    for page in PAGES:
        lines = docs_pages.prose(page).splitlines()
        for i, line in enumerate(lines[1:], start=1):
            previous = lines[i - 1]
            indented = line.startswith("    ") and line.strip()
            in_list = previous.strip() == "" and i >= 2 and lines[i - 2].lstrip().startswith(("- ", "* "))
            assert not (indented and previous.strip() == "" and not in_list), \
                f"{docs_pages.name(page)}:{i + 1}: an indented code block; fence it"


def test_blocks_not_run_are_rare_and_say_why():
    """Each marker sits on a runnable block, names one of the known reasons
    and says more; a test file it names exists and reads the page; at most
    at most MAX_NOT_RUN blocks, fewer than half of the runnable ones, are
    not run."""
    runnable = [b for b in BLOCKS if b.language in ("python", "bash")]
    skipped = [b for b in runnable if b.not_run]
    for block in BLOCKS:
        if block.not_run:
            key, reason = block.not_run
            assert block.language != "text", block
            assert key in docs_pages.NOT_RUN_KEYS, (block, key)
            assert len(reason.split()) >= 4, (block, reason)
            for test_file in re.findall(r"tests/\w+\.py", reason):
                assert (ROOT / test_file).is_file(), (block, test_file)
                if key == "mlx-lm" and block.language == "python":
                    assert docs_pages.name(block.page) in (ROOT / test_file).read_text(), (block, test_file)
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("<!-- not run"):
                assert docs_pages.MARKER.match(line), f"{docs_pages.name(page)}:{i + 1}"
                assert docs_pages.FENCE.match(lines[i + 1]), f"{docs_pages.name(page)}:{i + 1}: not on a block"
    assert len(skipped) <= MAX_NOT_RUN and 2 * len(skipped) < len(runnable), [str(b) for b in skipped]


@pytest.mark.parametrize("page", [p for p in PAGES if any(
    b.language == "python" and not b.not_run for b in docs_pages.blocks(p))], ids=docs_pages.name)
def test_python_blocks_run(page):
    """A page's Python blocks run in order, in one namespace (a block may
    use what an earlier one defined)."""
    scope: dict = {"__name__": "__docs__"}
    for block in docs_pages.blocks(page):
        if block.language == "python" and not block.not_run:
            try:
                exec(compile(block.code, str(block), "exec"), scope)
            except Exception as error:
                raise AssertionError(f"{block} failed") from error


def shell_environment() -> dict:
    """This interpreter's environment: `python` and the installed commands
    are the ones of the venv running the tests."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language == "bash" and not b.not_run], ids=str)
def test_bash_blocks_run(block, tmp_path):
    """Each command of a shell block runs and succeeds (in an empty folder:
    what it writes stays out of the repository); a command whose comment
    shows its output prints that form (the versions may differ)."""
    for line in block.code.splitlines():
        command, _, comment = line.partition("  #")
        if not command.strip() or command.startswith("#"):
            continue
        out = subprocess.run(["bash", "-eo", "pipefail", "-c", command], cwd=tmp_path,
                             env=shell_environment(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, (command, out.stdout[-2000:], out.stderr[-2000:])
        shown = comment.strip()
        if shown.startswith(command.split()[0] + " "):  # e.g. "# mlx-fused-rmsprop 0.1.0 (...)"
            pattern = re.sub(r"\d+(\\\.\d+)+", r"[\\d.]+", re.escape(shown))
            assert re.fullmatch(pattern, out.stdout.strip()), (shown, out.stdout)


COPIED = re.compile(r"<!-- from (\S+) -->\n(.*?)\n<!-- end -->", re.S)


def test_copied_bench_tables_are_the_committed_run():
    """What a page shows between `<!-- from FILE -->` and `<!-- end -->` is
    FILE's text, verbatim (benchmarks.md: the whole default run)."""
    copies = [(page, m) for page in PAGES for m in COPIED.finditer(page.read_text())]
    assert {docs_pages.name(page) for page, _ in copies} >= {"docs/benchmarks.md", "docs/memory.md"}
    for page, match in copies:
        source = (ROOT / match[1]).read_text()
        assert match[2].strip() in source, f"{docs_pages.name(page)}: not a verbatim copy of {match[1]}"
    whole = next(m for page, m in copies if page.name == "benchmarks.md")
    run = (ROOT / whole[1]).read_text()
    assert whole[2].strip() == run[run.index("**Machine:**"):].strip()


def test_the_mutant_counts_are_the_catalogues():
    sys.path.insert(0, str(ROOT / "tests" / "mutants"))
    try:
        import catalogue
    finally:
        sys.path.pop(0)
    text = " ".join(docs_pages.read("docs/reliability.md").split())
    (total, equivalent), = re.findall(r"keeps (\d+) mutants \((\d+) of them equivalent\)", text)
    assert int(total) == len(catalogue.MUTANTS)
    assert int(equivalent) == sum(1 for m in catalogue.MUTANTS if "equivalent" in m)


def test_the_pages_the_code_points_to_exist():
    """Docstrings and examples say "see docs/memory.md": those pages exist
    (and the optimizer's docstring points to at least its four)."""
    named = set()
    for source in [*(ROOT / "python").rglob("*.py"), *(ROOT / "examples").glob("*.py")]:
        named |= set(re.findall(r"docs/[\w/]+\.md", source.read_text()))
    assert {"docs/options.md", "docs/memory.md", "docs/training.md", "docs/distributed.md"} <= named
    for page in named:
        assert (ROOT / page).is_file(), page
