"""``MPOEmbedding``: an ``nn.Embedding`` whose table is an MPO (TT-embedding), looked up without forming the table.

The ``(num_embeddings, embedding_dim)`` table is the TT-matrix ``W (∏m, ∏n)`` with the vocabulary as the row modes
``m`` and the embedding as the column modes ``n`` (the one layout of ``conventions.md``). When ``num_embeddings``
has no balanced factorization (30,522 = 2·3·5,087), the row modes cover a slightly larger vocabulary and the extra rows
are never looked up. A lookup of ids ``(…)`` gathers, per core, the slices ``G_k[:, i_k, :, :]`` of the ids' digits and
contracts them left to right: ``O(Σ_k r_{k−1} r_k ∏_{l≤k} n_l)`` per id, never ``num_embeddings × embedding_dim``.
In inference (no gradient needed) the table is rebuilt once, cached like ``MPOLinear``'s merged cores, and looked up
with one gather: as fast as ``nn.Embedding``, at the memory of one table while cached. In training, a batch whose
gathered core slices would outweigh the table (a transformer batch of thousands of tokens at bonds in the hundreds:
gigabytes) rebuilds the table differentiably instead.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive_int
from .._modules import carry_over
from ..core._tracing import func_transformed, jit_tracing, size_hint, traced
from ..core.factorize import factorize
from ..core.tt import TTMatrix, inner_ranks
from .registry import register_layer
from .tt_layer import TTLayer

__all__ = ["MPOEmbedding", "vocab_modes"]


def vocab_modes(num_embeddings: int, d: int) -> tuple[int, ...]:
    """``d`` balanced row modes whose product is the smallest number ≥ ``num_embeddings`` (within 2%) with the most
    balanced factorization (smallest largest mode)."""
    best = None
    for n in range(num_embeddings, num_embeddings + max(16, num_embeddings // 50)):
        modes = factorize(n, d)
        if best is None or max(modes) < max(best):
            best = modes
    return tuple(best)


def _digits(ids: torch.Tensor, modes: Sequence[int]) -> list[torch.Tensor]:
    """C-order digits of ``ids`` in the mixed radix ``modes`` (the first mode most significant)."""
    out, rest = [], ids
    for m in reversed(modes):
        out.append(rest % m)
        rest = rest // m
    return out[::-1]


def mpo_embedding(ids: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows ``ids`` of the TT-matrix ``cores`` (``(r, m_k, n_k, r')`` each): ``(…) -> (…, ∏n)``."""
    modes = [c.shape[1] for c in cores]
    flat = ids.reshape(-1)
    state = None  # (N, ∏_{l≤k} n_l, r_k)
    for core, digit in zip(cores, _digits(flat, modes)):
        if state is None:
            state = core[0, digit]  # r_0 = 1: (N, n_1, r_1)
        elif core.shape[1] == 1:  # no vocabulary mode here: one matmul, nothing to gather (e.g. a low-rank table)
            state = torch.einsum("bpr,rns->bpns", state, core[:, 0]).flatten(1, 2)
        else:
            state = torch.einsum("bpr,rbns->bpns", state, core[:, digit]).flatten(1, 2)  # (r, N, n_k, r') slices
    return state.reshape(*ids.shape, math.prod([c.shape[2] for c in cores]))  # (no -1: ids may be empty)


def _gathered_per_id(cores: Sequence[torch.Tensor]) -> int:
    """Elements of the core slices :func:`mpo_embedding` gathers for one id (``Σ_k r_{k−1}·n_k·r_k`` over the first
    core and those with a vocabulary mode)."""
    return sum(c.shape[0] * c.shape[2] * c.shape[3] for k, c in enumerate(cores) if k == 0 or c.shape[1] > 1)


def _slots(num_embeddings: int, exact_ids: torch.Tensor) -> torch.Tensor:
    """Where each id's row lives ``(num_embeddings,)``: ``−1 − j`` for ``exact_ids[j]``, else its row in the MPO
    (the other ids in increasing order)."""
    exact = torch.zeros(num_embeddings, dtype=torch.bool, device=exact_ids.device)
    exact[exact_ids] = True
    slot = torch.empty(num_embeddings, dtype=torch.long, device=exact_ids.device)
    slot[~exact] = torch.arange(num_embeddings - len(exact_ids), device=exact_ids.device)
    slot[exact_ids] = -1 - torch.arange(len(exact_ids), device=exact_ids.device)
    return slot


