"""Healing a compressed ``transformers`` model by distillation from the original on the user's text (the training
side of :mod:`torchtn.hf`): the losses, changed passages, and :func:`heal` on the shared trainer."""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_nonnegative_real, check_positive_real
from ..data import Dataset
from ..train import TrainConfig, Trainer, distillation_loss
from .text import HeadLogits, PooledEncoder, _agreement, _encode, check_texts, embed, logits

__all__ = ["heal", "HealHistory", "PassageAugment"]


def _heal_loss(student: torch.Tensor, teacher: torch.Tensor, relational: float = 0.0,
               temperature: float = 0.05) -> torch.Tensor:
    """``MSE / mean(teacher²) + (1 − cos)``: scale-free embedding distance plus the angle the metrics measure; with
    ``relational`` > 0, plus that weight times :func:`_relational_loss` (the batch's similarity structure)."""
    mse = F.mse_loss(student, teacher) / teacher.pow(2).mean().clamp_min(1e-12)
    loss = mse + (1.0 - F.cosine_similarity(student, teacher, dim=-1).mean())
    return loss + relational * _relational_loss(student, teacher, temperature) if relational else loss


def _relational_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Embeddings ``(batch, hidden)`` → the mean over rows of ``KL(p_teacher ‖ p_student)``, ``p`` a row's softmax over
    its cosine similarities to the batch's other rows at ``temperature``: which sentences are near which — what
    nearest-neighbour agreement measures, and what a small error in every embedding can still reorder."""
    n = len(student)
    if n < 3:  # no "other rows" to rank
        return student.sum() * 0.0
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)

    def log_p(e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e, dim=-1)
        return F.log_softmax((e @ e.T)[off].view(n, n - 1) / temperature, dim=-1)
    return F.kl_div(log_p(student), log_p(teacher.to(student.dtype)), log_target=True, reduction="batchmean")


def _cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(_pooled(student), teacher, dim=-1).mean()


def _pooled(out: torch.Tensor) -> torch.Tensor:
    """The pooled vectors of a :class:`PooledEncoder` output (with or without the token states)."""
    return out[:, 0] if out.dim() == 3 else out


def _pooled_loss(student: torch.Tensor, teacher_pooled: torch.Tensor, **kw: float) -> torch.Tensor:
    return _heal_loss(_pooled(student), teacher_pooled, **kw)


def _token_loss(student: torch.Tensor, teacher: torch.Tensor, **kw: float) -> torch.Tensor:
    """Pooled loss plus every token's hidden state: ``MSE / mean(teacher²)`` over the (zero-padded) token states."""
    tokens = F.mse_loss(student[:, 1:], teacher[:, 1:]) / teacher[:, 1:].pow(2).mean().clamp_min(1e-12)
    return _heal_loss(student[:, 0], teacher[:, 0], **kw) + tokens


def _named(fn: Callable[..., torch.Tensor], kw: dict) -> Callable[..., torch.Tensor]:
    """``fn`` with keyword arguments bound, under ``fn``'s name (checkpoints record the loss by name)."""
    return functools.update_wrapper(functools.partial(fn, **kw), fn)


def _lengths(x: torch.Tensor) -> torch.Tensor:
    """``(n, 2, L)`` encoded passages → their lengths in tokens ``(n,)``."""
    return x[:, 1].sum(-1)


