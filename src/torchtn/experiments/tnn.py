"""Newman, Horesh, Avron, Kilmer, "Stable tensor neural networks for efficient deep learning" (2024), at CPU scale.

Protocol (spec ``tnn.md``, the reference code's ``mnist_paper*.csv`` / ``autoencoder_paper.csv``): on Fashion-MNIST
(default; MNIST files with ``--dataset mnist --data-dir``), images as 28 features × tubes of 28, M = DCT:

1. classification at ~31k parameters — the t-NN 28→28→10 with the t-cross-entropy head (30,856 parameters) and with
   the flatten + dense head (30,586), against the parameter-matched matrix net 784→39→10 (31,015) and the wide one
   784→784→10 (623,290); training sizes 2k–10k (10 epochs) and the whole training split (20 epochs); the same
   learning-rate search for every model (Adam-style AdamW, weight decay 1e-4, batch 32, constant rate: the best of
   {1e-2, 1e-3} on the validation split at 10k images);
2. autoencoders (MSE) — the t-NN 28→20→10→20→28 against matrix autoencoders, at reduced epochs;
3. a Hamiltonian t-ResNet depth sweep (4 → 64 leapfrog steps): finite losses and gradients, no collapse with depth;
4. transforms — DCT, identity and DFT (flatten + dense head, since the tubal softmax needs a real transform).
"""
from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset
from ..models.tnn import (
    TNN,
    HamiltonianTNN,
    MatrixAutoencoder,
    MatrixNet,
    TAutoencoder,
    count_params,
    matrix_baseline,
    t_cross_entropy,
)
from ..report import format_markdown_table
from ..train import TrainConfig, measure
from .registry import Reproduction, register_reproduction
from .reproduce import Context, mean_std

__all__ = ["TNN_REPRODUCTION"]

FULL = {"seeds": 3, "sizes": (2000, 4000, 6000, 8000, 10000), "size_epochs": 10, "full_epochs": 20,
        "wide_full_seeds": 1, "lrs": (1e-2, 1e-3), "ae_train": None, "ae_epochs": 5,
        "ae_matrix": ((560, 10), (40, 10), (560, 280)), "depths": (4, 8, 16, 32, 64), "depth_train": 10000,
        "depth_epochs": 2, "transforms": ("dct", "identity", "dft"), "transform_train": 10000}
QUICK = {"seeds": 1, "sizes": (2000,), "size_epochs": 2, "full_epochs": 0, "wide_full_seeds": 0, "lrs": (1e-2,),
         "ae_train": 4000, "ae_epochs": 1, "ae_matrix": ((560, 10),), "depths": (4, 16), "depth_train": 2000,
         "depth_epochs": 1, "transforms": ("dct", "dft"), "transform_train": 2000}
BATCH, WEIGHT_DECAY, AE_LR, DEPTH_LR = 32, 1e-4, 1e-3, 1e-3
# The reference code's own settings for every model (spec tnn.md §2.3): Adam with weight decay as an L2 term, one
# rate for all. Run beside the "tuned" protocol (AdamW, each model at its best validation rate).
PAPER_OPTIMIZER, PAPER_LR = "adam", 1e-2
PROTOCOLS = ("paper", "tuned")
MODELS = ("tnn", "matrix", "matrix-wide")
VARIANTS = (("tnn", "tce"), ("tnn", "ce"), ("matrix", "ce"), ("matrix-wide", "ce"))  # (model, loss)


def _classifier(kind: str, loss: str, transform: str = "dct") -> tuple[nn.Module, dict]:
    """The model and the trainer's loss options for (model, loss)."""
    if kind == "tnn":
        model = TNN(head=loss, M=transform)
        return model, ({"loss": t_cross_entropy} if loss == "tce" else {})
    if kind == "matrix":
        return matrix_baseline(TNN(head="tce"), 784, 10), {}
    return MatrixNet(784, (784,), 10), {}


def _cfg(ctx: Context, epochs: int, lr: float, seed: int, tag: str, optimizer: str = "adamw") -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=BATCH, lr=lr, weight_decay=WEIGHT_DECAY, min_lr_fraction=1.0,
                       seed=seed, progress=ctx.progress, desc=tag, optimizer=optimizer)


