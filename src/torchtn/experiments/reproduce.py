"""``torchtn reproduce NAME``: run one registered reproduction into ``--out`` (results.json, report.md, PNGs).

Every trained model is one *stage* written to ``out/<stage>.safetensors`` (checkpoints in ``out/checkpoints``) with
the run's settings in its metadata, so ``--resume`` skips finished stages, continues an interrupted one exactly, and
refuses settings that differ from the recorded run's.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._checks import check_positive_int
from .._version import __version__
from ..data import Dataset
from ..io import atomic_write_text
from ..report import machine_description
from ..train import TrainConfig, evaluate
from .stage import train_stage

__all__ = ["ReproduceConfig", "Context", "run_reproduction", "mean_std"]


@dataclass
class ReproduceConfig:
    """Settings of one ``torchtn reproduce`` run (recorded in every stage's model file)."""

    name: str
    quick: bool = False
    dataset: str | None = None
    data_dir: str | None = None
    seeds: int | None = None  # None: the reproduction's default (fewer when quick)

    def __post_init__(self) -> None:
        if self.seeds is not None:
            check_positive_int("seeds", self.seeds)


@dataclass
class Context:
    """What a reproduction's ``run`` gets: settings, data, output place, and :meth:`stage` to train one model."""

    config: ReproduceConfig
    data: Dataset
    out: Path
    resume: bool
    progress: bool
    log: Callable[[str], None]
    timings: dict = field(default_factory=dict)
    device: str | None = None  # where stages train (see resolve_device); None: the CPU

    def stage(self, name: str, model: nn.Module, cfg: TrainConfig, data: Dataset | None = None,
              **trainer_kwargs) -> tuple[nn.Module, float]:
        """Train ``model`` as stage ``name`` on :attr:`device` (or load it when a resumed run finished it); returns
        it and seconds. ``data`` (default: the reproduction's dataset) and ``trainer_kwargs`` (loss, metrics, …) go
        to the trainer."""
        meta = {"reproduce_config": asdict(self.config), "stage": name}
        seconds = train_stage(model, self.data if data is None else data, cfg, self.out, name, meta,
                              resume=self.resume, device=self.device, **trainer_kwargs)
        return model, seconds

    def accuracy(self, model: nn.Module) -> float:
        return evaluate(model, self.data.x_test, self.data.y_test)[1]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_reproduction(config: ReproduceConfig, data: Dataset, out: Path, *, resume: bool = False,
                     progress: bool = True, log: Callable[[str], None] = print,
                     device: str | None = None) -> dict:
    """Run the reproduction (its models trained on ``device``; default: the CPU) and write ``results.json`` and
    ``report.md`` (+ PNGs) into ``out``."""
    from .registry import get_reproduction

    rep = get_reproduction(config.name)
    out = Path(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ctx = Context(config, data, out, resume, progress, log, device=device)
    rows = rep.run(ctx)
    seconds = time.perf_counter() - started
    command = "torchtn reproduce " + config.name + (" --quick" if config.quick else "") + (
        f" --dataset {config.dataset}" if config.dataset else "") + (
        f" --data-dir {config.data_dir}" if config.data_dir else "") + (f" --seeds {config.seeds}" if config.seeds else "")
    results = {"experiment": config.name, "command": command, "machine": machine_description(),
               "versions": {"torchtn": __version__, "torch": torch.__version__, "python": platform.python_version()},
               "seconds": seconds, "quick": config.quick, "rows": rows}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    report = rep.report(rows, ctx, results)
    atomic_write_text(out / "report.md", report)
    return results
