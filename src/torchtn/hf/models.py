"""Loading a ``transformers`` model offline, making its ``Conv1D`` maps ``nn.Linear``, naming its parts, and
compressing and calibrating it (the model side of :mod:`torchtn.hf`)."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import error_line
from .._modules import replace_submodule
from ..compress import LayerStats, TensorizeReport, check_skip, tensorize
from ..compress import calibrate as _calibrate
from ..compress.calibration import row_counts
from ..compress.refit import RefitReport
from ..compress.refit import refit as _refit
from .text import _encode, check_texts

__all__ = ["PARTS", "load_pretrained", "progress_bars", "linearize", "part_of", "compress", "calibrate", "refit"]


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
    module-name glob patterns to keep dense (each must match a module or parameter). ``ratio`` is a whole-model compression (all parameters counted) shared
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model (an nn.Module), got {type(model).__name__}")
    parts = tuple(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"parts={parts!r} is not allowed: choose from {PARTS}")
    import fnmatch

    linearize(model)
    check_skip(model, tuple(skip))  # a pattern that names nothing is a typo: it would compress what it meant to keep

    def keep_dense(name: str, module: nn.Module) -> bool:
        return part_of(name, module) not in parts or any(fnmatch.fnmatchcase(name, p) for p in skip)

    return tensorize(model, rank=rank, rel_tol=rel_tol, ratio=ratio, skip=keep_dense, allocation=allocation,
                     calibration=calibration, exact_rows=exact_rows)


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
    texts = check_texts("texts", texts)
    if token_texts is not None:
        token_texts = check_texts("token_texts", token_texts)
    if len(texts) == 0:
        raise ValueError("calibrate needs at least one text")
    linearize(model)  # GPT-2's Conv1D maps are calibrated as the nn.Linear maps compress makes of them
    batches = _sorted_batches(model, tokenizer, texts, batch_size, max_length)
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


def _sorted_batches(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int,
                    max_length: int) -> list[dict]:
    """``texts`` as the model's keyword batches, in order of length (batches of similar lengths: few padding
    positions in the statistics), on the model's device."""
    ordered = sorted(texts, key=len)
    device = next(model.parameters()).device
    batches = []
    for i in range(0, len(ordered), batch_size):
        x = _encode(tokenizer, ordered[i:i + batch_size], max_length).to(device)
        batches.append({"input_ids": x[:, 0], "attention_mask": x[:, 1]})
    return batches


def refit(student: nn.Module, teacher: nn.Module, tokenizer, texts: Sequence[str], *,
          calibration: dict[str, LayerStats] | None = None, prior: float = 0.0, batch_size: int = 32,
          max_length: int = 128, log=None) -> RefitReport:
    """:func:`torchtn.compress.refit` on ``texts``: every two-core MPO map of a calibrated :func:`compress`'s
    ``student`` re-solved, in call order, for the inputs the compressed model gives it, in the output norm of
    ``calibration``. Give it more passages than the calibration had (a refit is a regression: on MiniLM 256 passages
    overfitted, 1,024 gained); ``prior`` pulls toward the calibrated fit."""
    texts = check_texts("texts", texts)
    if len(texts) == 0:
        raise ValueError("refit needs at least one text")
    linearize(teacher)  # GPT-2's Conv1D maps, as compress made them: the nn.Linear maps the student's replaced
    return _refit(student, teacher, _sorted_batches(student, tokenizer, texts, batch_size, max_length),
                  calibration=calibration, prior=prior, log=log)


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
