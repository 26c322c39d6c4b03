"""The command line's parser: every subcommand's options, their types and checks (one line, exit 2)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .flow import fail


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line instead of usage + message
        raise SystemExit(fail(f"{self.prog}: {message} (see --help)"))


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
    from ..models import MODELS
    from ..models.user import is_user_arch

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
    from ..data import DATASETS

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


def _add_adtn_options(p: argparse.ArgumentParser) -> None:
    """``--unitary`` and ``--mapping``: how the ADTNs of ``--method adtn`` / ``--layers adtn`` are built."""
    from ..core.adtn import MAPPINGS

    p.add_argument("--unitary", action="store_true",
                   help="ADTN gates held orthogonal (each the polar factor of a latent 4x4 matrix; --method/--layers "
                        "adtn)")
    p.add_argument("--mapping", choices=MAPPINGS, default="rowmajor",
                   help="how an ADTN's generated vector becomes the weight (--method/--layers adtn): rowmajor (the "
                        "first out*in entries, row-major; default), axes (each axis of the weight on its own qubits) "
                        "or interleaved (those qubits taken from the axes in turn)")


def _add_arch_options(p: argparse.ArgumentParser, what: str, own: str) -> None:
    """``--arch`` (a zoo name or the user's own ``FILE.py:NAME``) and ``--arch-args``; ``own``: what else the job
    does with the user's architecture."""
    from ..models import MODELS

    p.add_argument("--arch", type=_arch, default="fc2", metavar="NAME",
                   help=f"{what}: one of the zoo ({', '.join(sorted(MODELS))}; default fc2) or your own nn.Module as "
                        f"FILE.py:NAME or package.module:NAME (a class or a function returning it; its code runs, as "
                        f"`python FILE.py` would: name only code you trust{own})")
    p.add_argument("--arch-args", type=_json_kwargs, default=None, metavar="JSON",
                   help="keyword arguments of your own --arch, as a JSON object, e.g. '{\"width\": 32}'")


def build_parser() -> argparse.ArgumentParser:
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
    how.add_argument("--ratio", type=_float_in("--ratio", 1.0, None), default=None,
                     help="whole-model compression R× (dense parameters / tensorized parameters), R > 1")
    c.add_argument("--method", choices=("mpo", "adtn"), default="mpo",
                   help="mpo: MPO layers by TT-SVD (default); adtn: each Linear/Conv2d weight generated by a deep "
                        "tensor network of 2x2x2x2 gates fitted to it (Qing et al.), then healed")
    c.add_argument("--depth", type=_int_at_least("--depth", 1), nargs="+", default=None,
                   help="with --method adtn: brick layers of the ADTNs to sweep, e.g. --depth 2 4 (default 1 2 4)")
    c.add_argument("--fit-steps", type=_int_at_least("--fit-steps", 0), default=500,
                   help="with --method adtn: Adam steps fitting each ADTN to its dense weight (default 500)")
    _add_adtn_options(c)
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
    hfg.add_argument("--refit", type=_int_at_least("--refit", 0), default=None, metavar="N",
                     help="with --calibrate: after the truncation, re-solve every compressed linear map in the order "
                          "the model calls it for the inputs the compressed model gives it on N healing passages "
                          "(sequential error correction; default 0: none; give it more passages than --calibrate)")
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
                        "zfnet: the big fully connected maps; resnet18, densenet: the classifier; hybrid: the "
                        "middle map; your own architecture: every Linear and Conv2d) (default dense)")
    t.add_argument("--rank", type=_int_at_least("--rank", 1), default=4, help="MPO bond dimension (default 4)")
    t.add_argument("--depth", type=_int_at_least("--depth", 1), default=2,
                   help="brick layers of each ADTN, with --layers adtn (default 2)")
    _add_adtn_options(t)
    t.add_argument("--optimizer", choices=("adamw", "adam", "sgd", "sweep"), default="adamw",
                   help="adamw (decoupled weight decay); adam (weight decay as an L2 term in the gradient); sgd "
                        "(momentum 0.9); sweep: DMRG-style sweeps train the MPO layers (adaptive bonds), AdamW the "
                        "rest")
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
    from ..experiments.registry import reproductions

    r.add_argument("name", help=f"the reproduction ({', '.join(sorted(reproductions()))})")
    r.add_argument("--quick", action="store_true", help="fewer epochs and seeds: minutes on a CPU")
    r.add_argument("--dataset", default=None, help="dataset (default: the reproduction's)")
    r.add_argument("--data-dir", type=Path, default=None, help="directory of the dataset's files (mnist: the four "
                                                               "IDX files)")
    r.add_argument("--seeds", type=_int_at_least("--seeds", 1, 100), default=None, help="number of seeds")
    r.add_argument("--out", type=Path, default=None, help="output directory (default: runs/reproduce-<name>-<time>)")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    r.add_argument("--report-only", action="store_true",
                   help="write report.md and the plots of the finished run in --out again from its results.json "
                        "(nothing is trained; the measured rows and times stay as they are)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_device_option(r)

    i = sub.add_parser("inspect", help="show a model file's tensor-network layers: ranks, entanglement, errors",
                       description="Print, for every tensor-network layer in a torchtn .safetensors file (any "
                                   "registered type), each bond's rank, entanglement entropy and the relative error "
                                   "the next smaller rank would cause.")
    i.add_argument("file", type=Path, help="a .safetensors file written by torchtn, or a directory holding one "
                                           "(train's --out; compress --hf-model's --out or its model/)")
    i.add_argument("--plot", type=Path, default=None, help="also write a PNG of entropy per bond (refuses to "
                                                            "overwrite an existing file)")
    parser.commands = dict(sub.choices)  # each command's parser (which options a command line gave: given_options)
    return parser
