"""One trainer for every model: any loss and metrics, AdamW/SGD, cosine schedule, seeds, evaluation, NaN stop, a hook
for structural changes (parameters whose shape changes mid-run), atomic resumable checkpoints."""
from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .._checks import (
    check_choice,
    check_nonnegative_int,
    check_nonnegative_real,
    check_positive_int,
    check_positive_real,
)
from ..data import Dataset
from ..io import ModelFileError, load_model, read_metadata, read_tensors, save_model
from .device import resolve_device
from .sweep import SweepConfig, Sweeper

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "EpochRecord", "evaluate", "measure", "LOSSES", "accuracy",
           "distillation_loss", "process_group"]

_OPTIMIZERS = ("adamw", "adam", "sgd", "sweep")  # "adam": weight decay as an L2 term in the gradient
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max over the last dimension equals the integer target."""
    return (outputs.argmax(-1) == targets).double().mean()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton et al.'s knowledge-distillation loss on logits ``(batch, …, classes)``:
    ``T²·KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over the batch (at ``T = 1``: the plain KL)."""
    return temperature ** 2 * F.kl_div(F.log_softmax(student / temperature, dim=-1),
                                       F.log_softmax(teacher / temperature, dim=-1), log_target=True,
                                       reduction="batchmean")


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs, targets.to(outputs.dtype).reshape(outputs.shape))


# name -> (loss, default metrics)
LOSSES: dict[str, tuple[Loss, dict[str, Metric]]] = {
    "cross_entropy": (F.cross_entropy, {"accuracy": accuracy}),
    "mse": (_mse, {}),
}


def _resolve_loss(loss: str | Loss, metrics: dict[str, Metric] | None) -> tuple[str, Loss, dict[str, Metric]]:
    if isinstance(loss, str):
        check_choice("loss", loss, tuple(LOSSES))
        fn, default = LOSSES[loss]
        return loss, fn, dict(default if metrics is None else metrics)
    if not callable(loss):
        raise TypeError(f"loss={loss!r} is not allowed: expected one of {tuple(LOSSES)} or a callable "
                        f"(outputs, targets) -> scalar")
    return getattr(loss, "__name__", type(loss).__name__), loss, dict(metrics or {})


