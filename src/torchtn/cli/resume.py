"""`--resume`: the options left out of the command line take the values the run in --out recorded."""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path


def given_options(command: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
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
                   "method": {"rank", "rel_tol", "ratio", "conv_modes", "depth", "fit_steps", "unitary",
                              "mapping"},
                   "layers": {"rank", "depth", "unitary", "mapping"}}


def adopt_recorded(job: str, args: argparse.Namespace) -> None:
    """With ``--resume --out DIR``: every option of ``job`` left out of the command line takes the value the run in
    DIR recorded (so ``torchtn compress --out DIR --resume`` continues it as it was started). A run that cannot be
    read is left to the resume checks to report."""
    from ..experiments.rundir import recorded_settings
    from ..io import ModelFileError

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


def adopt_recorded_hf(args: argparse.Namespace) -> None:
    """``--hf-model`` runs: the options left out take the values in ``DIR/hf_job.json``."""
    from ..experiments.compress_hf import recorded_hf_job

    recorded = recorded_hf_job(args.out) if args.out is not None and args.out.is_dir() else None
    if recorded is None:
        return
    renamed = {"model": "hf_model", "lr": "finetune_lr", "skip": "keep_dense", "head": "hf_head"}
    calibrated = bool(recorded.get("calibrate"))
    convert = {"rank": lambda v: None if v is None else [v],  # one value, as the job keeps it
               "exact_rows": lambda v: (0 if calibrated else None) if v is None else v}  # None: "no exact rows"
    _take_recorded(args, recorded, renamed, convert)
