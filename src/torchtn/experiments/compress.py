"""The main job: a dense model (FC2 trained here, or a trained model file of a zoo or the user's own architecture),
tensorized at several settings, each fine-tuned, reported and plotted.

Layout of the output directory (every file written atomically; a rerun with ``resume=True`` skips finished stages and
continues an interrupted training from its checkpoint)::

    out/dense.safetensors (+ .json)          trained dense model
    out/<setting>.safetensors (+ .json)      each fine-tuned MPO model ("rank-4", "rel_tol-0.3", "ratio-50")
    out/checkpoints/*.safetensors            per-epoch training checkpoints
    out/results.json                         every number in the table
    out/accuracy_vs_compression.png          the plot
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._checks import (
    check_choice,
    check_nonnegative_int,
    check_positive_int,
    check_positive_real,
    check_rel_tol,
    error_line,
)
from ..compress import tensorize
from ..data import Dataset, load_dataset
from ..io import atomic_write_text, load_model
from ..models import FC2
from ..models.user import build_user_model, check_arch, is_user_arch
from ..report import format_table
from ..train import TrainConfig, evaluate
from .rundir import available_memory, check_model_fits_data, check_resume, check_writable
from .stage import train_stage

__all__ = ["CompressConfig", "CompressRow", "run_compress", "preflight", "DEFAULT_RANKS", "results_table"]

DEFAULT_RANKS = (1, 2, 4, 8, 16)
DEFAULT_EPOCHS = {"digits": 30, "fashion-mnist": 15, "mnist": 15, "cifar10": 15, "cifar100": 15}


@dataclass
class CompressConfig:
    """Settings of one ``torchtn compress`` run. Exactly one of ``ranks`` / ``rel_tol`` / ``ratio`` picks the sweep."""

    dataset: str = "digits"
    data_dir: str | None = None
    hidden: int = 256
    epochs: int | None = None  # dense training; None: DEFAULT_EPOCHS[dataset]
    finetune_epochs: int | None = None  # None: same as epochs
    ranks: Sequence[int] | None = None
    rel_tol: float | None = None
    ratio: float | None = None
    batch_size: int = 128
    lr: float = 2e-3
    finetune_lr: float = 1e-3
    seed: int = 0
    arch: str = "fc2"  # the zoo architecture of the dense model, or the user's own: FILE.py:NAME, package.module:NAME
    arch_args: dict | None = None  # keyword arguments of a user's architecture
    model_file: str | None = None  # start from these trained weights instead of training the dense model
    distill: float = 0.0  # healing: weight of the distillation loss from the dense model (0: plain fine-tuning)
    temperature: float = 2.0  # healing: distillation temperature
    conv_modes: str = "matrix"  # "kernel": convolutions as the TT of their 4-D kernel (four small convolutions)

    def __post_init__(self) -> None:
        from ..models import MODELS

        check_arch(self.arch, self.arch_args, MODELS)
        if not (isinstance(self.distill, (int, float)) and 0.0 <= self.distill < 1.0):
            raise ValueError(f"distill={self.distill!r} is not allowed: expected a number in [0, 1)")
        check_positive_real("temperature", self.temperature)
        check_choice("conv_modes", self.conv_modes, ("matrix", "kernel"))
        if self.epochs is not None:
            check_nonnegative_int("epochs", self.epochs)
        if self.finetune_epochs is not None:
            check_nonnegative_int("finetune_epochs", self.finetune_epochs)
        check_positive_int("hidden", self.hidden)
        check_positive_int("batch_size", self.batch_size)
        check_positive_real("lr", self.lr)
        check_positive_real("finetune_lr", self.finetune_lr)
        check_nonnegative_int("seed", self.seed)
        check_rel_tol("rel_tol", self.rel_tol)
        check_positive_real("ratio", self.ratio, allow_none=True)
        if self.ranks is not None:
            self.ranks = [check_positive_int("rank", r) for r in self.ranks]
        if sum(x is not None for x in (self.ranks, self.rel_tol, self.ratio)) > 1:
            raise ValueError("give only one of rank, rel_tol and ratio")

    def settings(self) -> list[tuple[str, dict]]:
        """``(name, tensorize kwargs)`` for each point of the sweep."""
        if self.rel_tol is not None:
            return [(f"rel_tol-{self.rel_tol:g}", {"rel_tol": self.rel_tol})]
        if self.ratio is not None:
            return [(f"ratio-{self.ratio:g}", {"ratio": self.ratio})]
        return [(f"rank-{r}", {"rank": r}) for r in (self.ranks or DEFAULT_RANKS)]

    @property
    def dense_epochs(self) -> int:
        return DEFAULT_EPOCHS.get(self.dataset, 15) if self.epochs is None else self.epochs

    @property
    def tune_epochs(self) -> int:
        return self.dense_epochs if self.finetune_epochs is None else self.finetune_epochs


@dataclass
class CompressRow:
    """One line of the results table."""

    setting: str
    fc1_ranks: tuple[int, ...]
    fc1_ratio: float  # first layer: dense weight / core entries
    params: int  # whole model
    ratio: float  # whole model: dense / tensorized
    acc_before: float  # test accuracy right after TT-SVD
    acc_after: float  # test accuracy after fine-tuning
    val_after: float
    seconds: float
    layers: list[dict] = field(default_factory=list)


def results_table(dense_params: int, dense_acc: float, dense_seconds: float, rows: Sequence[CompressRow]) -> str:
    first = rows[0].layers[0]["name"] if rows and rows[0].layers else "fc1"  # the first tensorized layer
    headers = ["model", f"{first} ranks", f"{first} ratio", "params", "ratio", "test acc TT-SVD %", "test acc tuned %",
               "time s"]
    body = [("dense", "-", 1.0, dense_params, 1.0, "-", round(100 * dense_acc, 2), round(dense_seconds, 1))]
    body += [(r.setting, str(r.fc1_ranks), round(r.fc1_ratio, 1), r.params, round(r.ratio, 1),
              round(100 * r.acc_before, 2), round(100 * r.acc_after, 2), round(r.seconds, 1)) for r in rows]
    note = (f"ratio = dense parameters / tensorized parameters (higher is smaller); {first} ratio counts its weight "
            f"only")
    return format_table(headers, body) + "\n" + note


def _effective(config: dict) -> dict:
    """A config with its defaults resolved (so ``--epochs 30`` on digits equals leaving it out), minus ``data_dir``."""
    c = CompressConfig(**config)
    out = {k: v for k, v in asdict(c).items() if k != "data_dir"}
    out.update(epochs=c.dense_epochs, finetune_epochs=c.tune_epochs, settings=[name for name, _ in c.settings()])
    out["ranks"] = None if c.ranks is None else list(c.ranks)
    return out


def dense_model(config: CompressConfig, data: Dataset) -> torch.nn.Module:
    """The dense model of the job: FC2 (input → ``hidden`` → classes), another zoo architecture for this data, or the
    user's own (``FILE.py:NAME`` called with ``arch_args``)."""
    if is_user_arch(config.arch):
        return build_user_model(config.arch, config.arch_args)
    if config.arch == "fc2":
        return FC2(data.num_features, config.hidden, data.num_classes)
    from ..models import build_model
    from .train import TrainJob, model_config

    return build_model(model_config(TrainJob(arch=config.arch, layers="dense"), data))