def process_group(init: bool = False, device: str | torch.device | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process; with ``init``, join the group ``torchrun`` describes in the environment
    (``WORLD_SIZE`` > 1) with the backend of the training ``device`` (see :func:`resolve_device`): NCCL for CUDA, one
    GPU per process, gloo for the CPU. ``(0, 1)`` outside ``torch.distributed``."""
    if dist.is_available() and not dist.is_initialized() and init and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        where = resolve_device(device)
        if where.type == "cuda":
            torch.cuda.set_device(where)
        # a bounded wait (TORCHTN_DIST_TIMEOUT seconds, default 300): a peer that died during a restart turns into
        # an error that torchrun's --max-restarts handles, not a hang
        timeout = datetime.timedelta(seconds=float(os.environ.get("TORCHTN_DIST_TIMEOUT", "300")))
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo", timeout=timeout)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the message says where and what to try."""


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (stored in every checkpoint)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    # "adamw" (decoupled weight decay), "adam" (weight decay added to the gradient, torch.optim.Adam's — what many
    # papers' code runs), "sgd" (with momentum), "sweep": DMRG-style sweeps for the MPO layers, AdamW for the rest
    optimizer: str = "adamw"
    momentum: float = 0.9  # SGD only
    min_lr_fraction: float = 0.0  # cosine schedule decays lr to lr * min_lr_fraction
    warmup_steps: int = 0  # linear warm-up of the learning rate over the first steps (0: none)
    seed: int = 0
    progress: bool = True
    desc: str = "train"
    sweep: SweepConfig | None = None  # options of optimizer="sweep" (default SweepConfig()); its lr follows the schedule
    max_seconds: float | None = None  # time budget: no epoch starts that would end past it (by the mean epoch
    # so far); the schedule runs by time too (its progress: the larger of steps/total and seconds/max_seconds)
    eval_batch_size: int = 1024  # rows per forward pass when validating
    steps_per_epoch: int | None = None  # cap: each epoch takes that many batches of its own seeded shuffle
    keep_best: bool = False  # end with the weights of the lowest validation loss seen, the starting weights included
    bucket: int = 0  # > 0: batches of rows of similar size (Trainer's ``sizes``), drawn from runs of this many batches

    def __post_init__(self) -> None:
        check_nonnegative_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_positive_real("lr", self.lr)
        check_nonnegative_real("weight_decay", self.weight_decay)
        check_choice("optimizer", self.optimizer, _OPTIMIZERS)
        if isinstance(self.sweep, dict):
            self.sweep = SweepConfig(**self.sweep)
        if self.optimizer == "sweep" and self.sweep is None:
            self.sweep = SweepConfig()
        if self.sweep is not None and not isinstance(self.sweep, SweepConfig):
            raise TypeError(f"sweep={self.sweep!r} is not allowed: expected a SweepConfig")
        if self.sweep is not None and self.optimizer != "sweep":
            raise ValueError(f"sweep options were given with optimizer={self.optimizer!r}: they need "
                             f"optimizer='sweep'")
        check_nonnegative_real("min_lr_fraction", self.min_lr_fraction, maximum=1.0)
        check_nonnegative_int("seed", self.seed)
        check_nonnegative_int("warmup_steps", self.warmup_steps)
        check_positive_real("max_seconds", self.max_seconds, allow_none=True)
        check_positive_int("eval_batch_size", self.eval_batch_size)
        if self.steps_per_epoch is not None:
            check_positive_int("steps_per_epoch", self.steps_per_epoch)
        if self.seed >= 2**32:
            raise ValueError(f"seed={self.seed!r} is not allowed: expected an integer in [0, 2**32)")
        check_nonnegative_int("bucket", self.bucket)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    lr: float
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)  # validation metrics by name ("accuracy", ...)

    @property
    def val_accuracy(self) -> float:
        return self.metrics.get("accuracy", float("nan"))


@torch.no_grad()
def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str | Loss = "cross_entropy",
            metrics: dict[str, Metric] | None = None, batch_size: int = 1024) -> dict[str, float]:
    """Mean loss (``"loss"``) and each metric of ``model`` on ``(x, y)`` in eval mode, weighted by batch size."""
    _, loss_fn, metric_fns = _resolve_loss(loss, metrics)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = dict.fromkeys(["loss", *metric_fns], 0.0)
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        out = model(xb)
        sums["loss"] += float(loss_fn(out, yb)) * len(yb)
        for name, fn in metric_fns.items():
            sums[name] += float(fn(out, yb)) * len(yb)
    model.train(was_training)
    n = max(len(y), 1)
    return {k: v / n for k, v in sums.items()}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of a classifier on ``(x, y)`` in eval mode."""
    m = measure(model, x, y, "cross_entropy", {"accuracy": accuracy}, batch_size)
    return m["loss"], m["accuracy"]


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer ``state_dict`` → (tensors for safetensors, JSON-able rest)."""
    tensors, rest = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, slots in state["state"].items():
        rest["state"][str(idx)] = {}
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"__optim/{idx}/{key}"] = value
            else:
                rest["state"][str(idx)][key] = value
    return tensors, rest


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in rest["state"].items()}
    for name, value in tensors.items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _record(h: dict) -> EpochRecord:
    """An :class:`EpochRecord` from a checkpoint's JSON (torchtn 0.1 stored ``val_accuracy`` as a field)."""
    h = dict(h)
    metrics = dict(h.pop("metrics", {}))
    if "val_accuracy" in h:
        metrics.setdefault("accuracy", h.pop("val_accuracy"))
    return EpochRecord(**h, metrics=metrics)


