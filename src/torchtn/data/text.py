"""Plain-text corpora for healing and measuring compressed language models, from files a system package provides.

``python -m torchtn.data.text [DIR] OUT`` writes the English passages of the Debian ``fortunes`` package (quotations,
jokes, definitions, poems; ``apt-get install fortunes`` puts them in ``/usr/share/games/fortunes``) as a corpus file:
one passage per line, whitespace collapsed, 20–600 characters, in file order.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..io import atomic_write_text

__all__ = ["fortune_passages", "FORTUNES"]

FORTUNES = Path("/usr/share/games/fortunes")


def fortune_passages(directory: str | Path = FORTUNES) -> list[str]:
    """Passages of the fortune files in ``directory`` (``%``-separated; index ``.dat`` files and subdirectories such
    as ``off/`` skipped). Raises ``FileNotFoundError`` saying what to install when there are none."""
    directory = Path(directory)
    files = sorted(p for p in directory.glob("*") if p.is_file() and not p.suffix) if directory.is_dir() else []
    passages = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for chunk in text.split("\n%\n"):
            passage = " ".join(chunk.replace("%", " ").split())
            if 20 <= len(passage) <= 600:
                passages.append(passage)
    if not passages:
        raise FileNotFoundError(f"no fortune files in {directory}: install them with `apt-get install fortunes` "
                                f"(Debian/Ubuntu) or name the directory that holds them")
    return passages


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print("usage: python -m torchtn.data.text [FORTUNES_DIR] OUT.txt", file=sys.stderr)
        return 2
    passages = fortune_passages(argv[0] if len(argv) == 2 else FORTUNES)
    atomic_write_text(Path(argv[-1]), "\n".join(passages) + "\n")
    print(f"wrote {len(passages):,} passages to {argv[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
