"""``torchtn.hf``: compress a Hugging Face ``transformers`` model with MPOs and heal it by distillation, offline.

Optional extra (``pip install torchtn[hf]``); nothing else in torchtn imports ``transformers``. The pieces:

* :func:`load_pretrained` — a local model folder (``config.json`` + weights + tokenizer) with no network access;
  GPT-2-style ``Conv1D`` maps become the equivalent ``nn.Linear`` (:func:`linearize`), a tokenizer without a padding
  token pads with its end-of-text token;
* :func:`compress` — ``tensorize`` restricted to the chosen parts (attention projections, MLP, embeddings; a name
  filter), by rank, ``rel_tol`` or a whole-model ``ratio`` whose budget is shared by the spectra; with
  :func:`calibrate`'s statistics of the user's text, every layer is truncated in the norm of its output error on that
  text (data-aware low-rank: the inputs' Gram matrix for linear maps, token frequencies for the embedding tables);
* :func:`heal` — distillation from the original model on the user's text: the student's mean-pooled sentence
  embeddings are pulled to the teacher's (normalized MSE + cosine; optionally every token's hidden state), or — for a
  task model with a sequence-level head — its logits (Hinton et al.'s loss at a temperature), with the shared
  :class:`~torchtn.train.Trainer` (batches of passages of similar length, time or epoch budget, progress, atomic
  checkpoints, resume, the best round kept; optionally on changed passages, :class:`PassageAugment`);
* :func:`quality`, :func:`head_quality`, :func:`throughput` — mean cosine to the original's sentence embeddings,
  nearest-neighbour agreement; the head's top-class agreement and KL divergence; sentences per second;
* :func:`save` / :func:`load` — a directory with ``torchtn.safetensors`` (torchtn layers recorded), the model's own
  ``config.json`` and its tokenizer; ``load`` returns the same ``transformers`` class with torchtn layers inside;
  :func:`export_dense` writes merged dense weights that plain ``transformers`` loads.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_nonnegative_real, check_positive_real, error_line
from ._modules import replace_submodule
from .compress import LayerStats, TensorizeReport, tensorize
from .compress import calibrate as _calibrate
from .compress.calibration import row_counts
from .data import Dataset
from .io import load_model, read_metadata, save_model
from .layers.registry import densify
from .train import TrainConfig, Trainer, distillation_loss

__all__ = ["load_pretrained", "progress_bars", "linearize", "compress", "calibrate", "heal", "embed", "quality",
           "throughput", "save", "load", "export_dense", "read_corpus", "PARTS", "part_of", "HeadLogits", "logits",
           "head_quality", "PassageAugment"]

PARTS = ("attention", "mlp", "embeddings")
_ATTENTION_WORDS = ("attention", "attn", "query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj")
_BLOCK_WORDS = ("layer", "layers", "block", "blocks", "h")
_BLOCK_SUFFIXES = ("_layer", "_layers", "_block", "_blocks")  # e.g. ALBERT's albert_layers.0


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("torchtn.hf needs the transformers package: pip install 'torchtn[hf]'") from None
    return transformers


def _conv1d_type() -> type[nn.Module] | None:
    """``transformers``' ``Conv1D`` (the linear maps of GPT-2 and its kin), or ``None`` where it has none."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def linearize(model: nn.Module) -> nn.Module:
    """``model`` with every ``transformers`` ``Conv1D`` — GPT-2's linear maps, ``y = x W + b`` with ``W (in, out)``
    — replaced, in place, by the ``nn.Linear`` computing the same map (``W`` transposed), so calibration,
    :func:`compress` and the reports see one kind of linear map. :func:`load_pretrained`, :func:`calibrate`,
    :func:`compress` and :func:`load` call it; :func:`export_dense` writes ``Conv1D`` weights back where the model's
    class has them. Returns ``model``."""
    conv1d = _conv1d_type()
    if conv1d is None:
        return model
    for name, module in list(model.named_modules()):
        if isinstance(module, conv1d):
            w = module.weight
            linear = nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, device=w.device, dtype=w.dtype)
            replace_submodule(model, name, _transposed_into(linear, module).requires_grad_(w.requires_grad))
    return model


