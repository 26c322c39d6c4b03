"""Plain-text tables for reports printed by the library and the CLI (one formatter for all of them)."""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table", "format_markdown_table", "machine_description", "run_record"]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> str:
    """Aligned text table: text columns left-aligned, numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) for row in rows) and bool(rows)
               for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [line(list(headers)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def format_markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """GitHub-flavoured Markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def machine_description() -> str:
    """CPU model, core count and OS, as every benchmark and reproduction records it."""
    import os
    import platform
    from pathlib import Path

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def run_record(experiment: str, command: str) -> dict:
    """What every job's ``results.json`` opens with (conventions.md, "Experiments and their results"): ``experiment``,
    ``command``, ``machine`` and ``versions`` (torchtn, torch, Python)."""
    import platform

    import torch

    from ._version import __version__

    return {"experiment": experiment, "command": command, "machine": machine_description(),
            "versions": {"torchtn": __version__, "torch": torch.__version__, "python": platform.python_version()}}
