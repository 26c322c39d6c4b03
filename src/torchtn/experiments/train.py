"""``torchtn train``: train a zoo model or the user's own (dense, with MPO or ADTN layers) with the shared trainer, on
one process or many.

Output directory (every file atomic; ``--resume`` continues from the checkpoint)::

    out/model.safetensors (+ .json)     the trained model (its config, so ``build_model`` rebuilds the skeleton)
    out/checkpoints/model.safetensors   the per-epoch training checkpoint
    out/results.json                    one row in the shared results format (conventions.md)
    out/sweeps.png                      with --optimizer sweep: entropy, bond dimension and truncation error per bond

Under ``torchrun`` the same command runs data-parallel (``Trainer`` wraps the model in DDP); only rank 0 writes.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._checks import check_choice, check_positive_int, check_positive_real
from .._modules import replace_submodule
from ..compress import tensorize
from ..core.adtn import MAPPINGS
from ..data import Dataset
from ..io import atomic_write_text, read_metadata, save_model
from ..layers import ADTNGenerator, TTLayer
from ..models import MODELS, build_model
from ..models.blocks import LAYER_KINDS, adtn_config
from ..models.user import build_user_model, check_arch, is_user_arch
from ..plotting import plot_metric_history
from ..report import run_record
from ..train import TrainConfig, Trainer, evaluate
from ..train.sweep import SweepConfig, Sweeper
from ..train.trainer import process_group
from .rundir import check_model_fits_data

__all__ = ["TrainJob", "run_train", "model_config", "job_model", "check_train_job", "ADTN_ARCHS"]

# zoo networks with ADTN layers: the big fully connected maps (alexnet, fc2, lenet5, vgg16, zfnet), the classifier
# (resnet18, densenet), the middle map (hybrid)
ADTN_ARCHS = ("alexnet", "densenet", "fc2", "hybrid", "lenet5", "resnet18", "vgg16", "zfnet")


@dataclass
class TrainJob:
    """Settings of one ``torchtn train`` run."""

    arch: str = "fc2"  # a zoo name, or the user's own: FILE.py:NAME, package.module:NAME
    arch_args: dict | None = None  # keyword arguments of a user's architecture
    layers: str = "dense"
    rank: int = 4
    dataset: str = "digits"
    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adamw"
    seed: int = 0
    max_rank: int = 16  # the four sweep options: used with optimizer="sweep"
    cutoff: float = 0.0
    sweep_lr: float = 0.05
    sweep_schedule: str = "batch"
    depth: int = 2  # brick layers of each ADTN, with layers="adtn"
    unitary: bool = False  # orthogonal ADTN gates, with layers="adtn"
    mapping: str = "rowmajor"  # how each ADTN's generated vector becomes its weight, with layers="adtn"

    def __post_init__(self) -> None:
        check_arch(self.arch, self.arch_args, MODELS)
        check_choice("layers", self.layers, LAYER_KINDS)
        if self.layers == "adtn" and self.arch not in ADTN_ARCHS and not is_user_arch(self.arch):
            raise ValueError(f"--layers adtn is wired for --arch {', '.join(ADTN_ARCHS)} (the ADTN paper's "
                             f"networks) and your own architectures, not {self.arch}")
        check_positive_int("rank", self.rank)
        check_positive_int("depth", self.depth)
        check_choice("unitary", self.unitary, (False, True))
        check_choice("mapping", self.mapping, MAPPINGS)
        if self.unitary and self.layers != "adtn":
            raise ValueError("--unitary is for --layers adtn (orthogonal ADTN gates)")
        if self.mapping != "rowmajor" and self.layers != "adtn":
            raise ValueError(f"--mapping {self.mapping} is for --layers adtn (how an ADTN's vector becomes its "
                             f"weight)")
        check_positive_int("batch_size", self.batch_size)
        check_positive_real("lr", self.lr)

    def train_config(self, progress: bool) -> TrainConfig:
        sweep = SweepConfig(max_rank=self.max_rank, cutoff=self.cutoff, lr=self.sweep_lr,
                            schedule=self.sweep_schedule) if self.optimizer == "sweep" else None
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, optimizer=self.optimizer,
                           seed=self.seed, progress=progress, desc=f"{self.arch}-{self.layers}", sweep=sweep)


def model_config(job: TrainJob, data: Dataset) -> dict:
    """The zoo config for this job and data (input size and classes come from the data)."""
    channels = data.image_shape[0] if len(data.image_shape) == 3 else 1
    adtn = adtn_config(job.layers, job.depth)
    if job.arch == "fc2":
        return {"name": "fc2", "in_features": data.num_features, "num_classes": data.num_classes,
                "layers": job.layers, "rank": job.rank, **adtn}
    if job.arch == "lenet5":
        ranks = [job.rank, job.rank, max(1, job.rank // 2)]  # Gao's (4, 4, 2) at --rank 4
        return {"name": "lenet5", "in_channels": channels, "num_classes": data.num_classes, "layers": job.layers,
                "ranks": ranks, **adtn}
    if job.arch == "hybrid":
        return {"name": "hybrid", "in_features": data.num_features, "out_features": data.num_classes,
                "layers": job.layers, "rank": job.rank, **adtn}
    return {"name": job.arch, "num_classes": data.num_classes, "layers": job.layers, "rank": job.rank, **adtn}


def job_model(job: TrainJob, data: Dataset) -> torch.nn.Module:
    """The model to train: the zoo's, built for this data; or the user's own, built from ``arch_args``, whose
    ``nn.Linear``/``nn.Conv2d``/``nn.Embedding`` layers become MPOs with every bond at ``rank`` when ``layers="mpo"``
    (through :func:`tensorize`, so a layer whose MPO would not be smaller stays dense), their cores then drawn afresh
    as the zoo's MPO layers are (PyTorch's variance for the layer's fan-in) — or, with ``layers="adtn"``, whose
    ``nn.Linear``/``nn.Conv2d`` layers (and attention projections) become fresh ADTNs of ``depth`` brick layers."""
    if not is_user_arch(job.arch):
        model = build_model(model_config(job, data))
        if job.unitary or job.mapping != "rowmajor":  # (the zoo's ADTNs are built with plain row-major ones)
            _fresh_adtn_gates(model, job.unitary, job.mapping)
        return model
    model = build_user_model(job.arch, job.arch_args)
    if job.layers == "mpo":
        model, _ = tensorize(model, rank=job.rank)
        for module in model.modules():
            if isinstance(module, TTLayer) and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    elif job.layers == "adtn":
        model, _ = tensorize(model, method="adtn", depth=job.depth, fit_steps=0)
        _fresh_adtn_gates(model, job.unitary, job.mapping)
    return model


def _fresh_adtn_gates(model: torch.nn.Module, unitary: bool, mapping: str = "rowmajor") -> None:
    """Every ADTN generator of ``model`` made afresh (gates from the job's seed, in module order) as before but with
    orthogonal gates if ``unitary`` and with ``mapping`` (which sets the number of qubits, hence the gates' shape)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ADTNGenerator):
            fresh = ADTNGenerator(module.shape, module.depth, fan_in=module.fan_in, activation=module.activation,
                                  gate_std=module.gate_std, unitary=unitary, mapping=mapping,
                                  device=module.gates.device, dtype=module.gates.dtype)
            replace_submodule(model, name, fresh)


def check_train_job(job: TrainJob, data: Dataset) -> None:
    """Before anything is written: the architecture builds and maps this data's images to one score per class."""
    with torch.random.fork_rng():
        model = job_model(job, data)
    check_model_fits_data(model, job.arch, data)
    if job.optimizer == "sweep":
        try:
            Sweeper(model, job.train_config(False).sweep)
        except ValueError:
            raise ValueError(f"--optimizer sweep trains MPO layers, and --arch {job.arch} --layers {job.layers} has "
                             f"none: use --layers mpo (e.g. --arch hybrid --layers mpo)") from None


def run_train(job: TrainJob, data: Dataset, out: Path, *, resume: bool = False, progress: bool = True,
              log: Callable[[str], None] = print, device: str | torch.device | None = None) -> dict:
    """Train, evaluate on the test split, write the model and ``results.json`` (rank 0 only); returns the row."""
    rank, world = process_group()
    out = Path(out)
    if rank == 0:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(job.seed)
    model = job_model(job, data)
    meta = {"train_job": asdict(job), "dataset": data.name}
    trainer = Trainer(model, job.train_config(progress), checkpoint=out / "checkpoints" / "model.safetensors",
                      metadata=meta, device=device)
    final = out / "model.safetensors"
    recorded = None  # what a finished run wrote into its model file
    if resume and final.exists():
        log(f"{final} exists: the run had finished")
        from ..io import load_model

        load_model(final, model)
        recorded = read_metadata(final)["metadata"]
        seconds, history = float(recorded.get("seconds", 0.0)), recorded.get("history", [])
    else:
        trainer.fit(data, resume=resume)
        model = trainer.model
        seconds = time.perf_counter() - started + trainer.earlier_seconds  # (epochs an interrupted run trained)
        history = [asdict(h) for h in trainer.history]
    _, acc = evaluate(model, data.x_test, data.y_test)
    params = sum(p.numel() for p in model.parameters())
    row = {"model": job.arch, "dataset": data.name, "seed": job.seed, "params": params, "test_accuracy": acc,
           "seconds": seconds, "layers": job.layers, "rank": job.rank if job.layers == "mpo" else None,
           "world_size": world, "optimizer": job.optimizer, "device": next(model.parameters()).device.type}
    sweep = recorded.get("sweep") if recorded is not None else (
        trainer.sweeper.state() if trainer.sweeper is not None else None)
    if sweep is not None and sweep["history"]:
        row["bond_dims"] = {r["layer"]: r["ranks"] for r in sweep["history"]}  # each layer's last sweep
    if rank == 0:
        if not final.exists():
            config = {"config": model.config()} if hasattr(model, "config") and not is_user_arch(job.arch) else {}
            save_model(model, final, {**meta, "seconds": seconds, "history": history, **config,
                                      **({"sweep": sweep} if sweep is not None else {})})
        if sweep is not None and sweep["history"]:
            from ..plotting import plot_sweep_history

            plot_sweep_history(sweep["history"], out / "sweeps.png", title=f"sweep training of {job.arch}")
        plot_metric_history(history, "accuracy", out / "training.png", ylabel="accuracy (%)", scale=100,
                            title=f"{job.arch} ({job.layers}) on {data.name}")  # the training curve
        results = {**run_record("train", "torchtn train"), "job": asdict(job), "seconds": seconds, "rows": [row],
                   "history": history}
        atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
        log(f"{job.arch} ({job.layers}) on {data.name}: {params:,} parameters, test accuracy {100 * acc:.2f}% "
            f"({seconds:.1f} s, {world} process{'es' if world > 1 else ''} on {row['device'].upper()})")
    return row