class PassageAugment:
    """``(batch, 2, L)`` encoded passages [token ids; attention mask] → the same batch with each passage randomly
    changed, for distillation on more inputs than the corpus has: a contiguous crop keeping a fraction in
    ``[min_crop, 1]`` of its tokens, then each kept token dropped with probability ``drop`` (at least one stays). The
    special tokens that open and close a passage (``[CLS]``, ``[SEP]``) stay; passages are re-packed to the left and
    padded with ``pad_id``, so every passage gets shorter or stays as it was."""

    def __init__(self, special_ids: Sequence[int], pad_id: int = 0, *, min_crop: float = 0.5,
                 drop: float = 0.1) -> None:
        self.special = frozenset(int(i) for i in special_ids)
        self.pad_id = int(pad_id)
        self.min_crop = check_nonnegative_real("min_crop", min_crop, maximum=1.0)
        self.drop = check_nonnegative_real("drop", drop, maximum=1.0)
        if self.drop == 1.0:
            raise ValueError("drop=1.0 is not allowed: expected a probability below 1 (every token would go)")

    @classmethod
    def for_tokenizer(cls, tokenizer, **kw: float) -> "PassageAugment":
        pad = getattr(tokenizer, "pad_token_id", None)
        return cls(getattr(tokenizer, "all_special_ids", ()), 0 if pad is None else pad, **kw)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        out = torch.zeros_like(x)
        out[:, 0] = self.pad_id
        for r in range(len(x)):
            n = int(mask[r].sum())
            row = ids[r, :n]
            head = int(n > 0 and int(row[0]) in self.special)
            tail = int(n - head > 0 and int(row[n - 1]) in self.special)
            body = row[head:n - tail]
            m = len(body)
            if m > 1:
                k = m - int(torch.randint(0, m - math.ceil(self.min_crop * m) + 1, (1,), generator=generator))
                k = max(k, 1)
                start = int(torch.randint(0, m - k + 1, (1,), generator=generator))
                body = body[start:start + k]
                keep = torch.rand(k, generator=generator) >= self.drop
                if not bool(keep.any()):
                    keep[int(torch.randint(0, k, (1,), generator=generator))] = True
                body = body[keep]
            new = torch.cat([row[:head], body, row[n - tail:n]])
            out[r, 0, :len(new)] = new
            out[r, 1, :len(new)] = 1
        return out