def _accuracy(model: nn.Module, data: Dataset, split: str = "test") -> float:
    x, y = (data.x_test, data.y_test) if split == "test" else (data.x_val, data.y_val)
    # the scores of either head: argmax is the prediction (the loss value here is not used)
    return measure(model, x, y, F.cross_entropy, {"accuracy": lambda out, t: (out.argmax(1) == t).float().mean()}
                   )["accuracy"]


def _tune(ctx: Context, s: dict) -> dict[tuple[str, str], float]:
    """The learning rate of each (model, loss): the best validation accuracy at 10k images, seed 0 (no search when
    there is one candidate)."""
    if len(s["lrs"]) == 1:
        return {variant: s["lrs"][0] for variant in VARIANTS}
    chosen = {}
    data = ctx.data.first(max(s["sizes"]))
    for kind, loss in VARIANTS:
        scores = {}
        for lr in s["lrs"]:
            torch.manual_seed(0)
            model, kw = _classifier(kind, loss)
            model, _ = ctx.stage(f"tune-{kind}-{loss}-lr{lr:g}", model, _cfg(ctx, s["size_epochs"], lr, 0,
                                                                                 f"tune {kind} {loss} {lr:g}"),
                                 data=data, **kw)
            scores[lr] = _accuracy(model, ctx.data, "val")
        chosen[kind, loss] = max(scores, key=lambda lr: scores[lr])
        ctx.log(f"learning rate for {kind} ({loss}): {chosen[kind, loss]:g} (validation: "
                f"{', '.join(f'{lr:g} → {100 * a:.2f}%' for lr, a in scores.items())})")
    return chosen


def _classification(ctx: Context, s: dict, lrs: dict) -> list[dict]:
    """Every variant at every training size and seed, under both protocols: ``"paper"`` (the reference code's Adam
    with L2 weight decay at one rate for all models) and ``"tuned"`` (AdamW, each model at its own best rate)."""
    rows = []
    runs = [(n, s["size_epochs"]) for n in s["sizes"]] + ([(None, s["full_epochs"])] if s["full_epochs"] else [])
    for protocol, (n, epochs), seed, (kind, loss) in itertools.product(PROTOCOLS, runs, range(s["seeds"]), VARIANTS):
        if n is None and kind == "matrix-wide" and seed >= s["wide_full_seeds"]:
            continue
        data = ctx.data.first(n)
        label = len(data.y_train)
        optimizer = PAPER_OPTIMIZER if protocol == "paper" else "adamw"
        lr = PAPER_LR if protocol == "paper" else lrs[kind, loss]
        torch.manual_seed(seed)
        model, kw = _classifier(kind, loss)
        stage = f"cls-{kind}-{loss}-n{label}-s{seed}" + ("-paper" if protocol == "paper" else "")
        model, secs = ctx.stage(stage, model, _cfg(ctx, epochs, lr, seed, f"{kind} {loss} n={label} ({protocol})",
                                                   optimizer), data=data, **kw)
        acc = _accuracy(model, ctx.data)
        ctx.log(f"{protocol:5s} n_train={label:6d} {kind:11s} {loss:3s} seed {seed}: {100 * acc:.2f}% ({secs:.0f} s)")
        rows.append({"experiment": "classification", "protocol": protocol, "optimizer": optimizer, "model": kind,
                     "loss": loss, "transform": "dct", "n_train": label, "dataset": ctx.data.name, "seed": seed,
                     "params": count_params(model), "test_accuracy": acc, "seconds": secs, "lr": lr,
                     "epochs": epochs})
    return rows


