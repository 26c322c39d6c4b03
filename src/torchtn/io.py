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
from .layers.registry import factory_of, layer_type, type_name

__all__ = ["save_model", "load_model", "read_metadata", "read_tensors", "atomic_write_bytes", "atomic_write_text",
           "layer_layout", "apply_layout", "recorded_layers"]


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


def layer_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Where the model's registered torchtn layers are: ``{name: {"type": registry name, "spec": layout}}``."""
    return {name: {"type": type_name(m), "spec": m.layout()}
            for name, m in model.named_modules() if name and type_name(m) is not None}


def _recorded_layers(meta: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The layer records of a file's metadata (files from torchtn 0.1 list only MPOLinear under ``mpo_layers``)."""
    layers = dict(meta.get("layers", {}))
    for name, spec in meta.get("mpo_layers", {}).items():
        layers.setdefault(name, {"type": "MPOLinear", "spec": spec})
    return layers


def apply_layout(model: nn.Module, layout: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """Put, in place, an empty registered layer of each recorded type and layout where the file says it goes."""
    for name, record in layout.items():
        if not isinstance(record, Mapping) or "type" not in record or "spec" not in record:
            raise ValueError(f"the file's record of layer {name!r} is malformed: expected {{'type': ..., 'spec': ...}}")
        cls = layer_type(str(record["type"]), where=name)
        try:
            parent, child = parent_and_attr(model, name)
        except AttributeError:
            raise ValueError(f"the file has a {record['type']} layer at {name!r}, but the model has no module "
                             f"there") from None
        old = getattr(parent, child, None)
        if not isinstance(old, nn.Module):
            raise ValueError(f"the file has a {record['type']} layer at {name!r}, but the model has no module there")
        try:
            new = cls.from_layout(dict(record["spec"]), **factory_of(old))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"layer {name!r}: its recorded {record['type']} layout is invalid ({err})") from None
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
        "layers": layer_layout(model),
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


def recorded_layers(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{name: {"type", "spec"}}`` of the torchtn layers recorded in a model file."""
    return _recorded_layers(read_metadata(path))


def load_model(path: str | os.PathLike, model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Load a file written by :func:`save_model` into ``model`` (a freshly built dense skeleton is fine).

    The registered torchtn layers recorded in the file (any type: ``MPOLinear`` and every later one) are first put
    where the file says, with the recorded shapes and ranks. A file naming an unknown layer type, or holding tensors
    whose shapes disagree with its metadata, raises ``ValueError`` saying which. Returns the (same) model.
    """
    meta = read_metadata(path)
    apply_layout(model, _recorded_layers(meta))
    state = {k: v for k, v in read_tensors(path).items() if not k.startswith("__")}
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)} but the model described by the "
                             f"file's metadata needs {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=strict)
    return model
