"""`torchtn inspect FILE`: a model file's tensor-network layers, their ranks, entanglement and errors."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .flow import fail


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..io import ModelFileError, load_layers, read_metadata
    from ..summary import layer_tables

    if args.plot is not None:
        if args.plot.exists():
            return fail(f"--plot {args.plot} exists; choose another path")
        parent = args.plot.parent if str(args.plot.parent) else Path(".")
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return fail(f"--plot {args.plot} cannot be written: {parent} is not a writable directory")
    if args.file.is_dir():
        # a saved Hugging Face model or train's --out; compress --hf-model's --out keeps the model in model/
        names = ("torchtn.safetensors", "model.safetensors", "model/torchtn.safetensors")
        found = [args.file / n for n in names if (args.file / n).is_file()]
        if not found:
            others = sorted(p.name for p in args.file.glob("*.safetensors"))
            return fail(f"{args.file} is a directory with no {', '.join(names[:-1])} or {names[-1]}"
                         + (f"; name one of its files: {', '.join(others[:8])}" if others else ""))
        args.file = found[0]
    try:
        meta = read_metadata(args.file)
        layers = load_layers(args.file)  # every layer checked against the file before any number is computed
        blocks, entropies = layer_tables(layers)
    except ModelFileError as err:
        return fail(str(err))
    print(f"{args.file}: {meta.get('model_class')} with {meta.get('num_parameters', 0):,} parameters, "
          f"written by torchtn {meta.get('torchtn_version')} (torch {meta.get('torch_version')})")
    print("\n".join(blocks))
    no_plot = (f"--plot: nothing written to {args.plot} — no layer of this file has a bond (the plot shows "
               f"entanglement per bond of MPO layers with two or more cores)") if args.plot is not None else None
    sweep = meta.get("metadata", {}).get("sweep") if isinstance(meta.get("metadata"), dict) else None
    if sweep and sweep.get("history"):
        _print_sweep_history(sweep["history"])
    if args.plot is not None and not entropies:
        print(no_plot, file=sys.stderr)
    elif args.plot is not None:
        from ..plotting import plot_entanglement, plot_sweep_history

        plot_entanglement(entropies, args.plot, title=f"entanglement of {args.file.name}")
        print(f"wrote {args.plot}")
        if sweep and sweep.get("history"):
            history_plot = args.plot.with_name(f"{args.plot.stem}-sweeps{args.plot.suffix}")
            if history_plot.exists():
                return fail(f"{history_plot} exists; choose another --plot path")
            plot_sweep_history(sweep["history"], history_plot, title=f"sweep training of {args.file.name}")
            print(f"wrote {history_plot}")
    return 0


def _print_sweep_history(history: list[dict]) -> None:
    """The sweep-training record of a model file: per layer and bond, the first and last sweep and the extremes."""
    from ..report import format_table

    rows = []
    for layer in dict.fromkeys(r["layer"] for r in history):
        records = [r for r in history if r["layer"] == layer]
        for b in range(len(records[-1]["ranks"])):
            ranks = [r["ranks"][b] for r in records]
            entropy = [r["entropy"][b] for r in records]
            rows.append((layer, b + 1, f"{ranks[0]} → {ranks[-1]}", min(ranks), max(ranks),
                         f"{entropy[0]:.3f} → {entropy[-1]:.3f}", max(r["truncation_error"][b] for r in records)))
    print(f"sweep training: {len(history)} records (steps {history[0]['step']}–{history[-1]['step']})")
    print(format_table(["layer", "bond", "rank first → last", "min rank", "max rank", "entropy first → last",
                        "max truncation error"], rows))