def _autoencoders(ctx: Context, s: dict) -> list[dict]:
    data = ctx.data.first(s["ae_train"])
    ae = replace(data, y_train=data.x_train, y_val=data.x_val, y_test=data.x_test)  # targets: the images
    rows = []
    models = [("tnn", "28-20-10", lambda: TAutoencoder(28, 28, (20, 10)))] + [
        ("matrix", f"784-{a}-{w}", lambda a=a, w=w: MatrixAutoencoder(784, (a, w))) for a, w in s["ae_matrix"]]
    for kind, shape, build in models:
        torch.manual_seed(0)
        model, secs = ctx.stage(f"ae-{kind}-{shape}", build(), _cfg(ctx, s["ae_epochs"], AE_LR, 0, f"AE {shape}"),
                                data=ae, loss="mse")
        mse = measure(model, ae.x_test, ae.y_test, "mse", {})["loss"]
        ctx.log(f"autoencoder {kind} {shape}: test MSE {mse:.4f} ({secs:.0f} s)")
        rows.append({"experiment": "autoencoder", "model": kind, "shape": shape, "loss": "mse", "transform": "dct",
                     "n_train": len(ae.y_train), "dataset": ctx.data.name, "seed": 0, "params": count_params(model),
                     "test_mse": mse, "seconds": secs, "epochs": s["ae_epochs"]})
    return rows


def _grad_norm(model: nn.Module, data: Dataset) -> float:
    """The t-CE gradient's norm over all parameters on the first 256 training examples (on the model's device)."""
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    t_cross_entropy(model(data.x_train[:256].to(device)), data.y_train[:256].to(device)).backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    model.zero_grad(set_to_none=True)
    return float(norm)


def _depth_sweep(ctx: Context, s: dict) -> list[dict]:
    data = ctx.data.first(s["depth_train"])
    rows = []
    for depth in s["depths"]:
        torch.manual_seed(0)
        model = HamiltonianTNN(28, 28, depth, h=0.25)
        first = _grad_norm(model, data)
        model, secs = ctx.stage(f"hamiltonian-d{depth}", model, _cfg(ctx, s["depth_epochs"], DEPTH_LR, 0,
                                                                     f"Hamiltonian depth {depth}"),
                                data=data, loss=t_cross_entropy)
        last = _grad_norm(model, data)
        acc = _accuracy(model, ctx.data)
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        ctx.log(f"Hamiltonian t-ResNet depth {depth}: {100 * acc:.2f}%, gradient norm {first:.3g} → {last:.3g} "
                f"({secs:.0f} s)")
        rows.append({"experiment": "depth", "model": "tnn-hamiltonian", "loss": "tce", "transform": "dct",
                     "depth": depth, "n_train": len(data.y_train), "dataset": ctx.data.name, "seed": 0,
                     "params": count_params(model), "test_accuracy": acc, "seconds": secs,
                     "grad_norm_first": first, "grad_norm_last": last, "finite": finite})
    return rows


def _transforms(ctx: Context, s: dict, lrs: dict) -> list[dict]:
    data = ctx.data.first(s["transform_train"])
    rows = []
    for name in s["transforms"]:
        torch.manual_seed(0)
        model, _ = _classifier("tnn", "ce", name)
        model, secs = ctx.stage(f"transform-{name}", model, _cfg(ctx, s["size_epochs"], lrs["tnn", "ce"], 0,
                                                                 f"t-NN M={name}"), data=data)
        acc = _accuracy(model, ctx.data)
        ctx.log(f"t-NN (flatten + CE) with M = {name}: {100 * acc:.2f}% ({secs:.0f} s)")
        rows.append({"experiment": "transform", "model": "tnn", "loss": "ce", "transform": name,
                     "n_train": len(data.y_train), "dataset": ctx.data.name, "seed": 0, "params": count_params(model),
                     "test_accuracy": acc, "seconds": secs})
    return rows


# The paper's CIFAR-10 experiment (cifar10_paper2.csv): Hamiltonian t-ResNets on 96 features × tubes of 32 (the image
# (3, 32, 32) read as (96, 32)), h = 0.25, tanh, t-CE head, Adam lr 1e-3, 500 epochs, batch 32, against the matrix
# Hamiltonian ResNet of width 3072 (the same layer with tubes of length 1). Needs the CIFAR-10 files and a GPU.
CIFAR_FULL = {"seeds": 1, "depths": (4, 8), "epochs": 500, "train": None}
CIFAR_QUICK = {"seeds": 1, "depths": (4,), "epochs": 1, "train": 2000}
CIFAR_LR = 1e-3


