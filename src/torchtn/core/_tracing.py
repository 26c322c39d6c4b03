"""Whether this call is recorded into a graph — ``torch.compile`` / ``torch.export`` (Dynamo), ``torch.jit.trace`` —
or transformed by ``torch.func`` (``vmap``, ``grad``, ``jacrev``…: ensembles of stacked models, per-example
gradients). Layers then take their plain path: caches keyed on data pointers and versions are neither read (the
graph would depend on what happened before it; a transformed tensor has no storage to key on) nor filled (a traced
value is a placeholder), and no custom autograd Function with scratch buffers runs."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["traced", "jit_tracing", "func_transformed", "kept", "size_hint"]

# the public wrappers cost ~90 ns; these ~25 each, on the inference fast path
_jit_tracing = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)
_func_transform = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", lambda: None)


def traced() -> bool:
    return torch.compiler.is_compiling() or _jit_tracing() or _func_transform() is not None


def jit_tracing() -> bool:
    """Inside ``torch.jit.trace`` only: one graph recorded for every later call, whatever its grad mode. (Dynamo
    cannot trace the private flag: it is asked only outside ``torch.compile``, where it is never set anyway.)"""
    return not torch.compiler.is_compiling() and _jit_tracing()


def func_transformed() -> bool:
    """Inside a ``torch.func`` transform only (no data-dependent checks there: no ``.item()``, no async asserts)."""
    return _func_transform() is not None


@contextlib.contextmanager
def kept() -> Iterator[None]:
    """Where a tensor kept between calls is made (merged cores, a rebuilt weight, a transformed one, a reader's
    copy): without autograd history, and as a normal tensor even inside ``torch.inference_mode()`` — an inference
    tensor has no version counter to key a cache on and cannot be saved for a backward pass, so a cache filled under
    inference mode broke every later call outside it. While tracing nothing is kept, and the block runs as it is:
    a grad-mode region there only added an empty subgraph to the trace, on which ``torch.export``'s
    ``run_decompositions`` (ONNX export, lowering) failed when the export ran under ``torch.no_grad()``."""
    if traced():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield


def size_hint(n: int | torch.SymInt, fallback: int = 64) -> int:
    """``n`` as a plain int for pricing a plan: a symbolic size (``torch.export`` with a dynamic ``Dim``) by the
    example value it was traced with, without a guard on it (``int(n)`` would specialize the graph to that size,
    which ``torch.export`` refuses for a dynamic dimension); ``fallback`` where it has none (a data-dependent size).
    A plan is correct at any batch size; only its cost depends on the size. (``torch.compile(dynamic=True)`` traces
    through this function and still guards on the plan's price: a new graph where another plan would be cheaper.)"""
    if isinstance(n, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return int(optimization_hint(n, fallback=fallback))
    return int(n)
