"""The jobs of the command line: `torchtn compress` (a model, or a Hugging Face folder with --hf-model), `torchtn
train` and `torchtn reproduce NAME`."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .flow import exit_worker, fail, job_device, run_job
from .resume import adopt_recorded_hf


def _exact_rows(args: argparse.Namespace) -> int | float | None:
    """``--exact-rows`` for the job: the default only when calibrated; 0 means none."""
    from ..experiments.compress_hf import HFCompressJob

    calibrated = args.calibrate is None or args.calibrate > 0
    if args.exact_rows is None:
        return HFCompressJob.exact_rows if calibrated else None
    if args.exact_rows and not calibrated:
        raise ValueError("--exact-rows needs --calibrate N > 0: the token counts choose the rows")
    return args.exact_rows or None


def cmd_compress_hf(args: argparse.Namespace) -> int:
    """``torchtn compress --hf-model PATH``: compress, heal and measure a pretrained transformer."""
    from ..experiments.compress_hf import HFCompressJob, run_hf_compress

    for flag, given in (("--model-file", args.model_file is not None), ("--arch", args.arch != "fc2"),
                        ("--arch-args", args.arch_args is not None)):
        if given:
            return fail(f"{flag} is for compressing a model file of a zoo or your own architecture; --hf-model "
                         f"compresses the Hugging Face model in its folder")
    for flag, given in (("--method adtn", args.method != "mpo"), ("--depth", args.depth is not None),
                        ("--unitary", args.unitary), ("--mapping", args.mapping != "rowmajor"),
                        ("--fit-steps", args.fit_steps != 500)):
        if given:
            return fail(f"{flag} is not available with --hf-model, which compresses into MPO layers")
    if args.resume:
        try:
            adopt_recorded_hf(args)
        except ValueError as err:
            return fail(str(err))
    if args.corpus is None:
        return fail("--hf-model needs --corpus FILE (plain text, one passage per line) to heal and measure on")
    if args.rank is not None and len(args.rank) > 1:
        return fail("--hf-model takes one --rank value")
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
                            refit=HFCompressJob.refit if args.refit is None else args.refit,
                            lr=1e-4 if args.finetune_lr is None else args.finetune_lr, seed=args.seed)
        device = str(job_device(args))
    except ValueError as err:
        return fail(str(err))
    out = args.out if args.out is not None else Path("runs") / f"compress-hf-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        return fail(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.resume:
        return fail(f"--out {out} already holds files: pass --resume to continue that run, or choose another --out")
    try:
        results = run_hf_compress(job, out, resume=args.resume, progress=not args.no_progress,
                                  log=lambda s: print(s, flush=True), device=device)
    except ImportError as err:
        return fail(str(err))
    except ValueError as err:
        return fail(str(err))
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: torchtn compress --resume --out {out}", file=sys.stderr)
        return 130
    curve = f", {out}/healing.png" if (out / "healing.png").exists() else ""
    print(f"\n{results['table']}\n\nwrote {out}/model (torchtn.hf.load), {out}/results.json{curve}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from ..experiments.compress import CompressConfig, preflight, run_compress

    if args.hf_model is not None or (args.resume and args.out is not None and (args.out / "hf_job.json").is_file()):
        return cmd_compress_hf(args)  # --resume of an --hf-model run needs no --hf-model: the run recorded it
    for flag, given in (("--corpus", args.corpus is not None), ("--hf-head", args.hf_head),
                        ("--hidden-states", args.hidden_states), ("--augment", args.augment),
                        ("--min-lr-fraction", args.min_lr_fraction is not None),
                        ("--keep-dense", bool(args.keep_dense)),
                        ("--calibrate", args.calibrate is not None), ("--probes", args.probes is not None),
                        ("--exact-rows", args.exact_rows is not None), ("--refit", args.refit is not None)):
        if given:
            return fail(f"{flag} is for --hf-model")

    def make_config():
        return CompressConfig(dataset=args.dataset, data_dir=None if args.data_dir is None else str(args.data_dir),
                              hidden=args.hidden, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                              ranks=args.rank, rel_tol=args.rel_tol, ratio=args.ratio, batch_size=args.batch_size,
                              lr=args.lr, finetune_lr=args.finetune_lr,
                              seed=args.seed, arch=args.arch, arch_args=args.arch_args,
                              model_file=None if args.model_file is None else str(args.model_file),
                              distill=args.distill, temperature=args.temperature, conv_modes=args.conv_modes,
                              method=args.method, depths=args.depth, fit_steps=args.fit_steps, unitary=args.unitary,
                              mapping=args.mapping)

    checked: dict = {}  # the --model-file model as preflight read it (the file is read once)

    def prepare(config, data, out):
        checked["model"] = preflight(config, out, args.resume, data)

    def run(config, data, out):
        results = run_compress(config, out, resume=args.resume, progress=not args.no_progress,
                               log=lambda s: print(s, flush=True), data=data, device=args.device,
                               user_model=checked.get("model"))
        return (f"\n{results['table']}\n\nwrote {out}/results.json, {out}/accuracy_vs_compression.png and the "
                f"models (*.safetensors)")

    return run_job("compress", args, make_config, prepare, run)


def cmd_train(args: argparse.Namespace) -> int:
    from ..experiments.rundir import check_resume, check_writable
    from ..experiments.train import TrainJob, check_train_job, run_train
    from ..train.trainer import process_group

    try:
        rank, world = process_group(init=True, device=job_device(args))
    except ValueError as err:
        return fail(str(err))
    log = (lambda s: print(s, flush=True)) if rank == 0 else (lambda s: None)

    def make_config():
        return TrainJob(arch=args.arch, arch_args=args.arch_args, layers=args.layers, rank=args.rank,
                        dataset=args.dataset, data_dir=None if args.data_dir is None else str(args.data_dir),
                        epochs=10 if args.epochs is None else args.epochs, batch_size=args.batch_size, lr=args.lr,
                        optimizer=args.optimizer, seed=args.seed, max_rank=args.max_rank, cutoff=args.cutoff,
                        sweep_lr=args.sweep_lr, sweep_schedule=args.sweep_schedule, depth=args.depth,
                        unitary=args.unitary, mapping=args.mapping)

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

    status = run_job("train", args, make_config, prepare, run)
    if status == 0 and world > 1:  # a clean shutdown: nobody closes its connections while a peer still uses them
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        exit_worker(status)
    return status


def _recorded_option(results: dict, flag: str) -> str | None:
    """The value of ``flag`` in a run's recorded command (``torchtn reproduce NAME --dataset mnist …``), if given."""
    words = str(results.get("command", "")).split()
    return words[words.index(flag) + 1] if flag in words[:-1] else None