def _cifar(ctx: Context, s: dict) -> list[dict]:
    data = ctx.data.first(s["train"])
    rows = []
    for seed in range(s["seeds"]):
        for depth in s["depths"]:
            for kind, build, kw in (
                    ("tnn-hamiltonian", lambda d: HamiltonianTNN(96, 32, d, h=0.25, head="tce"),
                     {"loss": t_cross_entropy}),
                    ("matrix-hamiltonian", lambda d: HamiltonianTNN(3072, 1, d, h=0.25, head="ce", M="identity"),
                     {})):
                torch.manual_seed(seed)
                model, secs = ctx.stage(f"cifar-{kind}-d{depth}-s{seed}", build(depth),
                                        _cfg(ctx, s["epochs"], CIFAR_LR, seed, f"{kind} depth {depth}"), data=data,
                                        **kw)
                acc = _accuracy(model, ctx.data)
                ctx.log(f"CIFAR-10 {kind} depth {depth} seed {seed}: {100 * acc:.2f}% ({secs:.0f} s)")
                rows.append({"experiment": "cifar", "model": kind, "loss": "tce" if kw else "ce",
                             "transform": "dct" if kw else "identity", "depth": depth, "n_train": len(data.y_train),
                             "dataset": ctx.data.name, "seed": seed, "params": count_params(model),
                             "test_accuracy": acc, "seconds": secs, "epochs": s["epochs"]})
    return rows


def run(ctx: Context) -> list[dict]:
    if ctx.data.name.startswith("cifar"):
        s = dict(CIFAR_QUICK if ctx.config.quick else CIFAR_FULL)
        if ctx.config.seeds is not None:
            s["seeds"] = ctx.config.seeds
        return _cifar(ctx, s)
    s = dict(QUICK if ctx.config.quick else FULL)
    if ctx.config.seeds is not None:
        s["seeds"] = ctx.config.seeds
    started = time.perf_counter()
    lrs = _tune(ctx, s)
    rows = _classification(ctx, s, lrs)
    rows += _autoencoders(ctx, s)
    rows += _depth_sweep(ctx, s)
    rows += _transforms(ctx, s, lrs)
    ctx.timings["tnn"] = time.perf_counter() - started
    return rows


# ---------------------------------------------------------------------------------------------------------- report
def _cls_summary(rows: list[dict]) -> dict:
    """Classification rows by (protocol, n_train, model, loss); rows of files written before the paper protocol
    was added are the tuned protocol's."""
    out = {}
    for r in rows:
        if r["experiment"] == "classification":
            out.setdefault((r.get("protocol", "tuned"), r["n_train"], r["model"], r["loss"]), []).append(r)
    return out


_PROTOCOL_LABEL = {"paper": f"the paper's settings (Adam + L2, lr {PAPER_LR:g} for all)",
                   "tuned": "each model at its best rate (AdamW)"}


def _checks(rows: list[dict]) -> list[tuple]:
    summary = _cls_summary(rows)
    out = []
    for protocol, n in sorted({k[:2] for k in summary}, key=lambda k: (PROTOCOLS.index(k[0]), k[1])):
        def acc(model: str, loss: str) -> float:
            return mean_std([r["test_accuracy"] for r in summary[protocol, n, model, loss]])[0]

        where = f"{_PROTOCOL_LABEL[protocol]}, n_train = {n:,}"
        t_tce, m = acc("tnn", "tce"), acc("matrix", "ce")
        t_best = max(t_tce, acc("tnn", "ce"))
        out.append((f"{where}: t-NN (t-CE, 30,856) ≥ matched matrix net (31,015)",
                    f"{100 * t_tce:.2f} vs {100 * m:.2f}%", "met" if t_tce >= m else "NOT met"))
        if t_best != t_tce:
            out.append((f"{where}: better t-NN head ≥ matched matrix net", f"{100 * t_best:.2f} vs "
                        f"{100 * m:.2f}%", "met" if t_best >= m else "NOT met"))
    depth = [r for r in rows if r["experiment"] == "depth"]
    if depth:
        deepest = max(depth, key=lambda r: r["depth"])
        ok = deepest["finite"] and deepest["grad_norm_last"] < 1e3 and deepest["test_accuracy"] > 0.5
        out.append((f"Hamiltonian t-ResNet trains at depth {deepest['depth']}: finite, no exploding gradients, no "
                    f"collapse", f"{100 * deepest['test_accuracy']:.2f}%, ‖∇‖ {deepest['grad_norm_first']:.3g} → "
                    f"{deepest['grad_norm_last']:.3g}", "met" if ok else "NOT met"))
    return out


