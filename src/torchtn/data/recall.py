"""Synthetic multi-query associative recall (MQAR, as in Arora et al., "Zoology", 2023).

A sequence lists ``pairs`` key–value pairs ``k_1 v_1 … k_P v_P``, then filler tokens, then queries: keys seen
before, each at a random position of the second part. At a query position the model must output that key's value;
every other position is ignored (target ``-100``). Keys and values come from disjoint vocabularies, so a model cannot
answer without looking back.
"""
from __future__ import annotations

import torch

from .._checks import check_positive_int
from .datasets import Dataset

__all__ = ["associative_recall", "IGNORE"]

IGNORE = -100


def _sequences(count: int, seq_len: int, pairs: int, keys: int, values: int, queries: int,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(count, seq_len, dtype=torch.long)  # token 0 is the filler
    target = torch.full((count, seq_len), IGNORE, dtype=torch.long)
    key_ids = torch.argsort(torch.rand(count, keys, generator=gen), dim=1)[:, :pairs] + 1
    value_ids = torch.randint(0, values, (count, pairs), generator=gen) + 1 + keys
    ids[:, 0:2 * pairs:2], ids[:, 1:2 * pairs:2] = key_ids, value_ids
    which = torch.randint(0, pairs, (count, queries), generator=gen)  # which pair each query asks for
    free = seq_len - 2 * pairs
    where = torch.argsort(torch.rand(count, free, generator=gen), dim=1)[:, :queries] + 2 * pairs
    rows = torch.arange(count)[:, None]
    ids[rows, where] = key_ids.gather(1, which)
    target[rows, where] = value_ids.gather(1, which)
    return ids, target


def associative_recall(seq_len: int = 64, pairs: int = 8, *, keys: int = 64, values: int = 64,
                       queries: int | None = None, train: int = 8000, test: int = 1000, val: int = 500,
                       seed: int = 0) -> Dataset:
    """MQAR sequences ``x (count, seq_len)`` int64 token ids (vocabulary ``1 + keys + values``) and targets
    ``y (count, seq_len)`` (``-100`` where nothing is asked). ``queries`` defaults to ``pairs``."""
    for name, value in (("seq_len", seq_len), ("pairs", pairs), ("keys", keys), ("values", values),
                        ("train", train), ("test", test), ("val", val)):
        check_positive_int(name, value)
    queries = pairs if queries is None else check_positive_int("queries", queries)
    if pairs > keys:
        raise ValueError(f"pairs={pairs} is not allowed: at most keys={keys} distinct keys")
    if 2 * pairs + queries > seq_len:
        raise ValueError(f"seq_len={seq_len} is too short for {pairs} pairs and {queries} queries "
                         f"(needs at least {2 * pairs + queries})")
    gen = torch.Generator().manual_seed(seed)
    parts = [_sequences(count, seq_len, pairs, keys, values, queries, gen) for count in (train, val, test)]
    (xtr, ytr), (xva, yva), (xte, yte) = parts
    return Dataset(f"mqar-n{seq_len}-p{pairs}", xtr, ytr, xva, yva, xte, yte, (seq_len,), 1 + keys + values)
