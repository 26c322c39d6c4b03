"""Whether this call is being recorded into a graph — ``torch.compile`` / ``torch.export`` (Dynamo) or
``torch.jit.trace``. Layers then take their plain path: caches keyed on data pointers and versions are neither read
(the graph would depend on what happened before it) nor filled (a traced value is a placeholder)."""
from __future__ import annotations

import torch

__all__ = ["traced"]


_jit_tracing = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)  # the public wrapper costs ~90 ns, this ~25


def traced() -> bool:
    return torch.compiler.is_compiling() or _jit_tracing()
