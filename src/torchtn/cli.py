"""The ``torchtn`` command line. Bad input prints one line on stderr and exits with status 2, writing nothing."""
from __future__ import annotations

import argparse
import json
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


def _rows_or_fraction(text: str) -> int | float:
    """``--exact-rows``: a fraction in (0, 1), a number of rows >= 1, or 0 (none)."""
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--exact-rows={text!r} is not a number") from None
    if value == 0:
        return 0
    if (isinstance(value, float) and not 0 < value < 1) or (isinstance(value, int) and value < 1):
        raise argparse.ArgumentTypeError(f"--exact-rows={text} is not allowed: expected a fraction of the tokens in "
                                         f"(0, 1), a number of rows >= 1, or 0 for none")
    return value


def _arch(text: str) -> str:
    """``--arch``: a zoo name, or the user's own architecture as ``FILE.py:NAME`` / ``package.module:NAME``
    (imported when the job starts)."""
    from .models import MODELS
    from .models.user import is_user_arch

    if text in MODELS or is_user_arch(text):
        return text
    raise argparse.ArgumentTypeError(f"--arch={text!r} is not allowed: expected one of {', '.join(sorted(MODELS))}, "
                                     f"or your own as FILE.py:NAME or package.module:NAME")


def _json_kwargs(text: str) -> dict:
    """``--arch-args``: a JSON object of keyword arguments."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--arch-args={text!r} is not JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--arch-args={text!r} is not allowed: expected a JSON object of keyword "
                                         f"arguments, e.g. '{{\"width\": 32}}'")
    return value


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


def _float_in(name: str, low: float, high: float | None, open_low: bool = True, open_high: bool = True):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}={text!r} is not a number") from None
        too_low = value <= low if open_low else value < low
        too_high = high is not None and (value >= high if open_high else value > high)
        if too_low or too_high or not math.isfinite(value):
            if high is None:
                allowed = f"> {low:g}" if open_low else f">= {low:g}"
            else:
                allowed = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
            raise argparse.ArgumentTypeError(f"{name}={text} is not allowed: expected a number {allowed}")
        return value
    return parse


def _add_run_options(p: argparse.ArgumentParser, job: str, epochs_help: str, lr: float) -> None:
    """The options every training job shares: data, schedule, seed, output directory and resume."""
    from .data import DATASETS

    p.add_argument("--dataset", choices=DATASETS, default="digits", help="default: digits (ships with scikit-learn)")
    p.add_argument("--data-dir", type=Path, default=None, help="directory of the dataset's files (mnist, cifar10, cifar100; "
                                                               "fashion-mnist defaults to the Debian package's)")
    p.add_argument("--epochs", type=_int_at_least("--epochs", 0), default=None, help=epochs_help)
    p.add_argument("--batch-size", type=_int_at_least("--batch-size", 1), default=128,
                   help="rows per optimizer step (the global batch, split across processes under torchrun)")
    p.add_argument("--lr", type=_float_in("--lr", 0.0, None), default=lr, help="learning rate")
    p.add_argument("--seed", type=_int_at_least("--seed", 0, 2**32 - 1), default=0)
    p.add_argument("--out", type=Path, default=None,
                   help=f"output directory (default: runs/{job}-<dataset>-<time>); an existing non-empty one is "
                        f"refused unless --resume")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_device_option(p)


def _add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (a CUDA GPU when PyTorch sees one for each process on the node, else the CPU), cpu, "
                        "cuda or cuda:N; under torchrun 'cuda' is each process's own GPU (LOCAL_RANK) and the "
                        "processes talk over NCCL")


def _add_unitary_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unitary", action="store_true",
                   help="ADTN gates held orthogonal (each the polar factor of a latent 4x4 matrix; --method/--layers "
                        "adtn)")


def _add_arch_options(p: argparse.ArgumentParser, what: str, own: str) -> None:
    """``--arch`` (a zoo name or the user's own ``FILE.py:NAME``) and ``--arch-args``; ``own``: what else the job
    does with the user's architecture."""
    from .models import MODELS

    p.add_argument("--arch", type=_arch, default="fc2", metavar="NAME",
                   help=f"{what}: one of the zoo ({', '.join(sorted(MODELS))}; default fc2) or your own nn.Module as "
                        f"FILE.py:NAME or package.module:NAME (a class or a function returning it; its code runs, as "
                        f"`python FILE.py` would: name only code you trust{own})")
    p.add_argument("--arch-args", type=_json_kwargs, default=None, metavar="JSON",
                   help="keyword arguments of your own --arch, as a JSON object, e.g. '{\"width\": 32}'")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="torchtn", description="Tensor networks inside deep neural networks.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    c = sub.add_parser("compress", help="compress a model into MPO layers (TT-SVD) or ADTNs, heal it, report and "
                                        "plot",
                       description="Compress a model into MPO layers and heal it: a trained model file (--model-file "
                                   "with a zoo --arch or your own FILE.py:NAME), a Hugging Face folder (--hf-model), "
                                   "or by default a dense FC2 (input → hidden → classes) trained here. Tensorizes at "
                                   "a sweep of ranks (default 1,2,4,8,16) or at --rank/--rel-tol/--ratio — or, with "
                                   "--method adtn, generates every weight by an ADTN fitted to it at a sweep of "
                                   "--depth (default 1,2,4) — fine-tunes each, prints a table and writes models, "
                                   "results.json and a plot into --out.")
    _add_run_options(c, "compress", "dense training epochs (default: 30 on digits, 15 otherwise)", 2e-3)
    how = c.add_mutually_exclusive_group()
    how.add_argument("--rank", type=_int_at_least("--rank", 1), nargs="+", default=None,
                     help="bond-dimension cap(s) to sweep, e.g. --rank 4 8")
    how.add_argument("--rel-tol", type=_float_in("--rel-tol", 0.0, 1.0), default=None,
                     help="relative Frobenius error bound of each layer's TT-SVD, in (0, 1)")
    how.add_argument("--ratio", type=_float_in("--ratio", 0.0, None), default=None,
                     help="whole-model compression R× (dense parameters / tensorized parameters), R > 0")
    c.add_argument("--method", choices=("mpo", "adtn"), default="mpo",
                   help="mpo: MPO layers by TT-SVD (default); adtn: each Linear/Conv2d weight generated by a deep "
                        "tensor network of 2x2x2x2 gates fitted to it (Qing et al.), then healed")
    c.add_argument("--depth", type=_int_at_least("--depth", 1), nargs="+", default=None,
                   help="with --method adtn: brick layers of the ADTNs to sweep, e.g. --depth 2 4 (default 1 2 4)")
    c.add_argument("--fit-steps", type=_int_at_least("--fit-steps", 0), default=500,
                   help="with --method adtn: Adam steps fitting each ADTN to its dense weight (default 500)")
    _add_unitary_option(c)
    c.add_argument("--finetune-epochs", type=_int_at_least("--finetune-epochs", 0), default=None,
                   help="fine-tuning epochs per setting (default: same as --epochs)")
    c.add_argument("--hidden", type=_int_at_least("--hidden", 1, 2**31), default=256)
    c.add_argument("--finetune-lr", type=_float_in("--finetune-lr", 0.0, None), default=None,
                   help="learning rate of fine-tuning / healing (default 1e-3; 1e-2 with --method adtn; 1e-4 with "
                        "--hf-model)")
    c.add_argument("--model-file", type=Path, default=None,
                   help="compress this trained model instead of training one: a torchtn or plain safetensors file, "
                        "or a .pt/.pth state dict (read with weights_only=True; never an arbitrary pickle)")
    _add_arch_options(c, "architecture of the dense model", "")
    c.add_argument("--distill", type=_float_in("--distill", 0.0, 1.0, open_low=False), default=0.0,
                   help="healing: weight of knowledge distillation from the dense model, in [0, 1) (default 0)")
    c.add_argument("--conv-modes", choices=("matrix", "kernel"), default="matrix",
                   help="convolutions as an MPO of the im2col matrix (default) or as the TT of the 4-D kernel over "
                        "(C_in, kh, kw, C_out), which runs as four small convolutions")
    c.add_argument("--temperature", type=_float_in("--temperature", 0.0, None), default=2.0,
                   help="healing: distillation temperature (default 2)")
    hfg = c.add_argument_group("a pretrained transformer (pip install 'torchtn[hf]')")
    hfg.add_argument("--hf-model", type=Path, default=None,
                     help="compress this local Hugging Face model folder instead (with --ratio/--rank/--rel-tol and "
                          "--corpus): MPO layers for attention, MLP and embeddings, healed by distillation")
    hfg.add_argument("--corpus", type=Path, default=None,
                     help="plain text, one passage per line: healing data and held-out evaluation lines")
    hfg.add_argument("--heal-minutes", type=_float_in("--heal-minutes", 0.0, None, open_low=False), default=10.0,
                     help="healing time budget in minutes (default 10; 0: no healing)")
    hfg.add_argument("--parts", nargs="+", choices=("attention", "mlp", "embeddings"),
                     default=["attention", "mlp", "embeddings"], help="which parts become MPOs (default: all three)")
    hfg.add_argument("--keep-dense", nargs="+", default=[], metavar="PATTERN",
                     help="module-name glob patterns to keep dense, e.g. '*position_embeddings'")
    hfg.add_argument("--hidden-states", action="store_true",
                     help="heal on every token's hidden state too, not only the pooled sentence embedding")
    fraction = _float_in("--min-lr-fraction", 0.0, 1.0, open_low=False, open_high=False)
    hfg.add_argument("--min-lr-fraction", type=fraction, default=None, metavar="F",
                     help="healing rate down a cosine to --finetune-lr × F by the end of the time budget (default 0.1; "
                          "1: constant)")
    hfg.add_argument("--augment", action="store_true",
                     help="heal on a fresh random crop of each passage with 10%% of its tokens dropped, the teacher "
                          "run beside the student (steps cost about a sixth more; against memorizing a small corpus)")
    hfg.add_argument("--hf-head", action="store_true",
                     help="load the task class the model's config names (e.g. ...ForSequenceClassification) with its "
                          "head, heal on its logits (distillation at --temperature) and report top-class agreement")
    hfg.add_argument("--calibrate", type=_int_at_least("--calibrate", 0), default=None, metavar="N",
                     help="truncate every layer in the norm of its output error on N healing passages (data-aware "
                          "low-rank; default 256; 0: plain TT-SVD of the weights)")
    hfg.add_argument("--probes", type=_int_at_least("--probes", 0), default=None, metavar="P",
                     help="with --calibrate: also weigh every layer's outputs by how much they move the sentence "
                          "embedding (or the head's log-probabilities), from P random projections per batch, so the "
                          "truncation minimizes the error that reaches the model's output (default 4; 0: the layers' "
                          "own output errors)")
    hfg.add_argument("--exact-rows", type=_rows_or_fraction, default=None, metavar="X",
                     help="with --calibrate: the token table keeps the rows of its most frequent tokens exact beside "
                          "the MPO of the others — as many as cover the fraction X of the corpus's tokens, or X rows "
                          "(default 0.8; 0: none)")
    hfg.add_argument("--allocation", choices=("absolute", "relative"), default=None,
                     help="how --ratio's budget is shared: least total error or equal relative errors (default: "
                          "relative when calibrated with --probes 0, else absolute)")

    t = sub.add_parser("train", help="train a zoo model or your own, dense or with MPO or ADTN layers (torchrun: many "
                                     "processes)",
                       description="Train a model of the zoo or your own with the shared trainer and write the model, "
                                   "its checkpoint and results.json into --out. Runs data-parallel unchanged under "
                                   "torchrun (e.g. torchrun --nproc_per_node 2 -m torchtn train ...).")
    _add_run_options(t, "train", "training epochs (default 10)", 1e-3)
    _add_arch_options(t, "the model", "; with --layers mpo its Linear, Conv2d and Embedding layers become MPOs at "
                                      "--rank, with --layers adtn its Linear and Conv2d layers fresh ADTNs of --depth")
    t.add_argument("--layers", choices=("dense", "mpo", "adtn"), default="dense",
                   help="dense layers, the architecture's MPO layers, or ADTN layers (fc2, lenet5, alexnet, vgg16, "
                        "zfnet: the big fully connected maps; your own architecture: every Linear and Conv2d) "
                        "(default dense)")
    t.add_argument("--rank", type=_int_at_least("--rank", 1), default=4, help="MPO bond dimension (default 4)")
    t.add_argument("--depth", type=_int_at_least("--depth", 1), default=2,
                   help="brick layers of each ADTN, with --layers adtn (default 2)")
    _add_unitary_option(t)
    t.add_argument("--optimizer", choices=("adamw", "sgd", "sweep"), default="adamw",
                   help="sweep: DMRG-style sweeps train the MPO layers (adaptive bonds), AdamW the rest")
    sw = t.add_argument_group("sweep training (--optimizer sweep)")
    sw.add_argument("--max-rank", type=_int_at_least("--max-rank", 1), default=16,
                    help="bond-dimension cap of the sweep (default 16)")
    sw.add_argument("--cutoff", type=_float_in("--cutoff", 0.0, 1.0, open_low=False), default=0.0,
                    help="drop singular values below cutoff·s_1 at every split (default 0: keep up to --max-rank)")
    sw.add_argument("--sweep-lr", type=_float_in("--sweep-lr", 0.0, None), default=0.05,
                    help="step size of the local updates (default 0.05; follows the --lr schedule)")
    sw.add_argument("--sweep-schedule", choices=("batch", "bond", "epoch"), default="batch",
                    help="a full sweep every batch (default), one bond per batch, or one sweep per epoch")

    r = sub.add_parser("reproduce", help="run a paper reproduction (results.json, report.md, plots)",
                       description="Run one registered paper reproduction into --out: results.json (one row per "
                                   "trained model and seed), report.md with the tables and the paper's numbers "
                                   "beside ours, and the plots. --quick is the CPU-minutes version of the same "
                                   "protocol (fewer epochs and seeds).")
    from .experiments.registry import reproductions

    r.add_argument("name", help=f"the reproduction ({', '.join(sorted(reproductions()))})")
    r.add_argument("--quick", action="store_true", help="fewer epochs and seeds: minutes on a CPU")
    r.add_argument("--dataset", default=None, help="dataset (default: the reproduction's)")
    r.add_argument("--data-dir", type=Path, default=None, help="directory of the dataset's files (mnist: the four "
                                                               "IDX files)")
    r.add_argument("--seeds", type=_int_at_least("--seeds", 1, 100), default=None, help="number of seeds")
    r.add_argument("--out", type=Path, default=None, help="output directory (default: runs/reproduce-<name>-<time>)")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_device_option(r)

    i = sub.add_parser("inspect", help="show a model file's tensor-network layers: ranks, entanglement, errors",
                       description="Print, for every tensor-network layer in a torchtn .safetensors file (any "
                                   "registered type), each bond's rank, entanglement entropy and the relative error "
                                   "the next smaller rank would cause.")
    i.add_argument("file", type=Path, help="a .safetensors file written by torchtn, or a directory holding one "
                                           "(compress --hf-model's model/, train's --out)")
    i.add_argument("--plot", type=Path, default=None, help="also write a PNG of entropy per bond (refuses to "
                                                            "overwrite an existing file)")
    parser.commands = dict(sub.choices)  # each command's parser (which options a command line gave: _given)
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
    if args.file.is_dir():
        found = [args.file / n for n in ("torchtn.safetensors", "model.safetensors") if (args.file / n).is_file()]
        if not found:
            others = sorted(p.name for p in args.file.glob("*.safetensors"))
            return _fail(f"{args.file} is a directory with no torchtn.safetensors or model.safetensors"
                         + (f"; name one of its files: {', '.join(others[:8])}" if others else ""))
        args.file = found[0]
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
    plain = [(name, type_name(layer), ", ".join(f"{k}={v}" for k, v in layer.layout().items()),
              sum(p.numel() for p in layer.parameters()), _counted(layer))
             for name, layer in layers.items() if not networks[name]]
    if plain:  # registered layers without tensor-train bonds (t-product layers, ADTNs, …): what they are
        counted = any(row[-1] for row in plain)
        print(format_table(["layer", "type", "layout", "parameters", *(["what is counted"] if counted else [])],
                           [row if counted else row[:-1] for row in plain]))
        if len(plain) == len(layers):
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
    sweep = meta.get("metadata", {}).get("sweep") if isinstance(meta.get("metadata"), dict) else None
    if sweep and sweep.get("history"):
        _print_sweep_history(sweep["history"])
    if args.plot is not None:
        from .plotting import plot_entanglement, plot_sweep_history

        plot_entanglement(entropies, args.plot, title=f"entanglement of {args.file.name}")
        print(f"wrote {args.plot}")
        if sweep and sweep.get("history"):
            history_plot = args.plot.with_name(f"{args.plot.stem}-sweeps{args.plot.suffix}")
            if history_plot.exists():
                return _fail(f"{history_plot} exists; choose another --plot path")
            plot_sweep_history(sweep["history"], history_plot, title=f"sweep training of {args.file.name}")
            print(f"wrote {history_plot}")
    return 0