def heal(student: nn.Module, teacher: nn.Module, tokenizer, texts: Sequence[str], *, minutes: float | None = None,
         epochs: int = 1, batch_size: int = 32, max_length: int = 64, lr: float = 1e-4,
         min_lr_fraction: float = 0.1, val_texts: Sequence[str] = (),
         steps_per_round: int | None = None, warmup_steps: int = 50, hidden_states: bool = False,
         target: str = "embedding", temperature: float = 2.0, relational: float = 0.0,
         relational_temperature: float = 0.05, bucket: int = 25, augment: bool = False,
         checkpoint: str | os.PathLike | None = None, resume: bool = False, keep_best: bool = True,
         progress: bool = True, seed: int = 0, device: str | torch.device | None = None) -> "HealHistory":
    """Distil ``teacher`` into ``student`` (in place) on ``texts``: their mean-pooled sentence embeddings are matched
    (:func:`_heal_loss`) by AdamW at ``lr`` after a linear ``warmup_steps`` warm-up (without it, 5e-4 collapsed a
    1.5× MiniLM in its first steps), then down a cosine to ``lr · min_lr_fraction`` at the end of the rounds or of
    the time budget (``1``: constant; the 0.1 default gained MiniLM 2× 0.001–0.002 of cosine in 20–30 minutes) —
    for ``epochs`` rounds, or — with
    ``minutes`` — as many rounds as fit in that time (up to ``epochs``). A round is a pass over the texts, or
    ``steps_per_round`` batches of a fresh shuffle (on a 2-core CPU a MiniLM batch of 128 takes about 1.5 s).
    Passages are cut at ``max_length`` tokens while healing (64: the cost grows with the longest one in a batch),
    and a batch takes passages of similar length (``bucket``: from runs of that many batches; random batches of 128
    fortunes are half padding, and MiniLM heals twice the steps per minute with the same progress per step; 0: random
    batches). ``relational`` > 0 adds that weight times the mismatch of each batch's similarity structure
    (:func:`_relational_loss`, softmax over cosine similarities at ``relational_temperature``; at weight 1 it cost
    MiniLM 0.02 of cosine in 6 minutes for no measurable gain in neighbour agreement).
    The teacher's embeddings are computed once up front. ``checkpoint`` (a ``.safetensors`` path) is written
    atomically after every round and ``resume`` continues it. ``keep_best``: the student ends with the weights of
    the round with the lowest validation loss, its starting weights included (healing a well-calibrated model can
    lower it: at 1.5× MiniLM lost 0.02 of cosine in 8 minutes), so healing never returns a worse model on
    ``val_texts`` than it was given. Returns the trainer's history (validation ``loss`` and ``cosine`` on
    ``val_texts`` per round; without ``val_texts``, on 64 of ``texts`` — choose passages that are not measured
    afterwards), with ``best_round`` (0: the starting weights were kept). ``hidden_states``: also
    match every token's last hidden state (the teacher then runs beside the student at every step).
    ``augment``: every healing batch is a fresh random change of its passages (:class:`PassageAugment`: a contiguous
    crop keeping at least half of the tokens, then 10% of them dropped), and the teacher runs beside the student on
    the changed passages (a step costs about a sixth more) — the student never sees the same input twice, against
    memorizing a small corpus (MiniLM 2× on 13,797 fortunes, 30 minutes: the same validation curve round for round
    and the same end, 0.947 against 0.946 — its plateau is capacity, not memory).

    ``target="logits"``: for a task model with a sequence-level head (loaded with ``load_pretrained(head=True)``),
    match the head's logits instead — the distillation loss of Hinton et al. at ``temperature`` against the
    teacher's logits (computed once up front); the validation metric is then ``agreement`` (same top class)."""
    texts, val_texts = check_texts("texts", texts), check_texts("val_texts", val_texts)
    if not texts:
        raise ValueError("heal needs some text (texts is empty)")
    check_positive_real("minutes", minutes, allow_none=True)
    if target not in ("embedding", "logits"):
        raise ValueError(f"target={target!r} is not allowed: expected 'embedding' or 'logits'")
    if target == "logits" and hidden_states:
        raise ValueError("hidden_states=True matches hidden states; it does not combine with target='logits'")
    temperature = check_positive_real("temperature", temperature)
    relational = check_nonnegative_real("relational", relational)
    if target == "logits" and relational:
        raise ValueError("relational > 0 matches the embeddings' similarity structure; it does not combine with "
                         "target='logits'")
    match = {"relational": relational,
             "temperature": check_positive_real("relational_temperature", relational_temperature)}
    val_texts = list(val_texts) or list(texts[:64])
    x = _encode(tokenizer, texts, max_length)
    xv = _encode(tokenizer, val_texts, max_length)
    outputs = logits if target == "logits" else embed
    online = augment or hidden_states  # the teacher runs beside the student: no targets up front (never read)
    y = (torch.zeros(len(x)) if online else
         outputs(teacher, tokenizer, texts, batch_size=batch_size, max_length=max_length))
    yv = outputs(teacher, tokenizer, val_texts, batch_size=batch_size, max_length=max_length)
    data = Dataset("corpus", x, y, xv, yv, xv, yv, tuple(x.shape[1:]), 0)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=0.0, min_lr_fraction=min_lr_fraction,
                      seed=seed, warmup_steps=warmup_steps, keep_best=keep_best,
                      progress=progress, desc="heal", eval_batch_size=batch_size, steps_per_epoch=steps_per_round,
                      max_seconds=None if minutes is None else 60.0 * minutes, bucket=bucket)
    common = {"checkpoint": checkpoint, "device": device, "sizes": _lengths,
              "augment": PassageAugment.for_tokenizer(tokenizer) if augment else None}

    def beside(wrap: Callable[[nn.Module], nn.Module], match_fn) -> dict:
        """With ``augment`` the passages change every batch: the teacher's targets are computed beside the student."""
        return {"teacher": wrap(teacher), "distill": 1.0, "distill_loss": match_fn} if augment else {}
    if target == "logits":
        match_logits = functools.partial(distillation_loss, temperature=temperature)
        trainer = Trainer(HeadLogits(student), cfg, loss=match_logits, metrics={"agreement": _agreement},
                          **beside(HeadLogits, match_logits), **common)
    elif hidden_states:
        trainer = Trainer(PooledEncoder(student, tokens=True), cfg, loss=_named(_pooled_loss, match),
                          metrics={"cosine": _cosine}, teacher=PooledEncoder(teacher, tokens=True),
                          distill=1.0, distill_loss=_named(_token_loss, match), **common)
    else:
        match_pooled = _named(_heal_loss, match)
        trainer = Trainer(PooledEncoder(student), cfg, loss=match_pooled, metrics={"cosine": _cosine},
                          **beside(PooledEncoder, match_pooled), **common)
    history = HealHistory(trainer.fit(data, resume=resume))
    history.best_round = trainer.best_epoch
    history.earlier_seconds = trainer.earlier_seconds
    student.eval()
    return history


class HealHistory(list):
    """:func:`heal`'s per-round records (``EpochRecord``), with ``best_round`` — the round whose weights the student
    ended with (0: its starting weights; ``None`` without ``keep_best``) — and ``earlier_seconds``, what the rounds an
    interrupted run healed (continued from its checkpoint) took then."""

    best_round: int | None = None
    earlier_seconds: float = 0.0