@register_layer("MPOEmbedding", converts=(nn.Embedding,))
class MPOEmbedding(TTLayer):
    """Drop-in ``nn.Embedding``: ids ``(…)`` (int64) -> ``(…, embedding_dim)``; the table is an MPO of bond ``rank``.

    ``vocab_shape``/``dim_shape``: the row and column modes (default: :func:`vocab_modes` and a balanced
    factorization, 3 cores). Initialized like ``nn.Embedding`` (entries of variance 1). ``padding_idx``: as in
    ``nn.Embedding``, that id's row is pinned — an MPO row cannot be, so the layer keeps it as the buffer
    ``padding_row`` (zeros, or the converted table's row) and returns it for that id; it gets no gradient.

    ``exact_rows`` (K): that many ids keep their rows exactly, in the parameter ``exact`` ``(K, embedding_dim)``, and
    the MPO holds only the other ``num_embeddings − K`` rows — low rank plus a few exact rows, for tables whose
    lookups are dominated by a few ids (the frequent tokens of a language model: 1,000 of 30,522 cover 78% of
    English text). The buffer ``slot`` ``(num_embeddings,)`` says where each id's row lives: ``slot ≥ 0`` a row of
    the MPO, ``slot < 0`` the exact row ``−slot − 1`` (by default ids ``0 … K−1`` are the exact ones;
    :meth:`from_tt` chooses them).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int | Sequence[int] = 8,
                 vocab_shape: Sequence[int] | None = None, dim_shape: Sequence[int] | None = None, *,
                 num_cores: int = 3, padding_idx: int | None = None, exact_rows: int = 0, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.num_embeddings = check_positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = check_positive_int("embedding_dim", embedding_dim)
        if not (isinstance(exact_rows, int) and 0 <= exact_rows < num_embeddings):
            raise ValueError(f"exact_rows={exact_rows!r} is not allowed: expected an int in [0, {num_embeddings})")
        self.exact_rows = exact_rows
        rows = num_embeddings - exact_rows  # held by the MPO
        if padding_idx is not None:
            if not isinstance(padding_idx, int) or not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx={padding_idx!r} is not allowed: expected an id in "
                                 f"[-{num_embeddings}, {num_embeddings}) or None")
            padding_idx %= num_embeddings
        self.padding_idx = padding_idx
        vocab_shape = tuple(vocab_shape) if vocab_shape is not None else vocab_modes(rows, num_cores)
        dim_shape = tuple(dim_shape) if dim_shape is not None else factorize(embedding_dim, len(vocab_shape))
        if len(vocab_shape) != len(dim_shape):
            raise ValueError(f"vocab_shape={vocab_shape} and dim_shape={dim_shape} must have the same length")
        if math.prod(vocab_shape) < rows:
            raise ValueError(f"vocab_shape={vocab_shape} covers {math.prod(vocab_shape)} ids; num_embeddings="
                             f"{num_embeddings} (less {exact_rows} exact rows) needs at least {rows}")
        if math.prod(dim_shape) != embedding_dim:
            raise ValueError(f"dim_shape={dim_shape} has product {math.prod(dim_shape)}, not embedding_dim="
                             f"{embedding_dim}")
        ranks = inner_ranks(rank, dim_shape, vocab_shape, name="rank")
        tt = TTMatrix.random(dim_shape, vocab_shape, ranks, variance=1.0, device=device, dtype=dtype)
        self._init_cores(tt)
        if padding_idx is not None:
            self.register_buffer("padding_row", torch.zeros(embedding_dim, device=device, dtype=dtype))
        else:
            self.padding_row = None
        if exact_rows:
            self.exact = nn.Parameter(torch.randn(exact_rows, embedding_dim, device=device, dtype=dtype))
            self.register_buffer("slot", _slots(num_embeddings, torch.arange(exact_rows, device=device)))
        else:
            self.exact = None
            self.register_buffer("slot", None)

    def reset_parameters(self) -> None:
        """``nn.Embedding``'s init: entries of variance 1 (cores and exact rows), the padding row zero, ids
        ``0 … K−1`` the exact ones (also what a layer built on the meta device and moved with ``to_empty`` needs)."""
        self._reset_cores(1.0)
        with torch.no_grad():
            if self.padding_row is not None:
                self.padding_row.zero_()
            if self.exact is not None:
                self.exact.normal_()
                self.slot.copy_(_slots(self.num_embeddings, torch.arange(self.exact_rows, device=self.slot.device)))

    @property
    def vocab_shape(self) -> tuple[int, ...]:
        return self.tt.out_shape

    @property
    def dim_shape(self) -> tuple[int, ...]:
        return self.tt.in_shape

    @property
    def num_weight_params(self) -> int:
        """Entries in the cores and the exact rows."""
        return self.tt.num_params + (0 if self.exact is None else self.exact.numel())

    @property
    def compression_ratio(self) -> float:
        """Table entries / (core entries + exact rows' entries)."""
        return self.num_embeddings * self.embedding_dim / self.num_weight_params

    @property
    def weight(self) -> torch.Tensor:
        """The ``(num_embeddings, embedding_dim)`` table, reconstructed (cached in eval; costs the whole table)."""
        return self._table(for_readers=True)

    def _table(self, for_readers: bool) -> torch.Tensor:
        """The whole table: the MPO's rows, the exact rows put in, the padding row (``for_readers``: from the copy
        that code outside the layer reads; see ``TTLayer._cached_dense``)."""
        table = self._cached_dense(for_readers)[: self.num_embeddings - self.exact_rows]
        if self.slot is not None:
            table = self._with_exact(self.slot, table[self.slot.clamp_min(0)])
        if self.padding_idx is None:
            return table
        return torch.cat([table[:self.padding_idx], self.padding_row[None], table[self.padding_idx + 1:]])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids must be int64 or int32 token ids, got {ids.dtype}")
        self._check_ids(ids)
        cores = self.core_list()
        ids_in = ids
        if self.slot is not None:  # the MPO's rows, in its own order; exact rows are put in below
            slot = self.slot[ids.long()]
            ids = slot.clamp_min(0)
        rows = self.num_embeddings - self.exact_rows  # the MPO's rows (its modes may cover more: padding)
        if not (torch.is_grad_enabled() and any([c.requires_grad for c in cores])) or jit_tracing():
            # inference: one gather from the table rebuilt once and cached while the cores do not change (under
            # torch.jit.trace, whose one graph serves every grad mode: the table rebuilt, differentiably)
            out = F.embedding(ids.long(), self._cached_dense()[:rows])
        elif (func_transformed()  # (F.embedding checks the ids itself: under torch.func nothing else can)
              or size_hint(ids.numel()) * _gathered_per_id(cores) > 4 * math.prod([c.shape[1] * c.shape[2]
                                                                                    for c in cores])):
            # many ids: the per-id path would gather more core slices than the table holds; rebuild it (differentiable)
            out = F.embedding(ids.long(), self.tt.to_dense()[:rows])
        else:
            out = mpo_embedding(ids.long(), cores)
        if self.slot is not None:
            out = self._with_exact(slot, out)
        if self.padding_idx is not None:
            out = torch.where((ids_in == self.padding_idx).unsqueeze(-1), self.padding_row.to(out.dtype), out)
        return out

    def _check_ids(self, ids: torch.Tensor) -> None:
        """Out-of-range ids raise (a factorized lookup would otherwise read another row). On the CPU a clear error
        that names the range; on an accelerator or under ``torch.compile`` a device-side assert, as ``nn.Embedding``
        does, so a forward never waits for the device (nor breaks the graph) to read the ids back."""
        if not ids.numel() or func_transformed():  # (under torch.func the lookup is F.embedding's, which checks)
            return
        if ids.device.type != "cpu" or traced():
            torch._assert_async(((ids >= 0) & (ids < self.num_embeddings)).all(),
                                f"MPOEmbedding: ids must be in [0, {self.num_embeddings})")
            return
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.num_embeddings:
            raise ValueError(f"ids must be in [0, {self.num_embeddings}); got values in [{low}, {high}]")

    def _with_exact(self, slot: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` ``(…, dim)`` looked up in the MPO, with the exact rows put in where ``slot`` ``(…)`` says."""
        return torch.where((slot < 0).unsqueeze(-1), self.exact[(-1 - slot).clamp_min(0)].to(rows.dtype), rows)

    def to_embedding(self) -> nn.Embedding:
        """An ``nn.Embedding`` holding the reconstructed table (and the padding row)."""
        ref = self.cores[0]
        out = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, device=ref.device,
                           dtype=ref.dtype)
        with torch.no_grad():
            out.weight.copy_(self._table(for_readers=False))
        return carry_over(out, self)

    to_dense_module = to_embedding

    # ------------------------------------------------------------------ conversion (tensorize) and files
    @staticmethod
    def cannot_convert(embedding: nn.Embedding) -> str | None:
        """Why ``embedding`` computes something an MPO table cannot (``tensorize`` then keeps it dense), or ``None``:
        ``max_norm`` renormalizes, in place, the rows it looks up; ``scale_grad_by_freq`` scales each row's gradient
        by its count in the batch — rows of an MPO share their cores."""
        if embedding.max_norm is not None:
            return f"max_norm={embedding.max_norm:g} renormalizes the rows it looks up, in place; an MPO's rows cannot"
        if embedding.scale_grad_by_freq:
            return "scale_grad_by_freq=True scales each row's gradient by its count; an MPO's rows share their cores"
        return None

    @staticmethod
    def dense_matrix(embedding: nn.Embedding) -> torch.Tensor:
        """The table as the TT-matrix's ``(∏m, ∏n)`` matrix: zero rows appended up to ∏m."""
        w = embedding.weight.detach()
        rows = math.prod(vocab_modes(embedding.num_embeddings, 3))
        return F.pad(w, (0, 0, 0, rows - w.shape[0]))

    @staticmethod
    def replaced_params(embedding: nn.Embedding) -> int:
        """Parameters the cores replace: the real table (``dense_matrix`` pads it with rows that are not parameters)."""
        return embedding.weight.numel()

    @staticmethod
    def tt_shapes_for(embedding: nn.Embedding, in_shape: Sequence[int] | None = None,
                      out_shape: Sequence[int] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(dim_shape, vocab_shape)`` (the shapes ``dense_matrix`` is read with)."""
        if in_shape is not None or out_shape is not None:
            raise ValueError("MPOEmbedding chooses its own modes (vocabulary padded to a balanced size); do not pass "
                             "shapes= for an nn.Embedding")
        vocab = vocab_modes(embedding.num_embeddings, 3)
        return tuple(factorize(embedding.embedding_dim, 3)), vocab

    @classmethod
    def from_tt(cls, embedding: nn.Embedding, tt: TTMatrix,
                exact_ids: Sequence[int] | torch.Tensor | None = None) -> "MPOEmbedding":
        """The layer replacing ``embedding``: table ``tt``; a padding row is kept exactly. With ``exact_ids``
        (distinct ids), those rows are kept exactly and ``tt`` holds the others, in increasing id order."""
        ref = embedding.weight
        k = 0 if exact_ids is None else len(exact_ids)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, list(tt.ranks[1:-1]), tt.out_shape,
                    tt.in_shape, padding_idx=embedding.padding_idx, exact_rows=k, device=ref.device, dtype=ref.dtype)
        layer.set_cores(tt.cores)
        with torch.no_grad():
            if k:
                exact = torch.as_tensor(exact_ids, dtype=torch.long, device=ref.device)
                if exact.unique().numel() != k or int(exact.min()) < 0 or int(exact.max()) >= layer.num_embeddings:
                    raise ValueError(f"exact_ids must be {k} distinct ids in [0, {layer.num_embeddings})")
                layer.slot.copy_(_slots(layer.num_embeddings, exact))
                layer.exact.copy_(ref[exact])
            if layer.padding_idx is not None:
                layer.padding_row.copy_(ref[layer.padding_idx])
        return carry_over(layer, embedding)

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, rank: int | None = None,
                   rel_tol: float | None = None) -> "MPOEmbedding":
        """TT-SVD of a trained ``nn.Embedding``'s table (bond cap ``rank`` and/or relative error ``rel_tol``)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        reason = cls.cannot_convert(embedding)
        if reason is not None:
            raise ValueError(f"this nn.Embedding cannot become an MPOEmbedding: {reason}")
        tt = TTMatrix.from_dense(cls.dense_matrix(embedding), *cls.tt_shapes_for(embedding), max_rank=rank,
                                 rel_tol=rel_tol)
        return cls.from_tt(embedding, tt)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        slot = state_dict.get(prefix + "slot")
        if self.exact_rows and slot is not None:  # every id in exactly one place: a permutation of the slots
            expected = torch.arange(-self.exact_rows, self.num_embeddings - self.exact_rows)
            if slot.shape != (self.num_embeddings,) or not torch.equal(slot.sort().values.cpu(), expected):
                raise ValueError(f"{prefix}slot does not place each of the {self.num_embeddings} ids once (in the "
                                 f"MPO's {self.num_embeddings - self.exact_rows} rows or the {self.exact_rows} exact "
                                 f"ones): the file is damaged or was edited; save the model again")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def layout(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "vocab_shape": list(self.vocab_shape), "dim_shape": list(self.dim_shape), "ranks": list(self.ranks),
                "padding_idx": self.padding_idx, "exact_rows": self.exact_rows}

    @classmethod
    def from_layout(cls, spec: dict[str, Any], *, device=None, dtype=None) -> "MPOEmbedding":
        return cls(spec["num_embeddings"], spec["embedding_dim"], list(spec["ranks"])[1:-1], spec["vocab_shape"],
                   spec["dim_shape"], padding_idx=spec.get("padding_idx"), exact_rows=spec.get("exact_rows", 0),
                   device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, vocab_shape={self.vocab_shape}, "
                f"dim_shape={self.dim_shape}, ranks={self.ranks}"
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
                + (f", exact_rows={self.exact_rows}" if self.exact_rows else ""))