def _cifar_report(rows: list[dict], ctx: Context, results: dict) -> str:
    table = format_markdown_table(["model", "depth", "parameters", "epochs", "test accuracy %", "seed", "train s"],
                                  [(r["model"], r["depth"], r["params"], r["epochs"], f"{100 * r['test_accuracy']:.2f}",
                                    r["seed"], f"{r['seconds']:.0f}") for r in rows])
    kind = "quick (CPU-minutes) version" if ctx.config.quick else "full run"
    return f"""# Star-M t-NNs on CIFAR-10 — Hamiltonian t-ResNet vs matrix Hamiltonian ResNet ({kind})

Command: `{results['command']}` · machine: {results['machine']} · versions: {results['versions']} ·
time: {results['seconds'] / 60:.1f} min · dataset: {ctx.data.describe()}.

Protocol (the reference code's `cifar10_paper2.csv`): images as 96 features × tubes of 32, M = DCT, Hamiltonian
t-ResNet (h = 0.25, tanh) + t-CE head, against the matrix Hamiltonian ResNet of width 3072 (tubes of length 1) +
dense head; AdamW lr {CIFAR_LR}, batch {BATCH}, constant rate, {(CIFAR_QUICK if ctx.config.quick else CIFAR_FULL)['epochs']}
epochs. Not included: the paper's Tikhonov and smooth-in-time regularizers (α = 1e-2).

{table}
"""