def _rewrite_report(rep, args: argparse.Namespace) -> int:
    """``reproduce NAME --report-only --out DIR``: report.md and the plots again from DIR's results.json."""
    from ..data import DataFilesMissing, load_dataset
    from ..experiments.reproduce import recorded_results, rewrite_report

    if args.out is None:
        return fail("--report-only needs --out DIR: the directory of a finished run (its results.json)")
    for flag, given in (("--resume", args.resume), ("--quick", args.quick), ("--seeds", args.seeds is not None)):
        if given:
            return fail(f"{flag} does not combine with --report-only, which trains nothing (the run's settings come "
                        f"from its results.json)")
    try:
        results = recorded_results(args.out, rep.name)
        recorded = results.get("config") or {}
        dataset = (recorded.get("dataset") or _recorded_option(results, "--dataset") or rep.default_dataset)
        if args.dataset is not None and args.dataset != dataset:
            raise ValueError(f"--dataset {args.dataset} is not the run's: {args.out} was measured on {dataset}")
        data_dir = args.data_dir or recorded.get("data_dir") or _recorded_option(results, "--data-dir")
        path = rewrite_report(results, load_dataset(dataset, data_dir), args.out)
    except (DataFilesMissing, ValueError) as err:
        return fail(str(err))
    except OSError as err:
        return fail(f"{err.filename or args.out} cannot be written: {err.strerror or err}")
    print(f"wrote {path} (and its plots) from {args.out / 'results.json'}; nothing was trained")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..experiments.registry import get_reproduction
    from ..experiments.reproduce import ReproduceConfig, run_reproduction
    from ..experiments.rundir import check_resume, check_writable

    try:
        rep = get_reproduction(args.name)
    except ValueError as err:
        return fail(str(err))
    if args.report_only:
        return _rewrite_report(rep, args)
    args.dataset = args.dataset or rep.default_dataset
    if args.dataset not in rep.datasets:
        return fail(f"--dataset {args.dataset!r} is not allowed for {rep.name}: expected one of "
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

    return run_job(f"reproduce-{rep.name}", args, make_config, prepare, run)