def _transposed_into(target: nn.Module, source: nn.Module) -> nn.Module:
    """``target`` holding ``source``'s weight transposed and its bias (zero where ``source`` has none): the one copy
    between an ``nn.Linear`` (``W (out, in)``) and a ``Conv1D`` (``W (in, out)``), both ways."""
    with torch.no_grad():
        target.weight.copy_(source.weight.T)
        if source.bias is not None:
            target.bias.copy_(source.bias)
        elif target.bias is not None:
            target.bias.zero_()
    return target


def _conv1d_back(dense: nn.Module) -> None:
    """Undo :func:`linearize` on a dense copy of a ``transformers`` model, in place: wherever its class builds a
    ``Conv1D`` (read off an empty skeleton on the meta device), the ``nn.Linear`` there becomes that ``Conv1D``
    again, so plain ``transformers`` loads the weights the right way round (a square matrix would otherwise load
    transposed without an error)."""
    conv1d = _conv1d_type()
    # only classes built from modules that use Conv1D (GPT-2's blocks import it; BERT's do not) need the skeleton
    if conv1d is None or not any(getattr(sys.modules.get(type(m).__module__), "Conv1D", None) is conv1d
                                 for m in dense.modules()):
        return
    try:
        with torch.device("meta"):
            skeleton = type(dense)(dense.config)
    except Exception as err:  # without the skeleton a square Conv1D weight could be written transposed: refuse
        raise ValueError(f"export_dense: {type(dense).__name__} could not be rebuilt from its config to find its "
                         f"Conv1D maps ({type(err).__name__}: {str(err)[:200]})") from None
    for name, module in skeleton.named_modules():
        linear = dense.get_submodule(name) if isinstance(module, conv1d) else None
        if isinstance(linear, nn.Linear):
            back = conv1d(linear.out_features, linear.in_features).to(linear.weight.device, linear.weight.dtype)
            replace_submodule(dense, name, _transposed_into(back, linear))


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """``transformers``' own progress bars (loading and writing weights) on or off inside the block, restored after —
    so that ``--no-progress`` keeps a log free of bars."""
    logging = _transformers().utils.logging
    was = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
    try:
        yield
    finally:
        (logging.enable_progress_bar if was else logging.disable_progress_bar)()


