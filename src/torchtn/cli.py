"""The ``torchtn`` command line. Bad input prints one line on stderr and exits with status 2, writing nothing."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line instead of usage + message
        raise SystemExit(_fail(f"{self.prog}: {message} (see --help)"))


def _float64():
    import torch

    return torch.float64


def _fail(message: str, status: int = 2) -> int:
    print(f"torchtn: error: {message}", file=sys.stderr)
    return status


def _int_at_least(name: str, minimum: int, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}={text!r} is not an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"{name}={value} is not allowed: expected an integer {allowed}")
        return value
    return parse


def _float_in(name: str, low: float, high: float | None, open_low: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}={text!r} is not a number") from None
        too_low = value <= low if open_low else value < low
        if too_low or (high is not None and value >= high) or not math.isfinite(value):
            allowed = f"in the open interval ({low:g}, {high:g})" if high is not None else f"> {low:g}"
            raise argparse.ArgumentTypeError(f"{name}={text} is not allowed: expected a number {allowed}")
        return value
    return parse


def _build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS

    parser = _Parser(prog="torchtn", description="Tensor networks inside deep neural networks.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    c = sub.add_parser("compress", help="train a dense FC2, tensorize it (TT-SVD), fine-tune, report and plot",
                       description="Train a dense FC2 (input → hidden → classes), tensorize it at a sweep of ranks "
                                   "(default 1,2,4,8,16) or at --rank/--rel-tol/--ratio, fine-tune each, print a "
                                   "table and write models, results.json and a plot into --out.")
    c.add_argument("--dataset", choices=DATASETS, default="digits", help="default: digits (ships with scikit-learn)")
    c.add_argument("--data-dir", type=Path, default=None, help="directory of the dataset's files (mnist, cifar10; "
                                                               "fashion-mnist defaults to the Debian package's)")
    how = c.add_mutually_exclusive_group()
    how.add_argument("--rank", type=_int_at_least("--rank", 1), nargs="+", default=None,
                     help="bond-dimension cap(s) to sweep, e.g. --rank 4 8")
    how.add_argument("--rel-tol", type=_float_in("--rel-tol", 0.0, 1.0), default=None,
                     help="relative Frobenius error bound of each layer's TT-SVD, in (0, 1)")
    how.add_argument("--ratio", type=_float_in("--ratio", 0.0, None), default=None,
                     help="whole-model compression R× (dense parameters / tensorized parameters), R > 0")
    c.add_argument("--epochs", type=_int_at_least("--epochs", 0), default=None,
                   help="dense training epochs (default: 30 on digits, 15 otherwise)")
    c.add_argument("--finetune-epochs", type=_int_at_least("--finetune-epochs", 0), default=None,
                   help="fine-tuning epochs per setting (default: same as --epochs)")
    c.add_argument("--hidden", type=_int_at_least("--hidden", 1, 2**31), default=256)
    c.add_argument("--batch-size", type=_int_at_least("--batch-size", 1), default=128)
    c.add_argument("--lr", type=_float_in("--lr", 0.0, None), default=2e-3, help="dense training learning rate")
    c.add_argument("--finetune-lr", type=_float_in("--finetune-lr", 0.0, None), default=1e-3)
    c.add_argument("--seed", type=_int_at_least("--seed", 0, 2**32 - 1), default=0)
    c.add_argument("--out", type=Path, default=None,
                   help="output directory (default: runs/compress-<dataset>-<time>); an existing non-empty one is "
                        "refused unless --resume")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    i = sub.add_parser("inspect", help="show a model file's tensor-network layers: ranks, entanglement, errors",
                       description="Print, for every tensor-network layer in a torchtn .safetensors file (any "
                                   "registered type), each bond's rank, entanglement entropy and the relative error "
                                   "the next smaller rank would cause.")
    i.add_argument("file", type=Path, help="a .safetensors file written by torchtn")
    i.add_argument("--plot", type=Path, default=None, help="also write a PNG of entropy per bond (refuses to "
                                                            "overwrite an existing file)")
    return parser


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .io import ModelFileError, load_layers, read_metadata
    from .layers import type_name
    from .report import format_table

    if args.plot is not None:
        if args.plot.exists():
            return _fail(f"--plot {args.plot} exists; choose another path")
        parent = args.plot.parent if str(args.plot.parent) else Path(".")
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return _fail(f"--plot {args.plot} cannot be written: {parent} is not a writable directory")
    try:
        meta = read_metadata(args.file)
        layers = load_layers(args.file)  # every layer checked against the file before any number is computed
        networks = {name: layer.tt_matrices() for name, layer in layers.items()}
    except ModelFileError as err:
        return _fail(str(err))
    print(f"{args.file}: {meta.get('model_class')} with {meta.get('num_parameters', 0):,} parameters, "
          f"written by torchtn {meta.get('torchtn_version')} (torch {meta.get('torch_version')})")
    if not layers:
        print("no tensor-network layers")
        return 0
    rows, entropies = [], {}
    for name, nets in networks.items():
        for label, tt in nets.items():
            full = f"{name}.{label}" if label else name
            info = tt.to(dtype=_float64()).bond_report()
            entropies[full] = [b.entropy for b in info]
            for b in info:
                rows.append((full, type_name(layers[name]), f"{tt.out_shape}←{tt.in_shape}",
                             round(tt.compression_ratio, 1),
                             b.bond, b.rank, round(b.entropy, 4), b.next_rank_error))
    print(format_table(["layer", "type", "modes (out←in)", "ratio", "bond", "rank", "entropy S_k", "error at rank−1"],
                       rows))
    print("ratio = dense weight entries / core entries; entropy in nats (ln r for a flat spectrum); "
          "error = ‖W − W'‖/‖W‖ if that bond alone lost one rank")
    if args.plot is not None:
        from .plotting import plot_entanglement

        plot_entanglement(entropies, args.plot, title=f"entanglement of {args.file.name}")
        print(f"wrote {args.plot}")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    import pickle

    from .data import DataFilesMissing, load_dataset
    from .experiments.compress import CompressConfig, preflight, run_compress
    from .io import ModelFileError
    from .train import TrainingDiverged

    try:
        config = CompressConfig(dataset=args.dataset, data_dir=None if args.data_dir is None else str(args.data_dir),
                                hidden=args.hidden, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                                ranks=args.rank, rel_tol=args.rel_tol, ratio=args.ratio, batch_size=args.batch_size,
                                lr=args.lr, finetune_lr=args.finetune_lr, seed=args.seed)
    except ValueError as err:
        return _fail(str(err))
    out = args.out if args.out is not None else Path("runs") / f"compress-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.resume and args.out is None:
        return _fail("--resume needs --out DIR (the directory of the run to continue)")
    if out.exists() and not out.is_dir():
        return _fail(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.resume:
        return _fail(f"--out {out} already holds files: pass --resume to continue that run, or choose another --out")
    try:
        data = load_dataset(config.dataset, config.data_dir)  # before anything is written
        preflight(config, out, args.resume, data)
    except (DataFilesMissing, ValueError, pickle.UnpicklingError) as err:
        return _fail(str(err))
    except OSError as err:
        return _fail(f"{err.filename or 'a file'} cannot be read: {err.strerror or err}")
    except MemoryError:
        return _fail(f"the data of --dataset {config.dataset} does not fit in memory")
    try:
        results = run_compress(config, out, resume=args.resume, progress=not args.no_progress,
                               log=lambda s: print(s, flush=True), data=data)
    except TrainingDiverged as err:
        return _fail(str(err), status=1)
    except ModelFileError as err:
        return _fail(f"{err} — the run in {out} cannot be continued; start a new one with another --out")
    except OSError as err:
        return _fail(f"{err.filename or out} cannot be written: {err.strerror or err}")
    except MemoryError:
        return _fail("out of memory while training; choose a smaller --hidden or --batch-size")
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: torchtn compress --resume --out {out} (and the same options)",
              file=sys.stderr)
        return 130
    print()
    print(results["table"])
    print(f"\nwrote {out}/results.json, {out}/accuracy_vs_compression.png and the models (*.safetensors)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.version:
        from . import __version__

        print(f"torchtn {__version__}")
        return 0
    if args.command == "compress":
        return _cmd_compress(args)
    if args.command == "inspect":
        return _cmd_inspect(args)
    parser.print_usage(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
