"""What every job of the command line shares: one-line errors, the device, and one flow from the settings through
the checks to the run (resume, torchrun workers, interruptions)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .resume import adopt_recorded


def fail(message: str, status: int = 2) -> int:
    """Print ``message`` as the one line a bad input gets (on stderr) and return the exit status."""
    print(f"torchtn: error: {message}", file=sys.stderr)
    return status


def job_device(args: argparse.Namespace):
    """The device ``--device`` names (see :func:`~torchtn.train.device.resolve_device`)."""
    from ..train.device import resolve_device

    return resolve_device(args.device, name="--device")


def _elastic_restart() -> bool:
    """Whether torchrun restarted this worker group after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def run_job(job: str, args: argparse.Namespace, make_config, prepare, run) -> int:
    """The flow every training job shares: settings, output directory, data and checks before anything is written,
    then the run, with every failure turned into one line (exit 2; 1 for a diverged run; 130 when interrupted).

    ``make_config()`` builds the validated settings; ``prepare(config, data, out)`` makes the job's own checks;
    ``run(config, data, out)`` runs it and returns what to print.
    """
    import pickle

    from ..data import DataFilesMissing, load_dataset
    from ..io import ModelFileError
    from ..train import TrainingDiverged

    if args.resume and args.out is not None:
        adopt_recorded(job, args)
    try:
        args.device = str(job_device(args))
        config = make_config()
    except ValueError as err:
        return fail(str(err))
    out = args.out if args.out is not None else Path("runs") / f"{job}-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.resume and args.out is None:
        return fail("--resume needs --out DIR (the directory of the run to continue)")
    if out.exists() and not out.is_dir():
        return fail(f"--out {out} exists and is not a directory")
    if _elastic_restart() and args.out is not None:
        # torchrun restarted the workers after a failure: continue our own run if it got as far as a checkpoint
        args.resume = any(out.glob("*.safetensors")) or any((out / "checkpoints").glob("*.safetensors"))
    elif out.is_dir() and any(out.iterdir()) and not args.resume:
        return fail(f"--out {out} already holds files: pass --resume to continue that run, or choose another --out")
    try:
        data = load_dataset(args.dataset, None if args.data_dir is None else str(args.data_dir))
        prepare(config, data, out)
    except (DataFilesMissing, ValueError, pickle.UnpicklingError) as err:
        return fail(str(err))
    except OSError as err:
        return fail(f"{err.filename or 'a file'} cannot be read: {err.strerror or err}")
    except MemoryError:
        return fail(f"the data of --dataset {args.dataset} does not fit in memory")
    try:
        message = run(config, data, out)
    except TrainingDiverged as err:
        return fail(str(err), status=1)
    except ModelFileError as err:
        return fail(f"{err} — the run in {out} cannot be continued; start a new one with another --out")
    except OSError as err:
        return fail(f"{err.filename or out} cannot be written: {err.strerror or err}")
    except MemoryError:
        return fail("out of memory while training; choose a smaller model or --batch-size")
    except KeyboardInterrupt:
        command = job.replace("-", " ", 1) if job.startswith("reproduce-") else job  # "reproduce gao2020"
        print(f"\ninterrupted; continue with: torchtn {command} --resume --out {out}", file=sys.stderr)
        return 130
    if message:
        print(message)
    return 0


def exit_worker(status: int) -> None:
    """End a distributed worker whose work is saved and whose process group is destroyed, skipping the interpreter's
    teardown: there gloo's transport threads sometimes abort the process (SIGABRT, "terminate called without an active
    exception"; seen on a 2-core AMD EPYC in two of six full test runs), which torchrun then reports as a failed
    job although every file was written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