def load_pretrained(path: str | os.PathLike, *, head: bool = False) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` from a local model folder, without network access (``AutoModel``, ``AutoTokenizer``;
    ``HF_HUB_OFFLINE=1`` is set for the call). ``head=True``: the task class the folder's config names
    (``architectures``, e.g. ``BertForSequenceClassification``), with its head, instead of the bare encoder. Raises
    ``ValueError`` naming the path when it is not a model folder."""
    tf = _transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"--hf-model {path} is not a Hugging Face model folder (no config.json there)")
    cls = tf.AutoModel
    if head:
        import json

        names = json.loads((path / "config.json").read_text()).get("architectures") or []
        cls = getattr(tf, str(names[0]), None) if names else None
        if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
            raise ValueError(f"--hf-model {path}: its config.json names no transformers task class in "
                             f"'architectures' ({names!r}), so there is no head to load")
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        model = cls.from_pretrained(str(path), local_files_only=True)
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"--hf-model {path} could not be loaded: {error_line(err)}") from None
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    if getattr(model.config, "is_encoder_decoder", False) and not head:
        raise ValueError(f"--hf-model {path} is an encoder-decoder model ({type(model).__name__}): healing distils "
                         f"the sentence embeddings of encoders and decoder-only models; save its encoder alone (e.g. "
                         f"T5EncoderModel.from_pretrained(PATH).save_pretrained(DIR)) and compress that")
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2's tokenizers have none; padding sits past the mask anyway
        if getattr(model.config, "pad_token_id", None) is None:  # a sequence head finds each passage's last token
            model.config.pad_token_id = tokenizer.pad_token_id
    return linearize(model).eval(), tokenizer


def part_of(name: str, module: nn.Module) -> str:
    """Which part of a transformer a convertible module is: ``"embeddings"`` (``nn.Embedding``), ``"attention"``
    (a projection inside an attention block), ``"mlp"`` (any other linear map inside a numbered block), or
    ``"head"`` (poolers, classifiers, language-model heads: kept dense by :func:`compress`)."""
    if isinstance(module, nn.Embedding):
        return "embeddings"
    words = name.lower().split(".")
    in_block = any((w in _BLOCK_WORDS or w.endswith(_BLOCK_SUFFIXES)) and i + 1 < len(words) and words[i + 1].isdigit()
                   for i, w in enumerate(words))
    if not in_block:
        return "head"
    if any(any(a in w for a in _ATTENTION_WORDS) for w in words):
        return "attention"
    return "mlp"


def compress(model: nn.Module, *, ratio: float | None = None, rank: int | None = None, rel_tol: float | None = None,
             parts: Sequence[str] = PARTS, skip: Sequence[str] = (), allocation: str | None = None,
             calibration: dict[str, LayerStats] | None = None,
             exact_rows: int | float | None = None) -> tuple[nn.Module, TensorizeReport]:
    """A copy of ``model`` whose chosen ``parts`` are MPO layers (TT-SVD of the pretrained weights). ``model``'s
    GPT-2-style ``Conv1D`` maps are first made ``nn.Linear`` in place (:func:`linearize`: the same map); an embedding
    table a head shares (tied input and output embeddings) stays dense.

    ``parts`` ⊆ ``("attention", "mlp", "embeddings")`` (see :func:`part_of`; heads always stay dense); ``skip``: more
    module-name glob patterns to keep dense. ``ratio`` is a whole-model compression (all parameters counted) shared
    by spectra (``allocation``: ``"absolute"`` — least total squared error — or ``"relative"`` — every layer's
    spectrum in units of its norm; see :func:`~torchtn.tensorize`; on MiniLM at 2× the two healed alike, absolute
    with the better neighbour agreement); layers whose MPO would not be smaller stay dense. ``calibration``
    (:func:`calibrate`): truncate those layers in the norm of their output error on the calibration text — with
    ``probes``, of the error that reaches the model's output (two-core MPOs; see :func:`~torchtn.tensorize`) — on
    all-MiniLM-L6-v2 at 2× that keeps a mean cosine of 0.79 (inputs only) or 0.88 (with probes) to the original's
    sentence embeddings before any healing, against 0.10 for the plain TT-SVD; 0.90 with ``exact_rows=0.8``
    (docs/reproductions/minilm.md).
    ``exact_rows`` (calibrated): the most frequent tokens' rows stay exact beside the MPO of the others (a count, or
    the fraction of the calibration text's tokens they cover; see :func:`~torchtn.tensorize`).
    """
    parts = tuple(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"parts={parts!r} is not allowed: choose from {PARTS}")
    import fnmatch

    linearize(model)
    tied = _tied_tables(model)

    def keep_dense(name: str, module: nn.Module) -> bool:
        return (part_of(name, module) not in parts or any(fnmatch.fnmatchcase(name, p) for p in skip)
                or name in tied)

    return tensorize(model, rank=rank, rel_tol=rel_tol, ratio=ratio, skip=keep_dense, allocation=allocation,
                     calibration=calibration, exact_rows=exact_rows)


def _tied_tables(model: nn.Module) -> set[str]:
    """Names of the embedding tables whose weight a head shares (a language model's tied input and output
    embeddings): they stay dense — an MPO table would leave the head holding the whole table."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shared = getattr(out_emb, "weight", None)
    return {n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and shared is not None
            and m.weight is shared}


def calibrate(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 32, max_length: int = 128,
              token_texts: Sequence[str] | None = None, probes: int = 0, seed: int = 0) -> dict[str, LayerStats]:
    """What every linear map and embedding table of ``model`` sees on ``texts`` (see
    :func:`torchtn.compress.calibrate`): input Gram matrices and token / position counts, for :func:`compress`.
    Padding positions are included (the model computes them too; the texts run in order of length, so there are
    few). ``token_texts``: count the input embedding's token ids on these instead (tokenizing only, no forward pass:
    cheap on a whole corpus, so the table's rows are weighted by frequencies measured on far more text than the
    model can be run on). ``probes`` > 0: also how much each layer's outputs move the model's output — the
    normalized mean-pooled sentence embedding, or a task model's log-probabilities — from that many random
    projections per batch (a forward and backward pass over ``texts`` each), so the truncation minimizes the error
    that reaches the model's output and one budget compares all layers in absolute terms."""
    if len(texts) == 0:
        raise ValueError("calibrate needs at least one text")
    linearize(model)  # GPT-2's Conv1D maps are calibrated as the nn.Linear maps compress makes of them
    ordered = sorted(texts, key=len)  # batches of similar lengths: few padding positions in the statistics
    device = next(model.parameters()).device
    batches = []
    for i in range(0, len(ordered), batch_size):
        x = _encode(tokenizer, ordered[i:i + batch_size], max_length).to(device)
        batches.append({"input_ids": x[:, 0], "attention_mask": x[:, 1]})
    stats = _calibrate(model, batches, output=_model_output if probes else None, probes=probes or 1, seed=seed)
    if token_texts is not None:
        table = model.get_input_embeddings()
        name = next(n for n, m in model.named_modules() if m is table)
        counts = torch.zeros(table.num_embeddings, dtype=torch.float64)
        for i in range(0, len(token_texts), 1024):
            ids = tokenizer(list(token_texts[i:i + 1024]), truncation=True, max_length=max_length)["input_ids"]
            counts += row_counts(torch.tensor([t for row in ids for t in row], dtype=torch.long),
                                 table.num_embeddings)
        stats[name].row_counts = counts.to(stats[name].row_counts.device)
        stats[name].samples = int(counts.sum())
    return stats


def _model_output(out, batch: dict) -> torch.Tensor:
    """What a model is for, ``(batch, k)``: the normalized mean-pooled sentence embedding of an encoder (what the
    cosine measures), or a sequence-level head's log-probabilities."""
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is not None:
        m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)
    logits = getattr(out, "logits", None)
    if logits is None or logits.dim() != 2:
        raise ValueError(f"{type(out).__name__}: calibrating with probes needs a last hidden state or "
                         f"sequence-level logits (batch, classes)")
    return F.log_softmax(logits, dim=-1)


# ---------------------------------------------------------------------------------------------------------- text
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


# ---------------------------------------------------------------------------------------------------------- healing
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


def _agreement(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (student.argmax(-1) == teacher.argmax(-1)).to(student.dtype).mean()


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
    if not texts:
        raise ValueError("heal needs some text (texts is empty)")
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
    student.eval()
    return history


class HealHistory(list):
    """:func:`heal`'s per-round records (``EpochRecord``), with ``best_round`` — the round whose weights the student
    ended with (0: its starting weights; ``None`` without ``keep_best``)."""

    best_round: int | None = None


# ---------------------------------------------------------------------------------------------------------- files
_FILE = "torchtn.safetensors"


def save(model: nn.Module, directory: str | os.PathLike, tokenizer=None, *, metadata: dict | None = None,
         overwrite: bool = False) -> Path:
    """Write ``directory/torchtn.safetensors`` (weights, torchtn layers recorded), the model's ``config.json`` and the
    tokenizer's files. Refuses an existing ``torchtn.safetensors`` unless ``overwrite``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _FILE
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another directory or pass overwrite=True")
    model.config.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    meta = {"hf_class": type(model).__name__, **(metadata or {})}
    save_model(model, path, meta, overwrite=overwrite)
    return path


def load(directory: str | os.PathLike) -> nn.Module:
    """The model :func:`save` wrote: its ``transformers`` class built from the saved config, with the torchtn layers
    put back where the file records them and every weight loaded (eval mode)."""
    tf = _transformers()
    directory = Path(directory)
    path = directory / _FILE
    if not path.is_file():
        raise ValueError(f"{directory} has no {_FILE}: not a model written by torchtn.hf.save")
    meta = read_metadata(path).get("metadata", {})
    cls = getattr(tf, str(meta.get("hf_class", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{path}: unknown transformers class {meta.get('hf_class')!r}")
    config = tf.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    # a dense skeleton (Conv1D maps as the nn.Linear maps compress saved); load_model puts the recorded torchtn layers
    # in place, then every weight
    model = linearize(cls(config))
    load_model(path, model, strict=True)
    return model.eval()


def export_dense(model: nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """A copy of ``model`` with every torchtn layer merged back into its dense module, written with the model's own
    ``save_pretrained`` (safetensors): plain ``transformers`` loads it, no torchtn needed."""
    import copy

    dense = copy.deepcopy(model)
    densify(dense)
    _conv1d_back(dense)
    directory = Path(directory)
    dense.save_pretrained(str(directory), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory
