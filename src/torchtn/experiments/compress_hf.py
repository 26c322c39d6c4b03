"""``torchtn compress --hf-model PATH``: compress a pretrained transformer with MPOs, heal it by distillation on a
corpus, and measure what was kept.

Output directory (``--resume`` continues the healing from its checkpoint)::

    out/hf_job.json                the run's settings (written first; --resume takes and checks them)
    out/model/                     the compressed model (torchtn.hf.save: torchtn.safetensors, config, tokenizer)
    out/checkpoints/heal.safetensors  the healing checkpoint (every pass over the corpus)
    out/results.json               per-layer report; parameters, file sizes, quality and throughput before/after
    out/healing.png                the healing curve (validation per round)
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._checks import check_nonnegative_real, check_positive_int, check_positive_real, check_ratio
from ..io import atomic_write_text
from ..plotting import plot_metric_history
from ..report import format_table, run_record
from .rundir import check_same_settings

__all__ = ["HFCompressJob", "run_hf_compress"]

SPEED_BATCH = 32  # sentences per call when throughput is measured (≤ 128 tokens each)
VAL_PASSAGES = 128  # healing passages (at most a fifth) set aside to choose the healed weights: best round or start


@dataclass
class HFCompressJob:
    """Settings of one ``torchtn compress --hf-model`` run."""

    model: str
    corpus: str
    ratio: float | None = None
    rank: int | None = None
    rel_tol: float | None = None
    parts: tuple[str, ...] = ("attention", "mlp", "embeddings")
    heal_minutes: float = 10.0
    eval_lines: int = 500
    batch_size: int = 32
    max_length: int = 128
    lr: float = 1e-4
    min_lr_fraction: float = 0.1  # healing rate down a cosine to lr × this by the end of the budget (1: constant)
    seed: int = 0
    skip: tuple[str, ...] = field(default_factory=tuple)
    allocation: str | None = None  # None: tensorize's default ("relative" when calibrated without --probes)
    steps_per_round: int = 25  # healing batches between checkpoints / time-budget checks
    hidden_states: bool = False  # heal on every token's hidden state too, not only the pooled embedding
    augment: bool = False  # heal on randomly cropped passages with dropped tokens, the teacher run beside the student
    head: bool = False  # load the task class with its head; heal and measure on its logits
    temperature: float = 2.0  # of the logits distillation (with head)
    calibrate: int = 256  # passages of the healing split whose statistics steer the truncation (0: plain TT-SVD)
    probes: int = 4  # random output projections per calibration batch: weigh layers by their effect on the output
    exact_rows: int | float | None = 0.8  # calibrated token table: exact rows of the tokens covering this fraction (or
    # this many rows); ignored with calibrate=0
    refit: int = 0  # after a calibrated compress: re-solve every two-core map in call order on this many passages

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.ratio, self.rank, self.rel_tol)) == 0:
            raise ValueError("--hf-model needs --ratio, --rank or --rel-tol to know how much to compress")
        check_ratio("ratio", self.ratio)
        if not (isinstance(self.heal_minutes, (int, float)) and self.heal_minutes >= 0):
            raise ValueError(f"--heal-minutes {self.heal_minutes!r} is not allowed: expected minutes >= 0")
        check_positive_int("eval_lines", self.eval_lines)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("max_length", self.max_length)
        check_positive_real("temperature", self.temperature)
        check_nonnegative_real("min_lr_fraction", self.min_lr_fraction, maximum=1.0)
        if not (isinstance(self.calibrate, int) and self.calibrate >= 0):
            raise ValueError(f"--calibrate {self.calibrate!r} is not allowed: expected a number of passages >= 0")
        if not (isinstance(self.probes, int) and self.probes >= 0):
            raise ValueError(f"--probes {self.probes!r} is not allowed: expected a number of projections >= 0")
        if not (isinstance(self.refit, int) and self.refit >= 0):
            raise ValueError(f"--refit {self.refit!r} is not allowed: expected a number of passages >= 0")
        if self.refit and not self.calibrate:
            raise ValueError("--refit needs --calibrate N > 0: it re-solves the calibrated (two-core) maps")
        if self.head and self.hidden_states:
            raise ValueError("--hidden-states heals on hidden states; with --hf-head the head's logits are matched")


def _split(texts: list[str], eval_lines: int, seed: int) -> tuple[list[str], list[str]]:
    """Held-out evaluation lines (a seeded random ``eval_lines``, at most a fifth of the corpus) and the rest."""
    if len(texts) < 10:
        raise ValueError(f"--corpus has {len(texts)} passages; at least 10 are needed (held-out lines are measured)")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(2, min(eval_lines, len(texts) // 5))
    return [texts[i] for i in order[n_eval:]], [texts[i] for i in order[:n_eval]]


def _weights_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


JOB_FILE = "hf_job.json"  # the run's settings, written when it starts: what --resume continues and checks against


def recorded_hf_job(out: Path) -> dict | None:
    """The settings an ``--hf-model`` run in ``out`` was started with (``None`` if it recorded none: not such a run,
    or one from before they were recorded)."""
    path = Path(out) / JOB_FILE
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--resume: {path} cannot be read ({type(err).__name__}); start a new run with another "
                         f"--out") from None
    return recorded if isinstance(recorded, dict) else None


def _check_recorded(job: HFCompressJob, out: Path) -> None:
    """A resumed run must have the settings it recorded (the differing ones are named); checked before any work."""
    recorded = recorded_hf_job(out)
    if recorded is not None:  # a run from before settings were recorded: nothing to compare
        check_same_settings(out, recorded, json.loads(json.dumps(asdict(job))))  # tuples as JSON lists, as recorded


def _record(job: HFCompressJob, out: Path) -> None:
    """The run's settings, the first file it writes — once the model, the corpus and the compression have been
    checked, so a refused run leaves ``out`` as it was."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / JOB_FILE).exists():
        atomic_write_text(out / JOB_FILE, json.dumps(asdict(job), indent=2) + "\n")