def report(rows: list[dict], ctx: Context, results: dict) -> str:
    from ..plotting import plot_accuracy_vs_params, plot_lines

    if rows and all(r["experiment"] == "cifar" for r in rows):
        return _cifar_report(rows, ctx, results)

    summary = _cls_summary(rows)
    cls_rows = []
    for (protocol, n, kind, loss), sel in sorted(summary.items(), key=lambda kv: (
            PROTOCOLS.index(kv[0][0]), kv[0][1], MODELS.index(kv[0][2]), kv[0][3])):
        mean, std = mean_std([r["test_accuracy"] for r in sel])
        cls_rows.append((protocol, f"{n:,}", kind, loss, sel[0]["params"], sel[0].get("optimizer", "adamw"),
                         f"{sel[0]['lr']:g}", sel[0]["epochs"], f"{100 * mean:.2f} ± {100 * std:.2f}", len(sel),
                         f"{statistics.mean(r['seconds'] for r in sel):.0f}"))
    cls = format_markdown_table(["protocol", "n_train", "model", "loss", "parameters", "optimizer", "lr", "epochs",
                                 "test accuracy % (mean ± std)", "seeds", "train s"], cls_rows)
    ae = format_markdown_table(["autoencoder", "shape", "parameters", "test MSE", "train s"],
                               [(r["model"], r["shape"], r["params"], f"{r['test_mse']:.4f}", f"{r['seconds']:.0f}")
                                for r in rows if r["experiment"] == "autoencoder"])
    depth = format_markdown_table(["depth", "parameters", "test accuracy %", "‖∇‖ at init", "‖∇‖ after training",
                                   "all finite", "train s"],
                                  [(r["depth"], r["params"], f"{100 * r['test_accuracy']:.2f}",
                                    f"{r['grad_norm_first']:.3g}", f"{r['grad_norm_last']:.3g}", r["finite"],
                                    f"{r['seconds']:.0f}") for r in rows if r["experiment"] == "depth"])
    trans = format_markdown_table(["M", "parameters", "test accuracy %", "train s"],
                                  [(r["transform"], r["params"], f"{100 * r['test_accuracy']:.2f}",
                                    f"{r['seconds']:.0f}") for r in rows if r["experiment"] == "transform"])
    checks = format_markdown_table(["claim (issue's yardstick)", "ours", "status"], _checks(rows))
    largest = max((k[1] for k in summary), default=None)
    if largest is not None:
        plot_accuracy_vs_params(
            {f"{protocol}, n_train {largest:,}": [
                (sel[0]["params"], mean_std([r["test_accuracy"] for r in sel])[0], f"{kind} {loss}")
                for (p, n, kind, loss), sel in summary.items() if n == largest and p == protocol]
             for protocol in PROTOCOLS if any(k[0] == protocol for k in summary)},
            ctx.out / "accuracy_vs_parameters.png", title=f"t-NN vs matrix nets on {ctx.data.name}")
    deep = [r for r in rows if r["experiment"] == "depth"]
    if deep:
        plot_lines({"test accuracy": [(r["depth"], r["test_accuracy"]) for r in deep]}, ctx.out / "depth_accuracy.png",
                   title="Hamiltonian t-ResNet: accuracy vs depth", xlabel="depth (leapfrog steps)",
                   ylabel="test accuracy", logx=True)
        plot_lines({"at initialization": [(r["depth"], r["grad_norm_first"]) for r in deep],
                    "after training": [(r["depth"], r["grad_norm_last"]) for r in deep]},
                   ctx.out / "depth_gradients.png", title="Hamiltonian t-ResNet: gradient norm vs depth",
                   xlabel="depth (leapfrog steps)", ylabel="‖∇θ L‖ (256 images)", logx=True, logy=True)
    kind = "quick (CPU-minutes) version" if ctx.config.quick else "full run"
    s = QUICK if ctx.config.quick else FULL
    return f"""# Star-M t-NNs — Newman, Horesh, Avron, Kilmer 2024 ({kind})

Command: `{results['command']}` · machine: {results['machine']} · versions: {results['versions']} ·
time: {results['seconds'] / 60:.1f} min · dataset: {ctx.data.describe()}.

Protocol: the reference code's MNIST configuration (spec `tnn.md` §2.3) run on this dataset: images as 28 features ×
tubes of 28, M = orthonormal DCT-II, tanh, batch {BATCH}, weight decay {WEIGHT_DECAY}, a constant learning rate;
training sizes {s['sizes']} for {s['size_epochs']} epochs and the whole training split for {s['full_epochs']} epochs;
{s['seeds']} seeds (the wide net on the whole split: {s['wide_full_seeds']}). Every classifier is trained twice:
**paper** — the reference code's own settings, Adam with the weight decay as an L2 term and lr {PAPER_LR:g} for
every model; **tuned** — AdamW, each model at the rate of its best validation accuracy at 10k images, seed 0 (search
over {s['lrs']}), so that no model is judged at a rate that suits another. The paper's own accuracy tables could not
be retrieved (spec: unverified); its claim is the ordering — t-NN ≥ the parameter-matched matrix net.

## Against the yardsticks

{checks}

## Classification

{cls}

![accuracy vs parameters](accuracy_vs_parameters.png)

## Autoencoders (MSE on standardized pixels, {s['ae_epochs']} epochs, lr {AE_LR}; the paper: 200 epochs)

{ae}

## Hamiltonian t-ResNet depth sweep (h = 0.25, width 28, t-CE, lr {DEPTH_LR}, {s['depth_epochs']} epochs on {s['depth_train']:,} images)

{depth}

![accuracy vs depth](depth_accuracy.png)
![gradient norm vs depth](depth_gradients.png)

## Transforms (t-NN 28→28, flatten + dense head: the tubal softmax needs a real transform)

{trans}

The CIFAR-10 part of the paper (Hamiltonian t-ResNets of depth 4 and 8 on 96×32 tubes against the width-3072 matrix
Hamiltonian ResNet, 500 epochs) is one command that needs the CIFAR-10 files and a GPU:
`torchtn reproduce tnn --dataset cifar10 --data-dir DIR --device cuda`; it is not reproduced here.
"""


TNN_REPRODUCTION = register_reproduction(Reproduction("tnn", "Newman et al. 2024: star-M t-NNs and stable t-NNs",
                                                      ("fashion-mnist", "mnist", "cifar10"), "fashion-mnist", run,
                                                      report))
