"""Model files: safetensors tensors plus JSON metadata (shapes, ranks, versions). Never executes code from a file."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ._modules import parent_and_attr
from ._version import __version__
from .layers import MPOLinear

__all__ = ["save_model", "load_model", "read_metadata", "atomic_write_bytes", "atomic_write_text", "mpo_layout",
           "apply_mpo_layout"]


def _atomic(path: Path, write) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic(Path(path), lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def mpo_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Where the model's ``MPOLinear`` layers are and their shapes/ranks (enough to rebuild them from a skeleton)."""
    return {
        name: {"in_shape": list(m.in_shape), "out_shape": list(m.out_shape), "ranks": list(m.ranks),
               "bias": m.bias is not None}
        for name, m in model.named_modules() if isinstance(m, MPOLinear)
    }


def apply_mpo_layout(model: nn.Module, layout: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """Replace, in place, each named ``nn.Linear`` of ``model`` by an ``MPOLinear`` of the recorded shapes/ranks."""
    for name, spec in layout.items():
        parent, child = parent_and_attr(model, name)
        old = getattr(parent, child, None)
        if isinstance(old, MPOLinear):
            continue
        if not isinstance(old, nn.Linear):
            raise ValueError(f"the file has an MPO layer at {name!r}, but the model has {type(old).__name__} there")
        ref = old.weight
        ranks = spec["ranks"]
        new = MPOLinear(old.in_features, old.out_features, ranks[1:-1] or 1, spec["in_shape"], spec["out_shape"],
                        bias=spec["bias"], device=ref.device, dtype=ref.dtype)
        if list(new.ranks) != list(ranks):
            raise ValueError(f"layer {name!r}: recorded ranks {ranks} are not valid for its shapes")
        setattr(parent, child, new)
    return model


def save_model(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None,
               *, overwrite: bool = False, extra_tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write ``model``'s ``state_dict`` to a ``.safetensors`` file (atomically) and a ``.json`` beside it.

    The safetensors header carries the same JSON (``torchtn`` key), so the file alone is enough to reload.
    Refuses to replace an existing file unless ``overwrite=True``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path={str(path)!r} must end in .safetensors")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    for k, v in (extra_tensors or {}).items():
        tensors[k] = v.detach().to("cpu").contiguous().clone()
    info = {
        "format": "torchtn-model/1",
        "torchtn_version": __version__,
        "torch_version": torch.__version__,
        "model_class": type(model).__name__,
        "mpo_layers": mpo_layout(model),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "metadata": dict(metadata or {}),
    }
    text = json.dumps(info, indent=2, sort_keys=True, default=str)
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={"torchtn": text}))
    atomic_write_text(path.with_suffix(".json"), text + "\n")
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON stored in a torchtn ``.safetensors`` file's header."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "torchtn" not in meta:
        raise ValueError(f"{path} is a safetensors file but was not written by torchtn.save_model (no 'torchtn' metadata)")
    return json.loads(meta["torchtn"])


def read_tensors(path: str | os.PathLike, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file whose names start with ``prefix`` (prefix stripped)."""
    with safe_open(str(path), framework="pt") as fh:
        return {k[len(prefix):]: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)}


def load_model(path: str | os.PathLike, model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Load a file written by :func:`save_model` into ``model`` (a freshly built dense skeleton is fine).

    ``nn.Linear`` layers recorded as MPO layers in the file are first swapped for ``MPOLinear`` of the recorded
    shapes and ranks. Returns the (same) model.
    """
    meta = read_metadata(path)
    apply_mpo_layout(model, meta.get("mpo_layers", {}))
    state = {k: v for k, v in read_tensors(path).items() if not k.startswith("__")}
    model.load_state_dict(state, strict=strict)
    return model
