"""``torchtn.hf``: compress a Hugging Face ``transformers`` model with MPOs and heal it by distillation, offline.

Optional extra (``pip install torchtn[hf]``); nothing else in torchtn imports ``transformers``. The pieces:

* :func:`load_pretrained` — a local model folder (``config.json`` + weights + tokenizer) with no network access;
  GPT-2-style ``Conv1D`` maps become the equivalent ``nn.Linear`` (:func:`linearize`), a tokenizer without a padding
  token pads with its end-of-text token;
* :func:`compress` — ``tensorize`` restricted to the chosen parts (attention projections, MLP, embeddings; a name
  filter), by rank, ``rel_tol`` or a whole-model ``ratio`` whose budget is shared by the spectra; with
  :func:`calibrate`'s statistics of the user's text, every layer is truncated in the norm of its output error on that
  text (data-aware low-rank: the inputs' Gram matrix for linear maps, token frequencies for the embedding tables);
* :func:`refit` — after a calibrated compress, every two-core map re-solved in call order for the inputs the
  compressed model gives it (sequential error correction, :func:`torchtn.compress.refit`);
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

The package's modules, by job: :mod:`~torchtn.hf.models` (loading, ``Conv1D`` → ``nn.Linear``, parts, compress,
calibrate), :mod:`~torchtn.hf.text` (corpus, embeddings, logits, quality, throughput), :mod:`~torchtn.hf.healing`
(distillation) and :mod:`~torchtn.hf.files` (save, load, export).
"""
from .files import export_dense, load, save
from .healing import HealHistory, PassageAugment, heal
from .models import PARTS, calibrate, compress, linearize, load_pretrained, part_of, progress_bars, refit
from .text import HeadLogits, PooledEncoder, embed, head_quality, logits, quality, read_corpus, throughput

__all__ = ["load_pretrained", "progress_bars", "linearize", "compress", "calibrate", "refit", "heal", "embed",
           "quality", "throughput", "save", "load", "export_dense", "read_corpus", "PARTS", "part_of", "HeadLogits",
           "logits", "head_quality", "PassageAugment", "PooledEncoder", "HealHistory"]
