"""Helpers for walking and editing an ``nn.Module`` tree by qualified name (``"encoder.layer.0.fc"``)."""
from __future__ import annotations

import sys

import torch
from torch import nn

__all__ = ["parent_and_attr", "replace_submodule", "holding", "pruned_tensors", "check_not_pruned", "unwrapped",
           "unwrapped_state", "carry_over"]


def carry_over(new: nn.Module, old: nn.Module | torch.Tensor) -> nn.Module:
    """Carry over to ``new`` what a user set on the module (or tensor) ``old`` it replaces — a dense layer and its
    tensor-network form, either way: frozen parameters (``new``'s ``bias`` follows ``old``'s bias; every other
    parameter — cores, gates, a table's exact rows — follows ``old``'s other parameters, frozen if all of them are;
    nothing is unfrozen) and, for a module, its training or eval mode. Returns ``new``."""
    if isinstance(old, torch.Tensor):
        frozen = {"weight": not old.requires_grad}
    else:
        new.train(old.training)
        frozen = {}
        for name, p in old.named_parameters():
            role = "bias" if name == "bias" else "weight"
            frozen[role] = frozen.get(role, True) and not p.requires_grad
    for name, p in new.named_parameters():
        if frozen.get("bias" if name == "bias" else "weight", False):
            p.requires_grad_(False)
    return new


def unwrapped(model: nn.Module) -> nn.Module:
    """The module a wrapper runs: ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``) and ``DistributedDataParallel``
    / ``DataParallel`` (``module``) peeled off, so that files, reports and conversions name the layers as the model
    itself does (not ``_orig_mod.fc1``). For a state dict saved from a wrapper: :func:`unwrapped_state`."""
    # (a model torch.compile wrapped means its module is loaded: importing it here would cost ~1 s of every save/load)
    optimized = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", ())
    while True:
        if isinstance(model, optimized):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # what those wrappers put before their module's state-dict keys


def unwrapped_state(state: dict[str, torch.Tensor], expected) -> dict[str, torch.Tensor]:
    """A state dict saved from a wrapped model (``ddp_model.state_dict()``: every key ``module.…``; a compiled one:
    ``_orig_mod.…``; or both) with the wrappers' prefixes taken off, when the model (its keys: ``expected``) expects
    none."""
    expected = set(expected)
    while state and not set(state) & expected:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds submodule ``name``, and the attribute it is held under."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where submodule ``name`` is, in place, and return the model — ``new`` itself for ``name == ""``
    (the model is the module replaced: nothing holds it, so the caller must take the returned one)."""
    if not name:
        return new
    parent, child = parent_and_attr(model, name)
    setattr(parent, child, new)
    return model


def holding(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """``module`` (a fresh dense layer of the right geometry) with ``weight`` and ``bias`` copied into its own
    (``bias=None``: its bias is left alone; a layer built without one has none)."""
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    return module


def pruned_tensors(model: nn.Module) -> list[str]:
    """Names (``module.tensor``) of the tensors ``torch.nn.utils.prune`` holds in ``model`` (each is recomputed as
    ``orig · mask`` by a forward pre-hook, so it is not a leaf: such a model cannot be deep-copied)."""
    from torch.nn.utils import prune

    names = []
    for mod_name, m in model.named_modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):  # (a PruningContainer too: several prunings of one)
                names.append(f"{mod_name}.{hook._tensor_name}".lstrip("."))
    return names


def check_not_pruned(model: nn.Module, doing: str) -> None:
    """A clear error when ``model`` holds tensors pruned by ``torch.nn.utils.prune`` (``doing``: what cannot be done
    with them, e.g. "tensorized")."""
    pruned = pruned_tensors(model)
    if pruned:
        module, _, tensor = pruned[0].rpartition(".")
        raise ValueError(f"the model cannot be {doing} while torch.nn.utils.prune holds {', '.join(pruned)}: make the "
                         f"pruning permanent first (torch.nn.utils.prune.remove(model.get_submodule({module!r}), "
                         f"{tensor!r}), for each)")