def load_user_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Trained weights from a file someone else wrote, never executing code: a torchtn model file, a plain
    safetensors state dict, or a ``.pt``/``.pth`` state dict read with ``torch.load(weights_only=True)``."""
    from ..io import ModelFileError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--model-file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_model(path, model)
        except ModelFileError as err:
            if "not written by torchtn" not in str(err):
                raise
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:
            raise ValueError(f"--model-file {path} is not a readable safetensors file ({type(err).__name__})") from None
    elif path.suffix in (".pt", ".pth"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle refusals, truncation, …
            raise ValueError(f"--model-file {path} cannot be read as a weights-only state dict "
                             f"({error_line(err, 160)})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    else:
        raise ValueError(f"--model-file {path}: expected a .safetensors, .pt or .pth file")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--model-file {path} does not hold a state dict of tensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"--model-file {path} does not fit --arch {type(model).__name__}: "
                         f"{str(err).strip().splitlines()[-1].strip()[:200]}") from None
    return model


def preflight(config: CompressConfig, out: Path, resume: bool, data: Dataset) -> dict[str, torch.Tensor] | None:
    """Every check that can be made before anything is written or trained; raises ``ValueError`` with one line.

    The output place is writable; the model fits in memory; the ``model_file`` fits the architecture; a ``ratio`` is
    reachable for these layer sizes; a resumed run exists in ``out`` and was made with the same settings (named when
    they differ). Returns the ``model_file``'s weights as checked (``None`` without one), for :func:`run_compress`'s
    ``user_state``: the file is read once.
    """
    check_writable(out)
    params = data.num_features * config.hidden + config.hidden + config.hidden * data.num_classes + data.num_classes
    rows = min(config.batch_size, len(data.y_train))
    need = 4 * params * 4 + 4 * rows * (config.hidden + data.num_features) * 4  # w, grad, 2×Adam; activations
    avail = available_memory()
    if avail is not None and need > avail:
        raise ValueError(f"--hidden {config.hidden} with --batch-size {config.batch_size}: training this "
                         f"{params:,}-parameter model needs about {need / 2**30:.1f} GiB, and {avail / 2**30:.1f} GiB "
                         f"are available; choose a smaller --hidden or --batch-size")
    with torch.random.fork_rng():
        model = dense_model(config, data)
        if config.model_file is not None:
            load_user_weights(model, config.model_file)
        check_model_fits_data(model, config.arch, data)
        if config.ratio is not None or is_user_arch(config.arch):  # an unreachable ratio, nothing to convert
            tensorize(model, conv_modes=config.conv_modes, **config.settings()[0][1])
    if resume:
        check_resume(out, "compress", ["dense.safetensors"], "compress_config", asdict(config), _effective)
    return None if config.model_file is None else model.state_dict()


def run_compress(config: CompressConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print, data: Dataset | None = None,
                 device: str | torch.device | None = None, user_state: dict[str, torch.Tensor] | None = None) -> dict:
    """Run the whole job into ``out`` on ``device`` (default: the CPU) and return the results (also written to
    ``out/results.json``). ``user_state``: the ``model_file``'s weights as :func:`preflight` read them (else the file
    is read here)."""
    out = Path(out)
    data = load_dataset(config.dataset, config.data_dir) if data is None else data
    log(data.describe())
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    base_meta = {"dataset": data.name, "seed": config.seed, "compress_config": asdict(config)}

    torch.manual_seed(config.seed)
    dense = dense_model(config, data)
    if config.model_file is not None:  # the user's trained model is the starting point: no dense training
        if user_state is None:
            load_user_weights(dense, config.model_file)
        else:
            dense.load_state_dict(user_state)
    cfg = TrainConfig(epochs=0 if config.model_file else config.dense_epochs, batch_size=config.batch_size,
                      lr=config.lr, seed=config.seed, progress=progress, desc="dense")
    dense_seconds = train_stage(dense, data, cfg, out, "dense", {**base_meta, "stage": "dense"}, resume=resume,
                                device=device, log=log)
    _, dense_acc = evaluate(dense, data.x_test, data.y_test)
    dense_params = sum(p.numel() for p in dense.parameters())
    source = f"from {config.model_file}" if config.model_file else f"trained ({dense_seconds:.1f} s)"
    log(f"dense {config.arch}: {dense_params:,} parameters, test accuracy {100 * dense_acc:.2f}%, {source}")
    dense.eval()
    heal = {"teacher": dense, "distill": config.distill, "temperature": config.temperature} if config.distill else {}

    rows: list[CompressRow] = []
    for name, kwargs in config.settings():
        started = time.perf_counter()
        model, report = tensorize(dense, conv_modes=config.conv_modes, **kwargs)
        _, acc_before = evaluate(model, data.x_test, data.y_test)
        cfg = TrainConfig(epochs=config.tune_epochs, batch_size=config.batch_size, lr=config.finetune_lr,
                          seed=config.seed, progress=progress, desc=name)
        seconds = train_stage(model, data, cfg, out, name, {**base_meta, "stage": name, "tensorize": report.to_dict()},
                              resume=resume, device=device, started=started, log=log, **heal)
        log(str(report))
        val_after = evaluate(model, data.x_val, data.y_val)[1]
        _, acc_after = evaluate(model, data.x_test, data.y_test)
        first = report.layers[0] if report.layers else None  # none when every layer stayed dense at this setting
        rows.append(CompressRow(name, first.ranks if first else (), first.weight_ratio if first else 1.0,
                                report.params_after, report.compression_ratio,
                                acc_before, acc_after, val_after, seconds, report.to_dict()["layers"]))
        log(f"{name}: {report.params_after:,} parameters ({report.compression_ratio:.1f}×), test accuracy "
            f"{100 * acc_before:.2f}% after TT-SVD → {100 * acc_after:.2f}% fine-tuned ({seconds:.1f} s)")

    table = results_table(dense_params, dense_acc, dense_seconds, rows)
    results = {"dataset": data.name, "config": asdict(config), "dense": {"params": dense_params, "test_accuracy": dense_acc,
               "seconds": dense_seconds}, "rows": [asdict(r) for r in rows], "table": table}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    from ..plotting import plot_accuracy_vs_compression

    plot_accuracy_vs_compression([r.ratio for r in rows], [r.acc_before for r in rows], [r.acc_after for r in rows],
                                 dense_acc, out / "accuracy_vs_compression.png",
                                 title=f"FC2 on {data.name}: MPO compression", labels=[r.setting for r in rows])
    return results
