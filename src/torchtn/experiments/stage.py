"""One stage of a job: train a model (resumably) into ``out/<name>.safetensors``, or load it if that file is done."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data import Dataset
from ..io import load_model, read_metadata, save_model
from ..train import TrainConfig, Trainer
from ..train.device import resolve_device

__all__ = ["train_stage", "RunClock"]


@dataclass
class RunClock:
    """A job's time: its own wall time plus the training an earlier, interrupted run of it did (the stages that run
    finished, which this one loads, and the epochs of a stage it began, which this one continues)."""

    started: float = field(default_factory=time.perf_counter)
    earlier: float = 0.0

    def count(self, stage_seconds: float, wall: float) -> None:
        """A stage reported ``stage_seconds`` after ``wall`` seconds of this run: the rest was the earlier run's."""
        self.earlier += max(0.0, stage_seconds - wall)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started + self.earlier


def train_stage(model: nn.Module, data: Dataset, cfg: TrainConfig, out: Path, name: str, meta: dict, *,
                resume: bool, device: str | torch.device | None = None, started: float | None = None,
                log: Callable[[str], None] | None = None, clock: RunClock | None = None, **trainer_kwargs) -> float:
    """Train ``model`` as stage ``name`` and return the seconds it took (counted from ``started`` if given; a stage
    continued from its checkpoint adds the seconds of the epochs an earlier run trained).

    Checkpoints go to ``out/checkpoints/<name>.safetensors`` (``resume`` continues from there); the final model goes
    to ``out/<name>.safetensors`` with ``meta``. When a resumed run had already finished this stage, the model is
    loaded from that file instead and its recorded seconds are returned. ``device`` and ``trainer_kwargs`` (loss,
    teacher, …) go to the :class:`Trainer`; the model is moved there in place either way. ``clock``: the job's
    :class:`RunClock`, told what of the stage's time an earlier run spent.
    """
    called = time.perf_counter() if started is None else started  # (what the stage's own seconds count from)
    seconds = _train_stage(model, data, cfg, out, name, meta, resume, device, started, log, trainer_kwargs)
    if clock is not None:
        clock.count(seconds, time.perf_counter() - called)
    return seconds


def _train_stage(model: nn.Module, data: Dataset, cfg: TrainConfig, out: Path, name: str, meta: dict, resume: bool,
                 device: str | torch.device | None, started: float | None, log: Callable[[str], None] | None,
                 trainer_kwargs: dict) -> float:
    final = out / f"{name}.safetensors"
    if resume and final.exists():
        load_model(final, model)
        if device is not None:
            model.to(resolve_device(device))
        if log is not None:
            log(f"{name}: loaded {final}")
        return float(read_metadata(final)["metadata"].get("seconds", 0.0))
    started = time.perf_counter() if started is None else started
    trainer = Trainer(model, cfg, checkpoint=out / "checkpoints" / f"{name}.safetensors", metadata=meta,
                      device=device, **trainer_kwargs)
    trainer.fit(data, resume=resume)
    seconds = time.perf_counter() - started + trainer.earlier_seconds
    save_model(model, final, {**meta, "train_config": asdict(cfg), "seconds": seconds}, overwrite=True)
    return seconds
