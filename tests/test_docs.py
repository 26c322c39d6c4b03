"""The documentation's links lead somewhere: every relative link or image in README.md and docs/ names a file of the
repository (reports copied into docs/ keep their plots beside them)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def _relative_links(page: Path) -> list[str]:
    targets = [m.group(1).split("#", 1)[0] for m in LINK.finditer(page.read_text(encoding="utf-8"))]
    return [t for t in targets if t and not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # not http:, mailto:, …


def test_the_link_pattern_finds_links_and_images():
    page = "see [the docs](docs/a.md#part), ![plot](b/c.png), [web](https://x.org) and [mail](mailto:a@b)"
    assert [m.group(1) for m in LINK.finditer(page)] == ["docs/a.md#part", "b/c.png", "https://x.org", "mailto:a@b"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_names_a_file_of_the_repository(page):
    missing = [t for t in _relative_links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"