def _counted(layer) -> str:
    """A layer's parameter accounting, for layers that state it (ADTNs: gates + scale + bias, against the dense
    entries they replace); empty otherwise."""
    report = getattr(layer, "param_report", None)
    if not report:
        return ""
    parts = [f"{report[k]:,} {k}" for k in ("gates", "scale", "bias") if report.get(k)]
    return f"{' + '.join(parts)} (for {report['dense_weight']:,} dense weights)"


def _print_sweep_history(history: list[dict]) -> None:
    """The sweep-training record of a model file: per layer and bond, the first and last sweep and the extremes."""
    from .report import format_table

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


def _device(args: argparse.Namespace):
    from .train.device import resolve_device

    return resolve_device(args.device, name="--device")


def _elastic_restart() -> bool:
    """Whether torchrun restarted this worker group after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def _run_job(job: str, args: argparse.Namespace, make_config, prepare, run) -> int:
    """The flow every training job shares: settings, output directory, data and checks before anything is written,
    then the run, with every failure turned into one line (exit 2; 1 for a diverged run; 130 when interrupted).

    ``make_config()`` builds the validated settings; ``prepare(config, data, out)`` makes the job's own checks;
    ``run(config, data, out)`` runs it and returns what to print.
    """
    import pickle

    from .data import DataFilesMissing, load_dataset
    from .io import ModelFileError
    from .train import TrainingDiverged

    if args.resume and args.out is not None:
        _adopt_recorded(job, args)
    try:
        args.device = str(_device(args))
        config = make_config()
    except ValueError as err:
        return _fail(str(err))
    out = args.out if args.out is not None else Path("runs") / f"{job}-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.resume and args.out is None:
        return _fail("--resume needs --out DIR (the directory of the run to continue)")
    if out.exists() and not out.is_dir():
        return _fail(f"--out {out} exists and is not a directory")
    if _elastic_restart() and args.out is not None:
        # torchrun restarted the workers after a failure: continue our own run if it got as far as a checkpoint
        args.resume = any(out.glob("*.safetensors")) or any((out / "checkpoints").glob("*.safetensors"))
    elif out.is_dir() and any(out.iterdir()) and not args.resume:
        return _fail(f"--out {out} already holds files: pass --resume to continue that run, or choose another --out")
    try:
        data = load_dataset(args.dataset, None if args.data_dir is None else str(args.data_dir))
        prepare(config, data, out)
    except (DataFilesMissing, ValueError, pickle.UnpicklingError) as err:
        return _fail(str(err))
    except OSError as err:
        return _fail(f"{err.filename or 'a file'} cannot be read: {err.strerror or err}")
    except MemoryError:
        return _fail(f"the data of --dataset {args.dataset} does not fit in memory")
    try:
        message = run(config, data, out)
    except TrainingDiverged as err:
        return _fail(str(err), status=1)
    except ModelFileError as err:
        return _fail(f"{err} — the run in {out} cannot be continued; start a new one with another --out")
    except OSError as err:
        return _fail(f"{err.filename or out} cannot be written: {err.strerror or err}")
    except MemoryError:
        return _fail("out of memory while training; choose a smaller model or --batch-size")
    except KeyboardInterrupt:
        command = job.replace("-", " ", 1) if job.startswith("reproduce-") else job  # "reproduce gao2020"
        print(f"\ninterrupted; continue with: torchtn {command} --resume --out {out}", file=sys.stderr)
        return 130
    if message:
        print(message)
    return 0


def _exact_rows(args: argparse.Namespace) -> int | float | None:
    """``--exact-rows`` for the job: the default only when calibrated; 0 means none."""
    from .experiments.compress_hf import HFCompressJob

    calibrated = args.calibrate is None or args.calibrate > 0
    if args.exact_rows is None:
        return HFCompressJob.exact_rows if calibrated else None
    if args.exact_rows and not calibrated:
        raise ValueError("--exact-rows needs --calibrate N > 0: the token counts choose the rows")
    return args.exact_rows or None


def _cmd_compress_hf(args: argparse.Namespace) -> int:
    """``torchtn compress --hf-model PATH``: compress, heal and measure a pretrained transformer."""
    from .experiments.compress_hf import HFCompressJob, run_hf_compress

    for flag, given in (("--model-file", args.model_file is not None), ("--arch", args.arch != "fc2"),
                        ("--arch-args", args.arch_args is not None)):
        if given:
            return _fail(f"{flag} is for compressing a model file of a zoo or your own architecture; --hf-model "
                         f"compresses the Hugging Face model in its folder")
    for flag, given in (("--method adtn", args.method != "mpo"), ("--depth", args.depth is not None),
                        ("--unitary", args.unitary), ("--fit-steps", args.fit_steps != 500)):
        if given:
            return _fail(f"{flag} is not available with --hf-model, which compresses into MPO layers")
    if args.resume:
        try:
            _adopt_recorded_hf(args)
        except ValueError as err:
            return _fail(str(err))
    if args.corpus is None:
        return _fail("--hf-model needs --corpus FILE (plain text, one passage per line) to heal and measure on")
    if args.rank is not None and len(args.rank) > 1:
        return _fail("--hf-model takes one --rank value")
    try:
        # absolute paths: the run records them (hf_job.json), and --resume may come from another directory
        job = HFCompressJob(model=str(args.hf_model.resolve()), corpus=str(args.corpus.resolve()), ratio=args.ratio,
                            rank=None if args.rank is None else args.rank[0], rel_tol=args.rel_tol,
                            parts=tuple(args.parts), heal_minutes=args.heal_minutes, batch_size=args.batch_size,
                            allocation=args.allocation, hidden_states=args.hidden_states,
                            augment=args.augment, head=args.hf_head, temperature=args.temperature,
                            min_lr_fraction=(HFCompressJob.min_lr_fraction if args.min_lr_fraction is None
                                             else args.min_lr_fraction), skip=tuple(args.keep_dense),
                            calibrate=HFCompressJob.calibrate if args.calibrate is None else args.calibrate,
                            probes=HFCompressJob.probes if args.probes is None else args.probes,
                            exact_rows=_exact_rows(args),
                            lr=1e-4 if args.finetune_lr is None else args.finetune_lr, seed=args.seed)
        device = str(_device(args))
    except ValueError as err:
        return _fail(str(err))
    out = args.out if args.out is not None else Path("runs") / f"compress-hf-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        return _fail(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.resume:
        return _fail(f"--out {out} already holds files: pass --resume to continue that run, or choose another --out")
    try:
        results = run_hf_compress(job, out, resume=args.resume, progress=not args.no_progress,
                                  log=lambda s: print(s, flush=True), device=device)
    except ImportError as err:
        return _fail(str(err))
    except ValueError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: torchtn compress --resume --out {out}", file=sys.stderr)
        return 130
    print(f"\n{results['table']}\n\nwrote {out}/model (torchtn.hf.load) and {out}/results.json")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from .experiments.compress import CompressConfig, preflight, run_compress

    if args.hf_model is not None or (args.resume and args.out is not None and (args.out / "hf_job.json").is_file()):
        return _cmd_compress_hf(args)  # --resume of an --hf-model run needs no --hf-model: the run recorded it
    for flag, given in (("--corpus", args.corpus is not None), ("--hf-head", args.hf_head),
                        ("--hidden-states", args.hidden_states), ("--augment", args.augment),
                        ("--min-lr-fraction", args.min_lr_fraction is not None),
                        ("--keep-dense", bool(args.keep_dense)),
                        ("--calibrate", args.calibrate is not None), ("--probes", args.probes is not None),
                        ("--exact-rows", args.exact_rows is not None)):
        if given:
            return _fail(f"{flag} is for --hf-model")

    def make_config():
        return CompressConfig(dataset=args.dataset, data_dir=None if args.data_dir is None else str(args.data_dir),
                              hidden=args.hidden, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                              ranks=args.rank, rel_tol=args.rel_tol, ratio=args.ratio, batch_size=args.batch_size,
                              lr=args.lr, finetune_lr=args.finetune_lr,
                              seed=args.seed, arch=args.arch, arch_args=args.arch_args,
                              model_file=None if args.model_file is None else str(args.model_file),
                              distill=args.distill, temperature=args.temperature, conv_modes=args.conv_modes,
                              method=args.method, depths=args.depth, fit_steps=args.fit_steps, unitary=args.unitary)

    checked: dict = {}  # the --model-file weights as preflight read them (the file is read once)

    def prepare(config, data, out):
        checked["state"] = preflight(config, out, args.resume, data)

    def run(config, data, out):
        results = run_compress(config, out, resume=args.resume, progress=not args.no_progress,
                               log=lambda s: print(s, flush=True), data=data, device=args.device,
                               user_state=checked.get("state"))
        return (f"\n{results['table']}\n\nwrote {out}/results.json, {out}/accuracy_vs_compression.png and the "
                f"models (*.safetensors)")

    return _run_job("compress", args, make_config, prepare, run)


def _cmd_train(args: argparse.Namespace) -> int:
    from .experiments.rundir import check_resume, check_writable
    from .experiments.train import TrainJob, check_train_job, run_train
    from .train.trainer import process_group

    try:
        rank, world = process_group(init=True, device=_device(args))
    except ValueError as err:
        return _fail(str(err))
    log = (lambda s: print(s, flush=True)) if rank == 0 else (lambda s: None)

    def make_config():
        return TrainJob(arch=args.arch, arch_args=args.arch_args, layers=args.layers, rank=args.rank,
                        dataset=args.dataset, data_dir=None if args.data_dir is None else str(args.data_dir),
                        epochs=10 if args.epochs is None else args.epochs, batch_size=args.batch_size, lr=args.lr,
                        optimizer=args.optimizer, seed=args.seed, max_rank=args.max_rank, cutoff=args.cutoff,
                        sweep_lr=args.sweep_lr, sweep_schedule=args.sweep_schedule, depth=args.depth,
                        unitary=args.unitary)

    def prepare(job, data, out):
        check_writable(out)
        check_train_job(job, data)
        if job.batch_size < world:
            raise ValueError(f"--batch-size {job.batch_size} is smaller than the {world} processes")
        if args.resume:
            from dataclasses import asdict

            def normalize(settings: dict) -> dict:
                return {k: v for k, v in asdict(TrainJob(**settings)).items() if k != "data_dir"}

            check_resume(out, "train", ["model.safetensors"], "train_job", asdict(job), normalize)

    def run(job, data, out):
        log(data.describe())
        run_train(job, data, out, resume=args.resume, progress=not args.no_progress, log=log, device=args.device)
        return f"wrote {out}/model.safetensors and {out}/results.json" if rank == 0 else ""

    status = _run_job("train", args, make_config, prepare, run)
    if status == 0 and world > 1:  # a clean shutdown: nobody closes its connections while a peer still uses them
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        _exit_worker(status)
    return status


def _exit_worker(status: int) -> None:
    """End a distributed worker whose work is saved and whose process group is destroyed, skipping the interpreter's
    teardown: there gloo's transport threads sometimes abort the process (SIGABRT, "terminate called without an active
    exception"; seen on a 2-core AMD EPYC in two of six full test runs), which torchrun then reports as a failed
    job although every file was written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .experiments.registry import get_reproduction
    from .experiments.reproduce import ReproduceConfig, run_reproduction
    from .experiments.rundir import check_resume, check_writable

    try:
        rep = get_reproduction(args.name)
    except ValueError as err:
        return _fail(str(err))
    args.dataset = args.dataset or rep.default_dataset
    if args.dataset not in rep.datasets:
        return _fail(f"--dataset {args.dataset!r} is not allowed for {rep.name}: expected one of "
                     f"{', '.join(rep.datasets)}")

    def make_config():
        return ReproduceConfig(rep.name, args.quick, args.dataset,
                               None if args.data_dir is None else str(args.data_dir), args.seeds)

    def prepare(config, data, out):
        check_writable(out)
        if args.resume:
            first = sorted(out.glob("*.safetensors"))
            check_resume(out, "reproduce", [first[0].name] if first else ["(a stage).safetensors"],
                         "reproduce_config", asdict(config), lambda d: {k: v for k, v in d.items() if k != "data_dir"})

    def run(config, data, out):
        results = run_reproduction(config, data, out, resume=args.resume, progress=not args.no_progress,
                                   log=lambda s: print(s, flush=True), device=args.device)
        return f"wrote {out}/results.json and {out}/report.md ({results['seconds'] / 60:.1f} min)"

    return _run_job(f"reproduce-{rep.name}", args, make_config, prepare, run)


