"""The README and the docs/ pages are a site a user navigates: every relative link lands on a file of the
repository (and, with an ``#anchor``, on a heading of that page), no page points outside the repository, and
the README stays a front door (short, the two set-up commands on its first screen)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The pages a user navigates: every relative link in them must resolve.
NAVIGATED = sorted(
    [ROOT / "README.md", ROOT / "evaluation" / "README.md", ROOT / "benchmarks" / "README.md"]
    + list((ROOT / "docs").glob("*.md"))
)

README_MAX_LINES = 200
#: The first screen: what a reader sees before scrolling.
FIRST_SCREEN_LINES = 25

#: What no page may name: the workspace the project was written in, and its spec files that are not in the
#: repository (docs/ALGORITHMS.md is), which users never have.
OUTSIDE_REFERENCES = re.compile(r"\.\./shared\b|\bshared/(?:spec|data|papers)\b|/work/|\b(?:TESTBED|DESIGN)\.md\b")

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`+[^`\n]*`+")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans (a link there is not a link)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    body = prose(text)
    return INLINE_LINK.findall(body) + REFERENCE_DEFINITION.findall(body)


def github_slug(heading: str) -> str:
    """GitHub's heading anchor: the rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for _, heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def is_external(target: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) is not None  # https:, mailto:, ...


def test_the_navigated_pages_exist():
    names = {p.relative_to(ROOT).as_posix() for p in NAVIGATED}
    assert {"README.md", "docs/README.md", "docs/ALGORITHMS.md", "evaluation/README.md"} <= names


@pytest.mark.parametrize("page", NAVIGATED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    text = page.read_text()
    problems = []
    for target in links(text):
        if is_external(target):
            continue
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if ROOT not in destination.parents and destination != ROOT:
            problems.append(f"{target}: points outside the repository")
            continue
        if not destination.exists():
            problems.append(f"{target}: {destination.relative_to(ROOT)} does not exist")
            continue
        if anchor and destination.suffix == ".md":
            if anchor not in anchors(destination):
                problems.append(f"{target}: no heading #{anchor} in {destination.relative_to(ROOT)}")
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_no_markdown_file_points_outside_the_repository():
    skipped = {".git", "node_modules", "outputs"}
    offenders = []
    for page in sorted(ROOT.rglob("*.md")):
        parts = page.relative_to(ROOT).parts
        if any(part in skipped or part.startswith(".venv") or part.startswith(".") for part in parts[:-1]):
            continue
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if OUTSIDE_REFERENCES.search(line):
                offenders.append(f"{page.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "pages that point outside the repository:\n" + "\n".join(offenders)


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    first_screen = "\n".join(lines[:FIRST_SCREEN_LINES])
    blocks = re.findall(r"^```bash\n(.*?)^```", first_screen, re.M | re.S)
    assert blocks, "the README's first screen has no command block"
    commands = [line.split("#")[0].strip() for line in blocks[0].splitlines() if line.strip()]
    assert commands == ["make demo", "make test"], commands


def test_the_slugs_match_githubs():
    # headings of the kinds these pages use, and the anchors GitHub renders for them
    assert github_slug("AAPO's reference: transformers, vLLM, or a precomputed cache") == (
        "aapos-reference-transformers-vllm-or-a-precomputed-cache"
    )
    assert github_slug("aapo_r1-distill-qwen-1.5b_open-rs") == "aapo_r1-distill-qwen-15b_open-rs"
    assert github_slug("Several GPUs: `accelerate launch`") == "several-gpus-accelerate-launch"
    assert github_slug("3.4 DAER: the advantage of a zero-advantage response (ZAPO Eqs. 8-10)") == (
        "34-daer-the-advantage-of-a-zero-advantage-response-zapo-eqs-8-10"
    )


def test_the_link_checker_catches_what_it_should(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](#missing) `[code](nowhere.md)`\n\n```\n[fenced](x.md)\n```\n")
    assert links(page.read_text()) == ["#title", "#missing"]
    assert anchors(page) == {"title"}
    assert OUTSIDE_REFERENCES.search("see `../shared/spec/ALGORITHMS.md`")
    assert OUTSIDE_REFERENCES.search("--data-dir /work/data")
    assert OUTSIDE_REFERENCES.search("measured in TESTBED.md")
    assert not OUTSIDE_REFERENCES.search("a shared cache, shared memory; docs/ALGORITHMS.md section 2")