def run_hf_compress(job: HFCompressJob, out: Path, *, resume: bool = False, progress: bool = True,
                    log: Callable[[str], None] = print, device: str | None = None) -> dict:
    """Compress, heal, measure and save (see the module docstring); returns the results. ``progress=False`` also
    silences ``transformers``' own bars."""
    from .. import hf

    if resume:
        _check_recorded(job, Path(out))

    with hf.progress_bars(progress):
        return _run(job, out, resume=resume, progress=progress, log=log, device=device)


def _run(job: HFCompressJob, out: Path, *, resume: bool, progress: bool, log: Callable[[str], None],
         device: str | None) -> dict:
    from .. import hf

    started = time.perf_counter()
    out = Path(out)
    teacher, tokenizer = hf.load_pretrained(job.model, head=job.head)
    train_texts, eval_texts = _split(hf.read_corpus(job.corpus), job.eval_lines, job.seed)
    log(f"{job.model}: {type(teacher).__name__}, {sum(p.numel() for p in teacher.parameters()):,} parameters; "
        f"corpus: {len(train_texts):,} passages to heal on, {len(eval_texts):,} held out")
    calibration = None
    if job.calibrate:
        calibration = hf.calibrate(teacher, tokenizer, train_texts[:job.calibrate], batch_size=job.batch_size,
                                   max_length=job.max_length, token_texts=train_texts, probes=job.probes,
                                   seed=job.seed)
        what = ("the model output's error" if job.probes else "its output error") + " on them"
        log(f"calibrated on {min(job.calibrate, len(train_texts)):,} healing passages (token frequencies: all "
            f"{len(train_texts):,}{f'; {job.probes} output projections per batch' if job.probes else ''}): every "
            f"layer is truncated in the norm of {what}")
    torch.manual_seed(job.seed)
    student, report = hf.compress(teacher, ratio=job.ratio, rank=job.rank, rel_tol=job.rel_tol, parts=job.parts,
                                  skip=job.skip, allocation=job.allocation, calibration=calibration,
                                  exact_rows=job.exact_rows if calibration else None)
    log(report.table())
    refit_rows = []
    if job.refit:
        texts = train_texts[:job.refit]
        refitted = hf.refit(student, teacher, tokenizer, texts, calibration=calibration, batch_size=job.batch_size,
                            max_length=job.max_length)
        refit_rows = [{"layer": n, "rank": r, "output_error_before": b, "output_error_after": a}
                      for n, r, b, a in refitted.rows]
        log(f"refit on {len(texts):,} healing passages: every two-core map re-solved, in call order, for the inputs "
            f"the compressed model gives it\n{refitted.table()}")
    _record(job, out)
    kw = {"batch_size": job.batch_size, "max_length": job.max_length}
    if job.head:  # the task head's logits: top-class agreement and KL divergence
        reference = hf.logits(teacher, tokenizer, eval_texts, **kw)

        def measure() -> dict[str, float]:
            return hf.head_quality(student, teacher, tokenizer, eval_texts, teacher_logits=reference, **kw)
        names = {"agreement": "top-class agreement with the original", "kl": "KL divergence from the original"}
    else:  # the sentence embeddings: cosine and nearest-neighbour agreement
        reference = hf.embed(teacher, tokenizer, eval_texts, **kw)

        def measure() -> dict[str, float]:
            return hf.quality(student, teacher, tokenizer, eval_texts, teacher_embeddings=reference, **kw)
        names = {"mean_cosine": "mean cosine to the original", "nn_agreement": "nearest-neighbour agreement"}
    before = measure()
    log("before healing: " + ", ".join(f"{names[k]} {v:.4f}" for k, v in before.items()))
    history, best_round, earlier = [], None, 0.0
    if job.heal_minutes > 0:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        # validation (which round's weights to keep) on healing passages set aside, never the held-out ones
        n_val = max(1, min(VAL_PASSAGES, len(train_texts) // 5))
        val_texts, heal_texts = train_texts[-n_val:], train_texts[:-n_val]
        records = hf.heal(student, teacher, tokenizer, heal_texts, minutes=job.heal_minutes, epochs=10_000,
                          lr=job.lr, val_texts=val_texts, checkpoint=out / "checkpoints" / "heal.safetensors",
                          steps_per_round=job.steps_per_round, hidden_states=job.hidden_states, resume=resume,
                          augment=job.augment, min_lr_fraction=job.min_lr_fraction,
                          target="logits" if job.head else "embedding", temperature=job.temperature,
                          progress=progress, seed=job.seed,
                          device=device, batch_size=job.batch_size)
        history = [asdict(r) for r in records]
        best_round, earlier = records.best_round, records.earlier_seconds
        student.to("cpu")
        metric = "agreement" if job.head else "cosine"  # the healing curve: the validation metric per round
        chosen = f" (kept round {best_round})" if best_round else ""
        plot_metric_history(history, metric, out / "healing.png", xlabel="round",
                            title=f"healing: validation per round{chosen}",
                            ylabel=f"{metric} with the original (healing passages set aside)")
    after = measure()
    kept = "" if best_round is None else f", kept round {best_round}" + (" (the start)" if best_round == 0 else "")
    log(f"after healing ({len(history)} rounds{kept}): " + ", ".join(f"{names[k]} {v:.4f}" for k, v in after.items()))
    speed_texts = eval_texts[:256]
    speed_kw = {"batch_size": SPEED_BATCH, "max_length": 128}  # the measure, whatever --batch-size is
    speed = {"original": hf.throughput(teacher, tokenizer, speed_texts, **speed_kw),
             "compressed": hf.throughput(student, tokenizer, speed_texts, **speed_kw)}
    saved = hf.save(student, out / "model", tokenizer, overwrite=resume,
                    metadata={"hf_compress_job": asdict(job), "source": str(job.model)})
    params = {"original": sum(p.numel() for p in teacher.parameters()),
              "compressed": sum(p.numel() for p in student.parameters())}
    sizes = {"original": _weights_bytes(teacher), "compressed": saved.stat().st_size}
    seconds = time.perf_counter() - started + earlier  # (a resumed run: with the rounds its earlier run healed)
    results = {
        **run_record("compress-hf", "torchtn compress --hf-model"), "job": asdict(job), "seconds": seconds,
        "layers": report.to_dict()["layers"], "kept_dense": report.skipped, "refit": refit_rows,
        "parameters": params, "bytes": sizes, "ratio": params["original"] / params["compressed"],
        "quality_before_healing": before, "quality_after_healing": after, "heal_history": history,
        "heal_best_round": best_round,
        "throughput_sentences_per_s": speed, "throughput_batch_size": SPEED_BATCH, "eval_passages": len(eval_texts),
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    rows = [("parameters", f"{params['original']:,}", f"{params['compressed']:,}",
             f"{params['original'] / params['compressed']:.2f}×"),
            ("file size (MB)", f"{sizes['original'] / 1e6:.1f}", f"{sizes['compressed'] / 1e6:.1f}",
             f"{sizes['original'] / sizes['compressed']:.2f}×"),
            *[(names[k], "0" if k == "kl" else "1", f"{before[k]:.4f} → {after[k]:.4f}", "") for k in names],
            (f"sentences/s (batch {SPEED_BATCH}, CPU)", f"{speed['original']:.1f}", f"{speed['compressed']:.1f}",
             f"{speed['compressed'] / speed['original']:.2f}×")]
    results["table"] = format_table(["", "original", "compressed (before → after healing)", "ratio"], rows)
    return results
