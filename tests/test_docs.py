"""The README and the user guide: short front door, current facts only, every link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_PAGES = sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "history.md")
JOURNEY = re.compile(r"\bbuilds? \d|\bissue\b|#\d+\b|\bthis session\b|\bprevious session\b", re.IGNORECASE)
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page (lower case, punctuation dropped, spaces to hyphens)."""
    out, fence = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"#+ (.+)", line)):
            out.add("#" + re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-"))
    return out


def test_readme_is_a_short_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 150
    first_screen = "\n".join(lines[:50])
    for must in ("make demo", "make test", "pip install -e .", "## Scan your own model"):
        assert must in first_screen, must


@pytest.mark.parametrize("page", [ROOT / "README.md", *USER_PAGES], ids=lambda p: p.name)
def test_user_pages_state_current_facts_only(page):
    text = page.read_text()
    assert JOURNEY.findall(text) == []
    assert "experiments/" not in text  # one-off runs are referenced from docs/history.md only


@pytest.mark.parametrize("page", [ROOT / "README.md", *(ROOT / "docs").glob("*.md")], ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target, anchor in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path = (page.parent / target).resolve()
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(target + anchor)
    assert broken == []


def test_every_readme_figure_links_its_results_file():
    """Each row of the README's results table names a results file that exists and a page that rebuilds it."""
    rows = [line for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("| ") and "benchmarks/results/" in line]
    assert len(rows) >= 5
    for row in rows:
        assert re.search(r"\]\(benchmarks/results/[\w.]+\.json\)", row) and re.search(r"\]\(docs/\w[\w-]*\.md#", row)
