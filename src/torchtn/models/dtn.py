"""Deep Tensor Network: pre-norm blocks of a token mixer (Tensor Attention, or a baseline) and Tensor Interaction,
stacked; plus the two task heads the reproduction trains (a sequence classifier and a per-token predictor)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._checks import check_choice, check_positive_int
from ..layers.attention import ATTENTIONS
from ..layers.tensor_interaction import TensorInteraction

__all__ = ["TensorBlock", "DeepTensorNetwork", "SequenceClassifier", "TokenPredictor"]


class TensorBlock(nn.Module):
    """``x + mixer(LN x)``, then ``x + TensorInteraction(LN x)``: ``(batch, n, dim) -> (batch, n, dim)``.

    ``attention``: ``"tensor"`` (default), ``"linear"`` or ``"softmax"`` — the same block around each, so that they
    compare at equal width. ``interaction_rank=0`` leaves the interaction out; ``interaction_mode`` picks its reading.
    Other keywords go to the attention module.
    """

    def __init__(self, dim: int, heads: int = 1, *, attention: str = "tensor", causal: bool = True,
                 interaction_rank: int | None = None, interaction_mode: str = "bilinear", **attention_kwargs) -> None:
        super().__init__()
        check_choice("attention", attention, tuple(ATTENTIONS))
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = ATTENTIONS[attention](dim, heads, causal, **attention_kwargs)
        self.norm2 = nn.LayerNorm(dim) if interaction_rank != 0 else None
        self.interaction = (TensorInteraction(dim, interaction_rank, mode=interaction_mode)
                            if interaction_rank != 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        if self.interaction is not None:
            x = x + self.interaction(self.norm2(x))
        return x

    def step(self, x_t: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """One token ``(batch, dim)``; ``state=None`` starts a sequence."""
        a_state, i_state = (None, None) if state is None else state
        y, a_state = self.mixer.step(self.norm1(x_t), a_state)
        x_t = x_t + y
        if self.interaction is not None:
            y, i_state = self.interaction.step(self.norm2(x_t), i_state)
            x_t = x_t + y
        return x_t, (a_state, i_state)


class DeepTensorNetwork(nn.Module):
    """A stack of ``depth`` :class:`TensorBlock` s and a final LayerNorm: ``(batch, n, dim) -> (batch, n, dim)``.

    ``causal=True`` is the decoder (``step`` generates token by token at ``O(d²)`` per token and layer for tensor
    attention); ``causal=False`` the encoder. Keywords go to every block.
    """

    def __init__(self, dim: int, depth: int, heads: int = 1, *, attention: str = "tensor", causal: bool = True,
                 **block_kwargs) -> None:
        super().__init__()
        check_positive_int("depth", depth)
        self.blocks = nn.ModuleList([TensorBlock(dim, heads, attention=attention, causal=causal, **block_kwargs)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def step(self, x_t: torch.Tensor, state: list | None = None) -> tuple[torch.Tensor, list]:
        """One token ``(batch, dim) -> (batch, dim)`` through every block, and the new per-block states."""
        states = [None] * len(self.blocks) if state is None else state
        if not isinstance(states, (list, tuple)) or len(states) != len(self.blocks):
            got = f"a {type(states).__name__}" + (f" of {len(states)}" if isinstance(states, (list, tuple)) else "")
            raise TypeError(f"state is {got}: expected None (a new sequence) or the list of {len(self.blocks)} "
                            f"per-block states that step() returned")
        new = []
        for block, s in zip(self.blocks, states):
            x_t, s = block.step(x_t, s)
            new.append(s)
        return self.norm(x_t), new


class _Positions(nn.Module):
    def __init__(self, max_len: int, dim: int) -> None:
        super().__init__()
        self.max_len = check_positive_int("max_len", max_len)
        self.table = nn.Parameter(torch.randn(max_len, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.max_len:
            raise ValueError(f"the sequence has {x.shape[1]} tokens; this model takes at most max_len={self.max_len}")
        return x + self.table[: x.shape[1]]


class SequenceClassifier(nn.Module):
    """Classify a sequence of feature vectors: ``(batch, n, in_features)`` — or images ``(batch, 1, H, W)`` read as
    ``H`` tokens of ``W`` pixels (Fashion-MNIST rows) — ``-> (batch, num_classes)`` from the last token's state."""

    def __init__(self, in_features: int, num_classes: int, dim: int = 64, depth: int = 2, heads: int = 4, *,
                 attention: str = "tensor", max_len: int = 1024, **block_kwargs) -> None:
        super().__init__()
        self._config = dict(name="sequence_classifier", in_features=in_features, num_classes=num_classes, dim=dim,
                            depth=depth, heads=heads, attention=attention, max_len=max_len, **block_kwargs)
        self.embed = nn.Linear(in_features, dim)
        self.positions = _Positions(max_len, dim)
        self.body = DeepTensorNetwork(dim, depth, heads, attention=attention, causal=True, **block_kwargs)
        self.head = nn.Linear(dim, num_classes)

    def config(self) -> dict:
        return dict(self._config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            if x.shape[1] != 1:
                raise ValueError(f"images of shape {tuple(x.shape)}: expected one channel, (batch, 1, H, W)")
            x = x[:, 0]
        return self.head(self.body(self.positions(self.embed(x)))[:, -1])


class TokenPredictor(nn.Module):
    """Token ids ``(batch, n)`` -> logits ``(batch, n, vocab)`` for every position (a causal sequence model)."""

    def __init__(self, vocab: int, dim: int = 64, depth: int = 2, heads: int = 4, *, attention: str = "tensor",
                 max_len: int = 1024, **block_kwargs) -> None:
        super().__init__()
        self._config = dict(name="token_predictor", vocab=vocab, dim=dim, depth=depth, heads=heads,
                            attention=attention, max_len=max_len, **block_kwargs)
        self.embed = nn.Embedding(check_positive_int("vocab", vocab), dim)
        self.positions = _Positions(max_len, dim)
        self.body = DeepTensorNetwork(dim, depth, heads, attention=attention, causal=True, **block_kwargs)
        self.head = nn.Linear(dim, vocab)

    def config(self) -> dict:
        return dict(self._config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.positions(self.embed(ids))))
