"""Plots (matplotlib, imported lazily, Agg backend: works without a screen)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_accuracy_vs_compression", "plot_entanglement", "plot_accuracy_vs_params", "plot_scaling",
           "plot_lines"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    """Write the figure atomically (:func:`torchtn.io.atomic_write`; the format from the suffix, PNG without one) and
    close it."""
    from .io import atomic_write

    plt = _pyplot()
    path = Path(path)
    fig.tight_layout()
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format=path.suffix[1:].lower() or "png"))
    finally:
        plt.close(fig)
    return path


def plot_accuracy_vs_compression(ratios: Sequence[float], acc_before: Sequence[float], acc_after: Sequence[float],
                                 dense_accuracy: float, path: str | os.PathLike, title: str = "",
                                 labels: Sequence[str] | None = None, before: str = "MPO, TT-SVD only",
                                 after: str = "MPO, fine-tuned") -> Path:
    """Test accuracy (%) against compression ratio (dense/tensorized, log axis), before and after fine-tuning
    (``before`` / ``after``: the two curves' legend entries)."""
    plt = _pyplot()
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    xs = [ratios[i] for i in order]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.axhline(100 * dense_accuracy, color="0.3", ls="--", lw=1, label=f"dense ({100 * dense_accuracy:.2f}%)")
    ax.plot(xs, [100 * acc_before[i] for i in order], "o-", color="tab:orange", label=before)
    ax.plot(xs, [100 * acc_after[i] for i in order], "s-", color="tab:blue", label=after)
    if labels is not None:
        for i in order:
            ax.annotate(labels[i], (ratios[i], 100 * acc_after[i]), textcoords="offset points", xytext=(4, 5),
                        fontsize=8)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sorted(set(round(x, 1) for x in xs)))
    ax.set_xlabel("compression ratio (dense parameters / tensorized parameters)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_entanglement(layers: dict[str, Sequence[float]], path: str | os.PathLike, title: str = "") -> Path:
    """Entanglement entropy per bond (x: bond index) for each named layer, one line per layer."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, entropies in layers.items():
        ax.plot(range(1, len(entropies) + 1), list(entropies), "o-", label=name)
    ax.set_xlabel("bond k (cut between sites ≤ k and > k)")
    ax.set_ylabel("entanglement entropy S_k (nats)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy_vs_params(series: dict[str, Sequence[tuple[float, float, str]]], path: str | os.PathLike,
                            title: str = "", xlabel: str = "trainable parameters (whole model)") -> Path:
    """Test accuracy (%) against parameters (log axis; ``xlabel`` says which are counted): one marker series per
    model, points labelled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 4.4), dpi=120)
    for name, points in series.items():
        if not points:
            continue
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], "o", label=name)
        for params, acc, label in points:
            ax.annotate(label, (params, 100 * acc), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    # labels at 1, 2, 5 × 10^k as plain counts (matplotlib's own labels every minor tick of a short range: they overlap)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v < 10_000 else f"{v / 1000:,.0f}k"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_lines(series: dict[str, Sequence[tuple[float, float]]], path: str | os.PathLike, *, title: str = "",
               xlabel: str = "", ylabel: str = "", logx: bool = False, logy: bool = False,
               guides: Sequence[int] = ()) -> Path:
    """``{name: [(x, y), …]}`` as lines with markers; ``guides``: grey slope lines ``∝ x^p`` (log-log plots)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=name)
    all_x = sorted({x for pts in series.values() for x, _ in pts})
    if all_x and guides:
        ref = min(y for pts in series.values() for _, y in pts)
        for power in guides:
            ax.plot(all_x, [ref * (x / all_x[0]) ** power for x in all_x], ":" if power == 1 else "--",
                    color="grey", linewidth=0.8, label=f"∝ n^{power}")
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_metric_history(history: Sequence[dict], metric: str, path: str | os.PathLike, *, title: str = "",
                        xlabel: str = "epoch", ylabel: str = "", scale: float = 1.0) -> Path | None:
    """One validation metric of a trainer's records (``EpochRecord`` as dicts) against the epoch or round, times
    ``scale``; nothing (``None``) when no record holds it."""
    points = [(h["epoch"], scale * h["metrics"][metric]) for h in history if metric in h.get("metrics", {})]
    if not points:
        return None
    return plot_lines({f"validation {metric}": points}, path, title=title, xlabel=xlabel, ylabel=ylabel)


def plot_scaling(series: dict[str, Sequence[tuple[float, float]]], path: str | os.PathLike, title: str = "",
                 ylabel: str = "seconds") -> Path:
    """``{name: [(n, value), …]}`` on log-log axes (e.g. time against sequence length), with slope guides n and n²."""
    return plot_lines(series, path, title=title, xlabel="sequence length n", ylabel=ylabel, logx=True, logy=True,
                      guides=(1, 2))


def plot_sweep_history(history: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Sweep training's record (:attr:`Sweeper.history`) against the training step: entanglement entropy, bond
    dimension and truncation error of every bond (one line per layer and bond; three stacked panels)."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(6.8, 8.0), dpi=120, sharex=True)
    series: dict[tuple[str, int], list[dict]] = {}
    for record in history:
        for b in range(len(record["ranks"])):
            series.setdefault((record["layer"], b + 1), []).append(
                {"step": record["step"], "entropy": record["entropy"][b], "rank": record["ranks"][b],
                 "error": record["truncation_error"][b]})
    for (layer, bond), points in series.items():
        steps = [p["step"] for p in points]
        label = f"{layer} bond {bond}"
        axes[0].plot(steps, [p["entropy"] for p in points], label=label)
        axes[1].step(steps, [p["rank"] for p in points], where="post", label=label)
        axes[2].plot(steps, [max(p["error"], 1e-16) for p in points], label=label)
    axes[0].set_ylabel("entropy S_k (nats)")
    axes[1].set_ylabel("bond dimension")
    axes[2].set_ylabel("truncation error")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("training step")
    axes[0].set_title(title)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    return _save(fig, path)