class _Progress:
    """A run's one progress bar: steps out of the epochs' steps, or — under a time budget (``max_seconds``), where
    the epoch count is only a cap and a step bar would show an ETA of days — seconds out of the budget."""

    def __init__(self, total_steps: int, done_steps: int, budget: float | None, spent: float, *, desc: str | None,
                 disable: bool) -> None:
        self.budget = budget
        common = dict(desc=desc, leave=False, disable=disable, dynamic_ncols=True, mininterval=0.5)
        if budget is None:
            self.bar = tqdm(total=total_steps, initial=done_steps, unit="step", **common)
        else:
            self.bar = tqdm(total=budget, initial=min(spent, budget), unit="s", **common,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of the time budget "
                                       "[{elapsed}{postfix}]")
        self._last = time.perf_counter()

    def step(self) -> None:
        """One optimizer step done (under a time budget: the seconds since the last step, validation included)."""
        if self.budget is None:
            self.bar.update(1)
            return
        now = time.perf_counter()
        self.bar.update(min(now - self._last, max(0.0, self.budget - self.bar.n)))  # never past the budget
        self._last = now

    def set_postfix(self, **kwargs) -> None:
        self.bar.set_postfix(**kwargs)

    def close(self) -> None:
        self.bar.close()


class Trainer:
    """Train any model on a :class:`Dataset` (inputs as the dataset holds them, e.g. images ``(N, C, H, W)``).

    ``loss``: ``"cross_entropy"`` (default; metric ``accuracy``), ``"mse"`` (regression; targets reshaped to the
    outputs), or a callable ``(outputs, targets) -> scalar``; ``metrics``: ``{name: fn(outputs, targets) -> scalar}``
    computed on the validation split after every epoch (default: those of the named loss).
    ``on_step_end(trainer, step) -> bool``: called after every optimizer step; return ``True`` when it changed the
    model's structure (e.g. a sweep changed bond dimensions) and the trainer rebuilds its optimizer
    (:meth:`structure_changed`). ``config.optimizer="sweep"`` trains every ``MPOLinear`` by DMRG-style sweeps
    (:class:`~torchtn.train.sweep.Sweeper`, options ``config.sweep``; bond dimensions adapt, ``sweeper.history``
    records ranks, entropies and truncation errors per sweep) and the other parameters by AdamW in the same step.
    ``teacher`` (e.g. the dense model a compressed one is healed from) adds knowledge
    distillation: ``(1 − distill)·loss + distill·T²·KL(softmax(teacher/T) ‖ softmax(model/T))``, or with
    ``distill_loss(student_out, teacher_out)`` any other match: ``(1 − distill)·loss + distill·distill_loss``
    (at ``distill=1`` the data's targets are never read: pure distillation). ``device``
    (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``; default: where the model is) moves the model and the teacher
    there in place; batches follow. With ``checkpoint`` (a ``.safetensors`` path) the model, optimizer, RNG state and
    history are written atomically after every epoch; ``fit(resume=True)`` continues from it and ends with the same
    weights as an uninterrupted run. An existing checkpoint is never replaced by a fresh run. With
    ``config.keep_best`` the validation loss is also measured before the first step, and training ends with the
    weights of the lowest one (``best_epoch``: 0 for the starting weights), kept in the checkpoint too.
    ``sizes(x) -> (N,)`` with ``config.bucket = k``: each epoch's shuffle is cut into runs of ``k`` batches, the rows of
    a run are sorted by size before they are cut into batches, and the batches are shuffled — rows of similar size
    share a batch (padded token sequences: about half the padding of random batches), every batch still random.
    ``augment(x, generator) -> x``: a random change of every training batch's inputs (crops of images or passages,
    dropped tokens, …), drawn from ``generator`` — seeded per seed, epoch, step and process, so a resumed run sees
    the same batches; validation never is. A teacher sees the changed inputs too (its targets follow them).

    Under ``torch.distributed`` (e.g. ``torchrun``; the process group initialized by the caller) the model is wrapped
    in ``DistributedDataParallel`` and every global batch of ``batch_size`` rows is split across the processes, with
    each process's loss weighted by its share, so the averaged gradient is the single-process gradient of the same
    global batch; only rank 0 writes checkpoints and shows the bar.
    """

    def __init__(self, model: nn.Module, config: TrainConfig | None = None, checkpoint: str | os.PathLike | None = None,
                 metadata: dict | None = None, on_epoch_end: Callable[[EpochRecord], None] | None = None, *,
                 loss: str | Loss = "cross_entropy", metrics: dict[str, Metric] | None = None,
                 on_step_end: Callable[["Trainer", int], bool] | None = None, teacher: nn.Module | None = None,
                 distill: float = 0.5, temperature: float = 2.0, device: str | torch.device | None = None,
                 distill_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 sizes: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> None:
        if device is not None:  # moved in place, so the caller's model is the trained one
            device = resolve_device(device)
            model.to(device)
            if teacher is not None:
                teacher.to(device)
        self.model = model
        self.loss_name, self.loss_fn, self.metrics = _resolve_loss(loss, metrics)
        self.on_step_end = on_step_end
        self.teacher = teacher
        if teacher is not None:
            check_nonnegative_real("distill", distill, maximum=1.0)
        check_positive_real("temperature", temperature)
        self.distill, self.temperature = float(distill), float(temperature)
        if distill_loss is not None and (teacher is None or not callable(distill_loss)):
            raise ValueError("distill_loss needs a teacher and must be a callable (student_out, teacher_out) -> scalar")
        self.distill_loss = distill_loss
        self.optimizer: torch.optim.Optimizer | None = None
        self.rank, self.world_size = process_group()
        self._net: nn.Module = model
        self.config = config or TrainConfig()
        if self.config.bucket and sizes is None:
            raise ValueError(f"config.bucket={self.config.bucket} groups rows by size: pass sizes=fn(x) -> (N,) row "
                             f"sizes to the Trainer")
        self.sizes = sizes
        if augment is not None and not callable(augment):
            raise TypeError(f"augment={augment!r} is not allowed: expected a callable (x, generator) -> x")
        self.augment = augment
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        if self.checkpoint is not None and self.checkpoint.suffix != ".safetensors":
            raise ValueError(f"checkpoint={str(self.checkpoint)!r} must end in .safetensors")
        self.metadata = dict(metadata or {})
        self.on_epoch_end = on_epoch_end
        self.history: list[EpochRecord] = []
        self.resumed_epochs = 0  # epochs the last fit took from its checkpoint (trained by an earlier run)
        self.best: tuple[int, float, dict[str, torch.Tensor]] | None = None  # keep_best: (epoch, val loss, weights)
        self.sweeper: Sweeper | None = None
        if self.config.optimizer == "sweep":
            if self.world_size > 1:
                raise ValueError("optimizer='sweep' runs on one process: its local SVD updates are not averaged "
                                 "across torch.distributed processes; use adamw, adam or sgd under torchrun")
            self.sweeper = Sweeper(model, self.config.sweep)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]  # a sweep's cores are frozen here
        self._names = {id(p): n for n, p in self.model.named_parameters()}
        if c.optimizer == "sweep" and not params:  # nothing outside the sweep: an optimizer with nothing to do
            params = [nn.Parameter(torch.zeros(0))]
        if not params:
            raise ValueError(f"{type(self.model).__name__} has no trainable parameters (none, or all with "
                             f"requires_grad=False): there is nothing to train")
        if c.optimizer in ("adamw", "sweep"):
            return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        if c.optimizer == "adam":
            return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def _check_targets(self, data: Dataset) -> None:
        """For the built-in losses, that the targets fit the model's outputs — class labels within its class scores,
        as many regression targets as outputs — read from one example run in eval mode (a mismatch otherwise fails
        deep inside the loss, or trains on misread targets)."""
        if self.loss_name not in LOSSES or len(data.y_train) == 0 or (self.teacher is not None and self.distill == 1.0):
            return  # (pure distillation never reads the targets)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                out = self.model(data.x_train[:1].to(device))
        finally:
            self.model.train(was_training)
        y = data.y_train
        if not isinstance(out, torch.Tensor):
            if self.loss_name in LOSSES:  # a built-in loss compares a tensor of outputs with the targets
                raise TypeError(f"{type(self.model).__name__} returns a {type(out).__name__}, but loss="
                                f"{self.loss_name!r} needs one tensor of outputs per batch: pass loss=fn(outputs, "
                                f"targets) that takes what it returns")
            return  # a custom output structure: the custom loss reads it
        if self.loss_name == "cross_entropy":
            if out.dim() > 1 and out.shape[1] == 1:
                raise ValueError(f"{type(self.model).__name__} gives one output per example: cross-entropy over one "
                                 f"class is always 0 (its softmax is 1); for regression use loss='mse', for two "
                                 f"classes give the model 2 outputs")
            if y.is_floating_point() or y.is_complex():  # class probabilities, one per class score, or a mistake
                if y.shape[1:] != out.shape[1:]:
                    raise ValueError(f"loss='cross_entropy' needs integer class labels or class probabilities shaped "
                                     f"like the outputs {tuple(out.shape[1:])}, but y_train is {y.dtype} "
                                     f"{tuple(y.shape)} (for regression targets use loss='mse')")
                return
            classes = out.shape[1] if out.dim() > 1 else 0
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= classes:
                raise ValueError(f"the labels of {data.name!r} run from {low} to {high}, but "
                                 f"{type(self.model).__name__} gives {classes} class scores (output "
                                 f"{tuple(out.shape)} for one example): build it with num_classes > {high}")
        elif out[0].numel() != y[0].numel():
            raise ValueError(f"{type(self.model).__name__} gives {out[0].numel()} outputs per example "
                             f"{tuple(out.shape[1:])}, but the targets of {data.name!r} have {y[0].numel()} "
                             f"{tuple(y.shape[1:])}")

    def structure_changed(self) -> torch.optim.Optimizer:
        """Rebuild the optimizer after parameters were replaced (e.g. a bond dimension changed).

        Optimizer state (Adam moments, momentum, step counts) is kept for every parameter that is still the same
        tensor, or that has the same name and shape as before; parameters whose shape changed start fresh.
        """
        old = self.optimizer
        if old is None:
            raise RuntimeError("structure_changed() is for use during fit(); there is no optimizer yet")
        by_name = {self._names.get(id(p)): (p, old.state.get(p, {})) for g in old.param_groups for p in g["params"]}
        lr = old.param_groups[0]["lr"]
        new = self._make_optimizer()
        for group in new.param_groups:
            group["lr"] = lr
            for p in group["params"]:
                prev = by_name.get(self._names.get(id(p)))
                if prev is None or not prev[1]:
                    continue
                prev_p, state = prev
                if prev_p is p or prev_p.shape == p.shape:
                    new.state[p] = {k: (v.clone() if isinstance(v, torch.Tensor) and v.dim() else v)
                                    for k, v in state.items()}
        self.optimizer = new
        self._wrap()
        return new

    def _wrap(self) -> None:
        """The module that runs the forward pass: the model, or its DDP wrapper under ``torch.distributed``."""
        if self.world_size == 1:
            self._net = self.model
            return
        device = next(self.model.parameters()).device
        self._net = DistributedDataParallel(self.model, device_ids=[device] if device.type == "cuda" else None)

    def _lr(self, step: int, total: int, seconds: float = 0.0) -> float:
        """The learning rate of ``step`` of ``total``, ``seconds`` into training: warm-up, then the cosine schedule,
        whose progress is the larger of the steps' and — with ``max_seconds`` — the time budget's."""
        c = self.config
        progress = step / max(total, 1)
        if c.max_seconds is not None:  # a time budget ends the run first when epochs is only a cap
            progress = min(1.0, max(progress, seconds / c.max_seconds))
        lr = c.lr * (c.min_lr_fraction + (1 - c.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))
        return lr * min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else lr

    def _save(self, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        if self.checkpoint is None:
            return
        if self.rank != 0:  # one writer; the others wait until the checkpoint is complete
            dist.barrier()
            return
        tensors, rest = _flatten_optimizer(optimizer.state_dict())
        tensors["__rng/torch"] = torch.get_rng_state()
        if self.best is not None:
            tensors.update({f"__best/{k}": v for k, v in self.best[2].items()})
        device = next(self.model.parameters()).device
        if device.type == "cuda":  # dropout and other random layers draw from the GPU's generator
            tensors["__rng/cuda"] = torch.cuda.get_rng_state(device)
        meta = {
            "kind": "torchtn-checkpoint",
            "epoch": epoch,
            "train_config": asdict(self.config),
            "history": [asdict(h) for h in self.history],
            "optimizer": rest,
            "loss": self.loss_name,
            **({"best": [self.best[0], self.best[1]]} if self.best is not None else {}),
            **({"sweep": self.sweeper.state()} if self.sweeper is not None else {}),
            "architecture": self.model.config() if hasattr(self.model, "config") else type(self.model).__name__,
            **self.metadata,
        }
        save_model(self.model, self.checkpoint, meta, overwrite=True, extra_tensors=tensors)
        if self.world_size > 1:
            dist.barrier()

    def _restore(self) -> tuple[torch.optim.Optimizer, int]:
        """Load the checkpoint into the model — layers as recorded, so bond dimensions changed by a sweep come back
        as they were — then build the optimizer for those parameters and load its state."""
        assert self.checkpoint is not None
        meta = read_metadata(self.checkpoint).get("metadata", {})
        if not isinstance(meta, dict) or "train_config" not in meta or "optimizer" not in meta:
            raise ModelFileError(f"{self.checkpoint} is not a torchtn training checkpoint (no training state)")
        # settings added after the checkpoint was written count as their defaults
        saved_cfg = {k: v for k, v in {**asdict(TrainConfig()), **meta["train_config"]}.items()
                     if k not in ("progress", "desc")}
        now_cfg = {k: v for k, v in asdict(self.config).items() if k not in ("progress", "desc")}
        if saved_cfg != now_cfg:
            diff = {k: (saved_cfg.get(k), now_cfg.get(k)) for k in now_cfg if saved_cfg.get(k) != now_cfg.get(k)}
            raise ValueError(f"cannot resume {self.checkpoint}: its training settings differ (saved, now): {diff}")
        if meta.get("loss", "cross_entropy") != self.loss_name:
            raise ValueError(f"cannot resume {self.checkpoint}: it was trained with loss {meta.get('loss')!r}, "
                             f"not {self.loss_name!r}")
        load_model(self.checkpoint, self.model, strict=True)
        if self.sweeper is not None:  # the loaded layers replaced the hooked ones
            self.sweeper.detach()
            self.sweeper.attach()
            self.sweeper.load_state(meta.get("sweep", {}))
        optimizer = self.optimizer = self._make_optimizer()
        tensors = read_tensors(self.checkpoint)
        optim = {k[len("__optim/"):]: v for k, v in tensors.items() if k.startswith("__optim/")}
        try:
            optimizer.load_state_dict(_unflatten_optimizer(optim, meta["optimizer"]))
            torch.set_rng_state(tensors["__rng/torch"])
            device = next(self.model.parameters()).device
            if device.type == "cuda" and "__rng/cuda" in tensors:
                torch.cuda.set_rng_state(tensors["__rng/cuda"], device)
            self.history = [_record(h) for h in meta["history"]]
            if "best" in meta:
                best = {k[len("__best/"):]: v for k, v in tensors.items() if k.startswith("__best/")}
                self.best = (int(meta["best"][0]), float(meta["best"][1]), best)
            return optimizer, int(meta["epoch"])
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise ModelFileError(f"{self.checkpoint}: its training state is damaged ({type(err).__name__})") from None

    def _train_epoch(self, optimizer: torch.optim.Optimizer, data: Dataset, epoch: int, steps_per_epoch: int,
                     total: int, bar: "_Progress", spent: float = 0.0) -> tuple[float, float]:
        """One pass over the training split in a seeded order; returns (mean training loss, last learning rate)."""
        c = self.config
        device = next(self.model.parameters()).device
        self.model.train()
        batches = self._batches(data, epoch, steps_per_epoch)
        # seconds into training at each step, for a schedule by time: the epochs so far, then this one at their mean
        # pace — the same on every process (wall clocks differ; learning rates must not)
        pace = spent / len(self.history) / steps_per_epoch if self.history else 0.0
        running, seen, lr = 0.0, 0, c.lr
        for i in range(steps_per_epoch):
            lr = self._lr(epoch * steps_per_epoch + i, total, spent + pace * i)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = batches[i]
            mine = idx[self.rank::self.world_size]  # this process's share of the global batch
            xb, yb = data.x_train[mine], data.y_train[mine]
            if self.augment is not None:
                step_seed = (((c.seed * 1_000_003 + epoch) * 1_000_003 + i) * 1_009 + self.rank) % 2**63
                xb = self.augment(xb, torch.Generator().manual_seed(step_seed))
            xb, yb = xb.to(device), yb.to(device)
            loss = self._batch_loss(xb, yb)
            if self.world_size > 1:  # DDP averages gradients over processes: weight each by its share
                loss = loss * (len(mine) * self.world_size / len(idx))
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"{c.desc}: loss became {loss_value} at epoch {epoch + 1}, step {i + 1} "
                                       f"(lr={lr:.3g}); lower the learning rate (--lr / TrainConfig.lr) or check the "
                                       f"data for NaN/inf")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if self.sweeper is not None:
                self.sweeper.update(epoch * steps_per_epoch + i, i, steps_per_epoch,
                                    lambda: self._batch_loss(xb, yb), lr_scale=lr / c.lr)
            if self.on_step_end is not None and self.on_step_end(self, epoch * steps_per_epoch + i):
                optimizer = self.structure_changed()
            running += loss_value * len(idx) / self.world_size
            seen += len(idx) / self.world_size
            bar.step()
        self.optimizer = optimizer
        if self.world_size > 1:
            totals = torch.tensor([running, seen], dtype=torch.float64)
            dist.all_reduce(totals)
            running, seen = float(totals[0]), float(totals[1])
        return running / max(seen, 1), lr

    def _batches(self, data: Dataset, epoch: int, steps: int) -> list[torch.Tensor]:
        """The row indices of each of the epoch's ``steps`` batches: a seeded shuffle, cut in order — or, with
        ``config.bucket``, runs of ``bucket`` batches sorted by row size, then the batches shuffled."""
        c = self.config
        generator = torch.Generator().manual_seed(c.seed * 100_003 + epoch)
        rows = torch.randperm(len(data.y_train), generator=generator)[:steps * c.batch_size]
        if not c.bucket:
            return list(rows.split(c.batch_size))
        assert self.sizes is not None
        size = torch.as_tensor(self.sizes(data.x_train[rows])).reshape(-1)
        batches: list[torch.Tensor] = []
        for run, run_size in zip(rows.split(c.bucket * c.batch_size), size.split(c.bucket * c.batch_size)):
            batches.extend(run[torch.argsort(run_size, stable=True)].split(c.batch_size))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator)]

    def _batch_loss(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch (with distillation from the teacher when there is one)."""
        out = self._net(xb)
        if self.teacher is None:
            return self.loss_fn(out, yb)
        with torch.no_grad():
            target = self.teacher(xb)
        if self.distill_loss is not None:  # any match to the teacher's outputs
            match = self.distill_loss(out, target)
        else:  # knowledge distillation (Hinton et al.): match the teacher's softened outputs
            match = distillation_loss(out, target, self.temperature)
        if self.distill == 1.0:  # the teacher alone: the targets yb are not read
            return match
        return (1 - self.distill) * self.loss_fn(out, yb) + self.distill * match

    def fit(self, data: Dataset, resume: bool = False) -> list[EpochRecord]:
        """Train for ``config.epochs`` epochs (continuing a checkpoint when ``resume``); returns the history."""
        if not isinstance(data, Dataset):
            raise TypeError(f"data must be a torchtn.data.Dataset (train / val / test splits), got "
                            f"{type(data).__name__}: wrap tensors as Dataset(name, x_train, y_train, x_val, y_val, "
                            f"x_test, y_test, image_shape, num_classes)")
        if self.sweeper is not None:
            self.sweeper.attach()
        try:
            return self._fit(data, resume)
        finally:
            if self.sweeper is not None:
                self.sweeper.detach()

    def _fit(self, data: Dataset, resume: bool) -> list[EpochRecord]:
        c = self.config
        if len(data.y_train) == 0 and c.epochs > 0:
            raise ValueError(f"data {data.name!r} has no training rows: there is nothing to train on")
        optimizer = self.optimizer = self._make_optimizer()
        self._check_targets(data)
        start = 0
        if c.batch_size < self.world_size:
            raise ValueError(f"batch_size={c.batch_size} is not allowed with {self.world_size} processes: every "
                             f"process needs at least one row of each global batch")
        if self.checkpoint is not None and self.checkpoint.exists():
            if not resume:
                raise FileExistsError(f"checkpoint {self.checkpoint} exists: resume it (resume=True / --resume) or "
                                      f"choose another output path; it is never overwritten by a fresh run")
            optimizer, start = self._restore()
            self.resumed_epochs = start
        else:
            torch.manual_seed(c.seed)
            self.resumed_epochs = 0
            self.best = None  # a fresh run: a previous fit's best weights are no candidate
            if self.sweeper is not None:
                self.sweeper.canonicalize()
        self._wrap()
        if self.teacher is not None:
            self.teacher.eval()  # its targets, not a dropout sample of them
        steps_per_epoch = math.ceil(len(data.y_train) / c.batch_size)
        if c.steps_per_epoch is not None:  # an "epoch" of a fixed number of batches: a fresh random subset each time
            steps_per_epoch = min(steps_per_epoch, c.steps_per_epoch)
        total = steps_per_epoch * c.epochs
        if c.keep_best and self.best is None:  # the starting weights are the first candidate
            self._consider_best(0, measure(self.model, data.x_val, data.y_val, self.loss_fn, self.metrics,
                                           c.eval_batch_size)["loss"])
        # one bar per run (not per epoch): readable in a terminal and not flooding a log file
        bar = _Progress(total, start * steps_per_epoch, c.max_seconds, self._spent() if c.max_seconds else 0.0,
                        desc=c.desc, disable=not c.progress or self.rank != 0)
        try:
            for epoch in range(start, c.epochs):
                spent = self._spent() if c.max_seconds is not None else 0.0
                if c.max_seconds is not None and self.history and spent + spent / len(self.history) > c.max_seconds:
                    break  # the next epoch would end past the time budget
                t0 = time.perf_counter()
                train_loss, lr = self._train_epoch(optimizer, data, epoch, steps_per_epoch, total, bar, spent)
                optimizer = self.optimizer
                val = measure(self.model, data.x_val, data.y_val, self.loss_fn, self.metrics, c.eval_batch_size)
                val_loss = val.pop("loss")
                shown = {k: (f"{100 * v:.2f}%" if k == "accuracy" else f"{v:.4g}") for k, v in val.items()}
                bar.set_postfix(epoch=f"{epoch + 1}" if c.max_seconds else f"{epoch + 1}/{c.epochs}",  # a cap: not shown
                                loss=f"{train_loss:.4f}", val_loss=f"{val_loss:.4g}", **shown, refresh=False)
                record = EpochRecord(epoch + 1, train_loss, val_loss, lr, time.perf_counter() - t0, val)
                self.history.append(record)
                if c.keep_best:
                    self._consider_best(epoch + 1, val_loss)
                self._save(optimizer, epoch + 1)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(record)
        finally:
            bar.close()
        if self.best is not None:
            self.model.load_state_dict(self.best[2])
        return self.history

    @property
    def earlier_seconds(self) -> float:
        """Seconds the epochs restored from the checkpoint took when an earlier, interrupted run trained them (0 for
        a fresh fit): with this fit's own time, what training took in all (the interrupted epoch's lost work
        aside)."""
        return sum(h.seconds for h in self.history[:self.resumed_epochs])

    def _spent(self) -> float:
        """Seconds the recorded epochs took — the slowest process's, so every process decides alike."""
        spent = sum(h.seconds for h in self.history)
        if self.world_size > 1:
            total = torch.tensor([spent], dtype=torch.float64)
            dist.all_reduce(total, op=dist.ReduceOp.MAX)
            spent = float(total[0])
        return spent

    @property
    def best_epoch(self) -> int | None:
        """With ``keep_best``: the epoch whose weights the model ends with (0: the starting weights)."""
        return None if self.best is None else self.best[0]

    def _consider_best(self, epoch: int, val_loss: float) -> None:
        if self.best is None or val_loss < self.best[1]:
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self.best = (epoch, float(val_loss), state)


