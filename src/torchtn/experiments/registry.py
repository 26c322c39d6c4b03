"""The one registry of paper reproductions behind ``torchtn reproduce NAME`` (conventions: "Experiments and their
results"). Each reproduction is one module that registers a :class:`Reproduction`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Reproduction", "register_reproduction", "reproductions", "get_reproduction"]


@dataclass(frozen=True)
class Reproduction:
    """A paper reproduction: its name, what it reproduces, the datasets it accepts and the function that runs it.

    ``run(ctx) -> list[dict]`` trains and measures, returning the rows of ``results.json``; ``report(rows, ctx)``
    returns the Markdown report (and writes its PNGs into ``ctx.out``).
    """

    name: str
    title: str
    datasets: tuple[str, ...]
    default_dataset: str
    run: Callable
    report: Callable


_REGISTRY: dict[str, Reproduction] = {}


def register_reproduction(rep: Reproduction) -> Reproduction:
    _REGISTRY[rep.name] = rep
    return rep


def reproductions() -> dict[str, Reproduction]:
    from . import adtn, dtn, gao2020, tnn, vtnn  # noqa: F401  (each reproduction module registers itself on import)

    return dict(_REGISTRY)


def get_reproduction(name: str) -> Reproduction:
    known = reproductions()
    if name not in known:
        raise ValueError(f"reproduction {name!r} is not known: expected one of {', '.join(sorted(known))}")
    return known[name]
