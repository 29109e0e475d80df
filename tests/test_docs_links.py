"""The README and the pages under docs/ name only things that exist.

Checked in README.md, config/README.md (the config keys) and every docs/*.md:

- every relative Markdown link and image, ``[text](target)`` and
  ``![alt](target)``: the target exists (relative to the page), and an anchor
  ``page.md#heading`` names a heading of that page (GitHub's slugs);
- every repository path the text names in backticks (inline code) or inside a
  fenced code block: a path whose first part is a top-level entry of the
  repository (``config/x.yaml``, ``src/...``, ``scripts/...``, ``.ci/run``)
  and which holds at least one ``/``. Outputs (``results/...``), home and
  absolute paths, and placeholders (``<dataset>``, ``{a,b}``, ``*``) are not
  repository paths and are not checked.

Also: the README is a front door of at most 200 lines whose Quick start
holds the two commands `.ci/run` runs, and docs/README.md links every page.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

#: top-level names that are never repository paths: outputs, environments,
#: caches and version-control metadata
NOT_REPO_TOP = {"results", ".venv", ".venv-mmdet", ".snakemake", ".git", ".pytest_cache", "__pycache__"}

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
#: a repository path: path characters only (no spaces, no placeholders)
PATH_CHARS = re.compile(r"^[A-Za-z0-9_.\-/]+$")


def label(page: Path) -> str:
    """The page as the messages name it: relative to the repository."""
    return str(page.relative_to(REPO)) if page.is_relative_to(REPO) else page.name


def pages() -> list[Path]:
    return [REPO / "README.md", REPO / "config" / "README.md", *sorted(DOCS.glob("*.md"))]


def top_level_names(repo: Path = REPO) -> set[str]:
    return {p.name for p in repo.iterdir()} - NOT_REPO_TOP


def split_fences(text: str) -> tuple[list[str], list[str]]:
    """The lines outside fenced code blocks, and those inside them."""
    prose, code = [], []
    fence = None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m and (fence is None or m.group(1) == fence):
            fence = m.group(1) if fence is None else None
            continue
        (code if fence else prose).append(line)
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but
    hyphens and underscores), spaces to hyphens."""
    text = re.sub(r"`|\*|\[|\]\([^)]*\)", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_fences(page.read_text())
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path, text: str | None = None) -> list[str]:
    """Relative links of `page` (its text, or `text`) whose target or anchor
    does not exist."""
    prose, _ = split_fences(page.read_text() if text is None else text)
    problems = []
    for line in prose:
        line = INLINE_CODE.sub("", line)  # a link written inside code is not a link
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.\-]*:", target, re.I):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = page if not path else (page.parent / path).resolve()
            if not dest.exists():
                problems.append(f"{label(page)}: link to {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{label(page)}: link to {target}: no heading '#{anchor}' in {dest.name}")
    return problems


def repo_paths(text: str, top: set[str]) -> list[str]:
    """The repository paths `text` names in inline code or fenced code."""
    prose, code = split_fences(text)
    candidates = [m.group(2).strip() for line in prose for m in INLINE_CODE.finditer(line)]
    for line in code:
        candidates += [tok.strip("'\",;:()") for tok in line.split()]
    paths = []
    for cand in candidates:
        cand = cand[2:] if cand.startswith("./") else cand
        if "/" not in cand or not PATH_CHARS.match(cand):
            continue
        if cand.split("/", 1)[0] in top:
            paths.append(cand)
    return paths


def missing_paths(page: Path, text: str | None = None, repo: Path = REPO) -> list[str]:
    top = top_level_names(repo)
    text = page.read_text() if text is None else text
    return [f"{label(page)}: `{p}` does not exist" for p in repo_paths(text, top) if not (repo / p).exists()]


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_exist(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_named_repository_paths_exist(page):
    assert missing_paths(page) == []


def test_the_checks_catch_broken_links_and_paths(tmp_path):
    """The checks above report what is wrong (and only that), on a page
    written here."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "real.py").write_text("")
    (tmp_path / "results").mkdir()
    (tmp_path / "other.md").write_text("# Other page\n\n## Token budgets\n\n## Token budgets\n")
    page = tmp_path / "page.md"
    text = (
        "# Page\n"
        "[ok](other.md) [ok anchor](other.md#token-budgets) [second](other.md#token-budgets-1) "
        "[self](#page) [web](https://example.org/x) ![img](src/real.py)\n"
        "[gone](docs/missing.md) ![gone image](missing.png) [bad anchor](other.md#nowhere)\n"
        "`src/real.py` `src/missing.py` `results/summary/metrics.csv` `src/<name>.py` `~/x/y` `reduction/x.py`\n"
        "```bash\npython src/also_missing.py --out results/x.csv\n```\n"
        "`[in code](nowhere.md)`\n"
    )
    page.write_text(text)
    assert sorted(broken_links(page)) == sorted([
        "page.md: link to docs/missing.md: no such file",
        "page.md: link to missing.png: no such file",
        "page.md: link to other.md#nowhere: no heading '#nowhere' in other.md",
    ])
    assert sorted(missing_paths(page, repo=tmp_path)) == sorted([
        "page.md: `src/missing.py` does not exist",
        "page.md: `src/also_missing.py` does not exist",
    ])


def test_slugs_follow_github():
    assert slug("ATC's clustering") == "atcs-clustering"
    assert slug("The `r` budget: a, b (c)") == "the-r-budget-a-b-c"
    assert slug("Study: Which Tokens to Use?") == "study-which-tokens-to-use"


def test_readme_is_a_front_door():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    # the two commands .ci/run runs: the first bash block after "## Quick start",
    # its non-empty lines that are not comments
    quick = text.split("\n## Quick start", 1)[1]
    block = quick.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands == [
        "./install.sh && .venv/bin/snakemake --cores all",
        "./install.sh && .venv/bin/python -m pytest",
    ]


def test_docs_index_links_every_page():
    index = DOCS / "README.md"
    linked = {(DOCS / target.partition("#")[0]).resolve() for target in LINK.findall(index.read_text())}
    unlinked = [p.name for p in DOCS.glob("*.md") if p.name != "README.md" and p.resolve() not in linked]
    assert unlinked == []