def _given(command: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations of the options ``argv`` spells out (as argparse matches them: exactly, or by a unique
    prefix), so that ``--resume`` can tell an option left out from one given with its default value."""
    options = {o: a.dest for a in command._actions for o in a.option_strings}
    given = set()
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        matches = [name] if name in options else [o for o in options if o.startswith(name)]
        if len(matches) == 1:
            given.add(options[matches[0]])
    return given


# --resume takes the options the run was made with, except those given: the file and the metadata key that record
# them, and the config fields whose command-line option has another name
_RECORDED = {"compress": ("dense.safetensors", "compress_config", {"ranks": "rank", "depths": "depth"}),
             "train": ("model.safetensors", "train_job", {}),
             "reproduce": (None, "reproduce_config", {})}  # None: any stage's model file
# given an option, the recorded values of these are not taken either: one of rank/rel_tol/ratio excludes the others,
# and a --method (compress) or --layers (train) takes none of the other kind's settings (the resume check then names
# the method or layers that differ)
_NOT_TAKEN_WITH = {"rank": {"rel_tol", "ratio"}, "rel_tol": {"rank", "ratio"}, "ratio": {"rank", "rel_tol"},
                   "method": {"rank", "rel_tol", "ratio", "conv_modes", "depth", "fit_steps", "unitary"},
                   "layers": {"rank", "depth", "unitary"}}


def _adopt_recorded(job: str, args: argparse.Namespace) -> None:
    """With ``--resume --out DIR``: every option of ``job`` left out of the command line takes the value the run in
    DIR recorded (so ``torchtn compress --out DIR --resume`` continues it as it was started). A run that cannot be
    read is left to the resume checks to report."""
    from .experiments.rundir import recorded_settings
    from .io import ModelFileError

    kind = job.split("-")[0]  # "reproduce-gao2020" → "reproduce"
    if kind not in _RECORDED or not args.out.is_dir():
        return
    first, key, renamed = _RECORDED[kind]
    files = [first] if first else [p.name for p in sorted(args.out.glob("*.safetensors"))[:1]]
    try:
        recorded = recorded_settings(args.out, files, key, kind)
    except (ModelFileError, OSError):
        return
    if isinstance(recorded, dict):
        _take_recorded(args, recorded, renamed)


def _take_recorded(args: argparse.Namespace, recorded: dict, renamed: dict[str, str],
                   convert: dict | None = None) -> None:
    """Set every option left out of the command line to its ``recorded`` value (``renamed``: recorded field →
    option destination; ``convert``: destination → function of the recorded value; values of ``Path`` options
    become paths) and say which changed (once under torchrun)."""
    given, actions = getattr(args, "given", set()), getattr(args, "actions", {})
    given = given.union(*[_NOT_TAKEN_WITH.get(dest, set()) for dest in given])
    taken = []
    for field, value in recorded.items():
        dest = renamed.get(field, field)
        if dest in given or dest not in actions or not actions[dest].option_strings:  # positionals are always given
            continue
        if dest in (convert or {}):
            value = convert[dest](value)
        elif value is not None and actions[dest].type is Path:
            value = Path(value)
        if value != getattr(args, dest):
            taken.append(f"{dest}={value}")
        setattr(args, dest, value)
    if taken and os.environ.get("RANK", "0") == "0":
        print(f"--resume: the run's own settings for the options not given: {', '.join(taken)}", flush=True)


def _adopt_recorded_hf(args: argparse.Namespace) -> None:
    """``--hf-model`` runs: the options left out take the values in ``DIR/hf_job.json``."""
    from .experiments.compress_hf import recorded_hf_job

    recorded = recorded_hf_job(args.out) if args.out is not None and args.out.is_dir() else None
    if recorded is None:
        return
    renamed = {"model": "hf_model", "lr": "finetune_lr", "skip": "keep_dense", "head": "hf_head"}
    calibrated = bool(recorded.get("calibrate"))
    convert = {"rank": lambda v: None if v is None else [v],  # one value, as the job keeps it
               "exact_rows": lambda v: (0 if calibrated else None) if v is None else v}  # None: "no exact rows"
    _take_recorded(args, recorded, renamed, convert)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    command = parser.commands.get(args.command)
    if command is not None:
        args.given, args.actions = _given(command, argv), {a.dest: a for a in command._actions}
    if args.version:
        from . import __version__

        print(f"torchtn {__version__}")
        return 0
    if args.command == "compress":
        return _cmd_compress(args)
    if args.command == "train":
        return _cmd_train(args)
    if args.command == "reproduce":
        return _cmd_reproduce(args)
    if args.command == "inspect":
        return _cmd_inspect(args)
    parser.print_usage(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
