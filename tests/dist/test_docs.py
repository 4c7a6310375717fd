"""README.md and docs/*.md: every relative link and picture points to a file a fresh clone has.

A picture that exists only on the machine that drew it (``*.png`` is ignored outside
``docs/``) is a broken image for everyone else, so links to git-ignored files fail too.
(In tests/dist: it asks git, in a subprocess, which files it ignores.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title")
_IMG_TAG = re.compile(r"<img\s[^>]*src=\"([^\"]+)\"", re.I)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(path: Path) -> str:
    """The file's text without code blocks and code spans (a ``[i](x)`` there is not a link)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", path.read_text(encoding="utf-8")))


def _links(path: Path) -> list[str]:
    text = _prose(path)
    return _LINK.findall(text) + _IMG_TAG.findall(text)


def _local(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) and not target.startswith("#")


def _slugs(path: Path) -> set[str]:
    """GitHub's anchors for the file's headings: lower case, punctuation dropped, spaces as hyphens."""
    seen: dict[str, int] = {}
    slugs = set()
    for heading in _HEADING.findall(_prose(path)):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        slugs.add(slug if count == 0 else f"{slug}-{count}")
    return slugs


def _ignored(paths: list[Path]) -> set[Path]:
    """Those of ``paths`` git would leave out of a commit (tracked files never are)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return set()
    proc = subprocess.run(["git", "check-ignore", "--stdin"], cwd=REPO, capture_output=True, text=True,
                          input="\n".join(str(p.relative_to(REPO)) for p in paths), timeout=60)
    assert proc.returncode in (0, 1), proc.stderr  # 1: none ignored
    return {REPO / line for line in proc.stdout.splitlines() if line}


def test_the_docs_are_there() -> None:
    names = {path.name for path in DOCS}
    assert {"README.md", "schedules.md", "benchmarks.md"} <= names, sorted(names)


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_and_picture_exists(doc: Path) -> None:
    targets = {}
    for link in _links(doc):
        if _local(link):
            target = (doc.parent / link.split("#", 1)[0]).resolve()
            targets[link] = target
    missing = [link for link, target in targets.items() if not target.exists()]
    assert not missing, f"{doc.name} links to files that do not exist: {missing}"
    outside = [link for link, target in targets.items() if not target.is_relative_to(REPO)]
    assert not outside, f"{doc.name} links outside the repository: {outside}"
    ignored = _ignored(list(targets.values()))
    left_out = [link for link, target in targets.items() if target in ignored]
    assert not left_out, (f"{doc.name} links to files git ignores, which a fresh clone will not have: {left_out}; "
                          "commit them (see .gitignore)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_anchor_into_a_doc_names_a_heading(doc: Path) -> None:
    broken = []
    for link in _links(doc):
        if "#" not in link or not (_local(link) or link.startswith("#")):
            continue
        file_part, anchor = link.split("#", 1)
        target = (doc.parent / file_part).resolve() if file_part else doc
        if target.suffix == ".md" and target.exists() and anchor not in _slugs(target):
            broken.append(link)
    assert not broken, f"{doc.name} links to headings that do not exist: {broken}"
