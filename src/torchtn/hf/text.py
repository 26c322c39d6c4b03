"""Text in and quality out (the measuring side of :mod:`torchtn.hf`): a corpus file, encoded batches, mean-pooled
sentence embeddings or a head's logits, and how close a student is to its teacher (cosine, neighbour agreement,
top-class agreement, KL) and how fast it runs."""
from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..train import distillation_loss

__all__ = ["read_corpus", "PooledEncoder", "HeadLogits", "logits", "head_quality", "embed", "quality", "throughput"]


def read_corpus(path: str | os.PathLike, *, name: str = "--corpus") -> list[str]:
    """Passages of a plain-text file, one per non-empty line (whitespace collapsed). ``ValueError`` naming the file
    when it is missing, unreadable or empty."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise ValueError(f"{name} {path} cannot be read: {err.strerror or err}") from None
    lines = [" ".join(line.split()) for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{name} {path} has no text (expected one passage per line)")
    return lines


def check_texts(name: str, texts: object) -> list[str]:
    """``texts`` as a list of strings; one string on its own (which iterates as its characters) or anything that is
    not text raises, naming ``name``."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{name} is one string ({texts[:40]!r}…): pass a list of texts — [text] for one")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"{name} must be a list of strings, got {type(texts).__name__}") from None
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"{name} must be a list of strings; it holds a {type(bad).__name__}")
    return texts


def _encode(tokenizer, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """``(n, 2, L)`` int64: token ids and attention mask, padded to the longest passage (≤ ``max_length``)."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).long()


class PooledEncoder(nn.Module):
    """``(batch, 2, L)`` [token ids; attention mask] ``-> (batch, hidden)``: the mean of the model's last hidden
    states over the real tokens (sentence-transformers' pooling). Trims each batch to its longest passage, ``n``.
    With ``tokens=True`` the output is ``(batch, 1 + n, hidden)``: the pooled vector, then every token's hidden state
    (zero at padding), for distilling hidden states too."""

    def __init__(self, model: nn.Module, tokens: bool = False) -> None:
        super().__init__()
        self.model = model
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x[:, 1]
        n = max(int(mask.sum(1).max()), 1)
        ids, mask = x[:, 0, :n], mask[:, :n]
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return torch.cat([pooled.unsqueeze(1), hidden * m], dim=1) if self.tokens else pooled


class HeadLogits(nn.Module):
    """``(batch, 2, L)`` [token ids; attention mask] ``-> (batch, classes)``: a task model's sequence-level logits
    (classification or regression heads). Token-level heads (logits per token) are refused with a clear error."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x[:, 1]
        n = max(int(mask.sum(1).max()), 1)
        out = self.model(input_ids=x[:, 0, :n], attention_mask=mask[:, :n])
        logits = getattr(out, "logits", None)
        if logits is None or logits.dim() != 2:
            shape = None if logits is None else tuple(logits.shape)
            raise ValueError(f"{type(self.model).__name__} gives logits of shape {shape}: healing on logits needs a "
                             f"sequence-level head, logits (batch, classes)")
        return logits


@torch.no_grad()
def _batched(wrapper: nn.Module, model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int,
             max_length: int) -> torch.Tensor:
    """``wrapper`` (around ``model``) applied to ``texts`` in batches, in eval mode, concatenated on the CPU."""
    texts = check_texts("texts", texts)
    wrapper.eval()
    device = next(model.parameters()).device
    out = [wrapper(_encode(tokenizer, texts[i:i + batch_size], max_length).to(device)).float().cpu()
           for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def logits(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 32,
           max_length: int = 128) -> torch.Tensor:
    """A task model's sequence-level logits ``(len(texts), classes)`` in eval mode (see :class:`HeadLogits`)."""
    return _batched(HeadLogits(model), model, tokenizer, texts, batch_size, max_length)


def head_quality(student: nn.Module, teacher: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 32,
                 max_length: int = 128, teacher_logits: torch.Tensor | None = None) -> dict[str, float]:
    """How close the student's task head is to the teacher's on ``texts``: ``agreement`` (fraction of texts with the
    same top class) and ``kl`` (mean KL divergence of the teacher's class distribution from the student's, nats)."""
    if not texts:
        raise ValueError("head_quality needs some texts")
    t = teacher_logits if teacher_logits is not None else logits(teacher, tokenizer, texts, batch_size=batch_size,
                                                                  max_length=max_length)
    s = logits(student, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    return {"agreement": float(_agreement(s.double(), t)), "kl": float(distillation_loss(s.double(), t.double()))}


def embed(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 32,
          max_length: int = 128) -> torch.Tensor:
    """Mean-pooled sentence embeddings ``(len(texts), hidden)`` (not normalized), in eval mode."""
    return _batched(PooledEncoder(model), model, tokenizer, texts, batch_size, max_length)


def quality(student: nn.Module, teacher: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 32,
            max_length: int = 128, teacher_embeddings: torch.Tensor | None = None) -> dict[str, float]:
    """How close the student's sentence embeddings are to the teacher's on ``texts``: ``mean_cosine`` (per sentence)
    and ``nn_agreement`` — the fraction of sentences whose nearest other sentence (cosine) is the same under both."""
    if len(texts) < 2:
        raise ValueError("quality needs at least two texts")
    t = teacher_embeddings if teacher_embeddings is not None else embed(teacher, tokenizer, texts,
                                                                          batch_size=batch_size, max_length=max_length)
    s = embed(student, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    cos = F.cosine_similarity(s, t, dim=-1)
    return {"mean_cosine": float(cos.mean()), "nn_agreement": float((_nearest(s) == _nearest(t)).double().mean())}


def _nearest(e: torch.Tensor) -> torch.Tensor:
    e = F.normalize(e.double(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(1)


@torch.no_grad()
def throughput(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128,
               repeats: int = 3) -> float:
    """Sentences per second of mean-pooled encoding — or of the logits, for a task model with a head —
    (``batch_size`` sentences per call, the best of ``repeats`` passes over ``texts`` after one warm-up batch)."""
    device = next(model.parameters()).device
    batches = [_encode(tokenizer, texts[i:i + batch_size], max_length).to(device)
               for i in range(0, len(texts), batch_size)]
    warm_up = model.eval()(input_ids=batches[0][:, 0], attention_mask=batches[0][:, 1])  # also tells the model's kind
    pooled = PooledEncoder(model) if hasattr(warm_up, "last_hidden_state") else HeadLogits(model)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            pooled(b)
        best = min(best, time.perf_counter() - t0)
    return len(texts) / best


def _agreement(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (student.argmax(-1) == teacher.argmax(-1)).to(student.dtype).mean()
