"""``torchtn reproduce NAME``: run one registered reproduction into ``--out`` (results.json, report.md, PNGs).

Every trained model is one *stage* written to ``out/<stage>.safetensors`` (checkpoints in ``out/checkpoints``) with
the run's settings in its metadata, so ``--resume`` skips finished stages, continues an interrupted one exactly, and
refuses settings that differ from the recorded run's.
"""
from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from .._checks import check_positive_int
from ..data import Dataset
from ..io import atomic_write_text
from ..report import run_record
from ..train import TrainConfig, evaluate
from .stage import RunClock, train_stage

__all__ = ["ReproduceConfig", "Context", "run_reproduction", "rewrite_report", "recorded_results", "mean_std"]


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
    clock: RunClock = field(default_factory=RunClock)  # with the training an earlier run of a resumed one did

    def stage(self, name: str, model: nn.Module, cfg: TrainConfig, data: Dataset | None = None,
              **trainer_kwargs) -> tuple[nn.Module, float]:
        """Train ``model`` as stage ``name`` on :attr:`device` (or load it when a resumed run finished it); returns
        it and seconds. ``data`` (default: the reproduction's dataset) and ``trainer_kwargs`` (loss, metrics, …) go
        to the trainer."""
        meta = {"reproduce_config": asdict(self.config), "stage": name}
        seconds = train_stage(model, self.data if data is None else data, cfg, self.out, name, meta,
                              resume=self.resume, device=self.device, clock=self.clock, **trainer_kwargs)
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
    ctx = Context(config, data, out, resume, progress, log, device=device)
    rows = rep.run(ctx)
    seconds = ctx.clock.seconds  # a resumed run: with what the earlier one trained
    command = "torchtn reproduce " + config.name + (" --quick" if config.quick else "") + (
        f" --dataset {config.dataset}" if config.dataset else "") + (
        f" --data-dir {config.data_dir}" if config.data_dir else "") + (f" --seeds {config.seeds}" if config.seeds else "")
    results = {**run_record(config.name, command), "seconds": seconds, "quick": config.quick, "config": asdict(config),
               "rows": rows}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "report.md", rep.report(rows, ctx, results))
    return results


def recorded_results(out: Path, name: str) -> dict:
    """``out/results.json`` of a finished ``reproduce name`` run; ``ValueError`` saying what is wrong when it is
    missing, damaged or another reproduction's."""
    path = Path(out) / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist: --report-only rewrites the report of a finished run (its --out)"
                         ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} cannot be read as a run's results: {err}") from None
    if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
        raise ValueError(f"{path} holds no rows of results")
    if results.get("experiment") != name:
        raise ValueError(f"{path} holds the results of {results.get('experiment')!r}, not of {name!r}")
    return results


def rewrite_report(results: dict, data: Dataset, out: Path, log: Callable[[str], None] = print) -> Path:
    """``report.md`` and the plots of a finished run written again from its ``results`` (no training: after an
    upgrade, or to see its rows drawn as today's report draws them); the results, times and rows stay as they were
    measured."""
    from .registry import get_reproduction

    recorded = results.get("config") or {}
    config = ReproduceConfig(results["experiment"], bool(results.get("quick")), recorded.get("dataset", data.name),
                             recorded.get("data_dir"), recorded.get("seeds"))
    rep = get_reproduction(config.name)
    ctx = Context(config, data, Path(out), resume=True, progress=False, log=log)
    path = Path(out) / "report.md"
    try:
        report = rep.report(results["rows"], ctx, results)
    except KeyError as err:  # rows of a run older than the fields this report reads
        raise ValueError(f"{Path(out) / 'results.json'} has rows without {err}, which the report of {config.name} "
                         f"reads now: run the reproduction again to write it") from None
    atomic_write_text(path, report)
    return path
