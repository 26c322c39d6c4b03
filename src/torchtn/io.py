"""Model files: safetensors tensors plus JSON metadata (shapes, ranks, versions). Never executes code from a file.

Reading is defensive: the metadata is checked type by type and against limits, every recorded layer is first built
on the ``meta`` device (no memory) and its parameter shapes compared with the tensors' real shapes (read from the
safetensors header, without loading them), and tensors must be finite floating-point numbers. Any problem raises
:class:`ModelFileError` (a ``ValueError``) naming the file and what is wrong.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.nn.utils import parametrize

from ._checks import error_line
from ._modules import parent_and_attr, pruned_tensors, unwrapped
from ._version import __version__
from .layers.registry import factory_of, layer_type, type_name

__all__ = ["save_model", "load_model", "read_metadata", "tensor_name", "read_tensors", "atomic_write",
           "atomic_write_bytes", "atomic_write_text", "layer_layout", "load_layers", "fold_pruned", "ModelFileError"]

# Limits on what a model file's metadata may claim, checked before any work proportional to it.
MAX_METADATA_BYTES = 16 << 20
MAX_LAYERS = 100_000
MAX_NAME_LENGTH = 1_000
MAX_MODES = 64
MAX_DIM = 1 << 31


class ModelFileError(ValueError):
    """A model file is missing, unreadable, not written by torchtn, or inconsistent; the message says which file and
    what is wrong."""


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def atomic_write(path: str | os.PathLike, write) -> None:
    """``write(fh)`` into a binary file handle, atomically: through a temporary file in the same directory (a unique
    name, removed on failure), fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; files others may read follow the user's umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def layer_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Where the model's registered torchtn layers are: ``{name: {"type": registry name, "spec": layout}}``.

    A registered parametrization must be its tensor's only one: a file records where it sits, not other
    parametrizations stacked with it, so such a model could not load back as it was (it raises ``ValueError``); for
    the same reason a layer whose own tensors are pruned (``torch.nn.utils.prune``) or parametrized is refused."""
    layout = {}
    for name, m in model.named_modules():  # (the model itself, when it is a registered layer, under "")
        if type_name(m) is None:
            continue
        owner, dot, _ = name.rpartition(".")
        holder = model.get_submodule(owner) if dot else None
        if isinstance(holder, parametrize.ParametrizationList) and len(holder) > 1:
            raise ValueError(f"{name!r}: the {type_name(m)} shares its tensor with {len(holder) - 1} other "
                             f"parametrization(s) ({', '.join(type(p).__name__ for p in holder if p is not m)}); a "
                             f"file records the torchtn one only, so the model would load back without them: hold that "
                             f"tensor by the torchtn parametrization alone to save it")
        held = [_key(name, t) for t in pruned_tensors(m)]
        held += [_key(name, n).rstrip(".") for n, sub in m.named_modules() if parametrize.is_parametrized(sub)]
        if held:
            raise ValueError(f"{name!r}: the {type_name(m)}'s own tensors are held by torch.nn.utils.prune or a "
                             f"parametrization ({', '.join(held)}); a file records the layer's plain tensors, so it "
                             f"could not load back: make the pruning permanent (torch.nn.utils.prune.remove) or remove "
                             f"the parametrization first")
        layout[name] = {"type": type_name(m), "spec": m.layout()}
    return layout


def _recorded_layers(meta: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The layer records of a file's metadata (files from torchtn 0.1 list only MPOLinear under ``mpo_layers``)."""
    layers = dict(meta.get("layers", {}))
    for name, spec in meta.get("mpo_layers", {}).items():
        layers.setdefault(name, {"type": "MPOLinear", "spec": spec})
    return layers


def save_model(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None,
               *, overwrite: bool = False, extra_tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write ``model``'s ``state_dict`` to a ``.safetensors`` file (atomically) and a ``.json`` beside it.

    The safetensors header carries the same JSON (``torchtn`` key), so the file alone is enough to reload.
    Refuses to replace an existing file unless ``overwrite=True``. A compiled (``torch.compile``) or DDP-wrapped model
    is saved as the model it wraps.
    """
    model = unwrapped(model)
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
    """The JSON stored in a torchtn ``.safetensors`` file's header (a dict; :class:`ModelFileError` otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no model file at {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for damaged files; OSError for unreadable ones
        raise ModelFileError(f"{path} is not a readable safetensors file ({error_line(err)})") from None
    if "torchtn" not in meta:
        raise ModelFileError(f"{path} is a safetensors file but was not written by torchtn.save_model "
                             f"(no 'torchtn' metadata)")
    text = meta["torchtn"]
    if len(text) > MAX_METADATA_BYTES:
        raise ModelFileError(f"{path}: its torchtn metadata is {len(text):,} bytes, more than the "
                             f"{MAX_METADATA_BYTES:,} allowed")
    try:
        info = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ModelFileError(f"{path}: its torchtn metadata is not valid JSON ({type(err).__name__})") from None
    if not isinstance(info, dict):
        raise ModelFileError(f"{path}: its torchtn metadata is a JSON {type(info).__name__}, expected an object")
    return info


def read_tensors(path: str | os.PathLike, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file whose names start with ``prefix`` (prefix stripped)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k[len(prefix):]: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)}
    except Exception as err:
        raise ModelFileError(f"{path}: its tensors cannot be read ({type(err).__name__})") from None


def _tensor_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` from the safetensors header, without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            out = {}
            for k in fh.keys():
                sl = fh.get_slice(k)
                out[k] = (tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))
            return out
    except Exception as err:
        raise ModelFileError(f"{path}: its tensor index cannot be read ({type(err).__name__})") from None


def _check_spec_values(path: Path, name: str, value: Any, depth: int = 0) -> None:
    """Layouts are flat JSON: numbers, strings, booleans, null and lists of numbers — within the limits."""
    if depth > 2:
        raise ModelFileError(f"{path}: the layout of layer {name!r} is nested too deeply")
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if not -MAX_DIM <= value <= MAX_DIM:
            raise ModelFileError(f"{path}: layer {name!r} records the number {value}, outside ±{MAX_DIM:,}")
        return
    if isinstance(value, float):
        return
    if isinstance(value, str):
        if len(value) > MAX_NAME_LENGTH:
            raise ModelFileError(f"{path}: layer {name!r} records a string of {len(value):,} characters")
        return
    if isinstance(value, list):
        if len(value) > MAX_MODES + 1:
            raise ModelFileError(f"{path}: layer {name!r} records a list of {len(value):,} entries (at most "
                                 f"{MAX_MODES + 1})")
        for v in value:
            _check_spec_values(path, name, v, depth + 1)
        return
    if isinstance(value, dict) and depth == 0:
        for k, v in value.items():
            _check_spec_values(path, name, v, depth + 1)
        return
    raise ModelFileError(f"{path}: layer {name!r} records a value of JSON type {type(value).__name__} in its layout")


def _validated_records(path: Path, meta: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The layer records, checked type by type and against the limits."""
    for key in ("layers", "mpo_layers"):
        if key in meta and not isinstance(meta[key], dict):
            raise ModelFileError(f"{path}: metadata '{key}' is a JSON {type(meta[key]).__name__}, expected an object")
    records = _recorded_layers(meta)
    if len(records) > MAX_LAYERS:
        raise ModelFileError(f"{path}: {len(records):,} layers recorded, more than the {MAX_LAYERS:,} allowed")
    if "" in records and len(records) > 1:
        raise ModelFileError(f"{path}: the file records the model itself as a {records[''].get('type')} layer and "
                             f"{len(records) - 1} more layer(s) inside it; a registered layer holds none")
    for name, record in records.items():
        if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH:  # ("": the model itself is the layer)
            raise ModelFileError(f"{path}: a layer name is not a string or longer than {MAX_NAME_LENGTH} characters")
        if not isinstance(record, dict) or not isinstance(record.get("type"), str) or not isinstance(
                record.get("spec"), dict):
            raise ModelFileError(f"{path}: the record of layer {name!r} is malformed: expected "
                                 f"{{'type': str, 'spec': object}}")
        _check_spec_values(path, name, record["spec"])
    return records


def _build_checked(path: Path, name: str, record: Mapping[str, Any], shapes: Mapping[str, tuple],
                   like: nn.Module | None = None) -> nn.Module:
    """One recorded layer, built empty on the ``meta`` device first and checked against the file's tensor shapes."""
    try:
        cls = layer_type(record["type"], where=name)
    except ValueError as err:
        raise ModelFileError(f"{path}: {err}") from None
    try:
        ghost = cls.from_layout(dict(record["spec"]), device="meta")
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as err:
        raise ModelFileError(f"{path}: layer {name!r}: its recorded {record['type']} layout is invalid "
                             f"({type(err).__name__}: {str(err)[:300]})") from None
    for key, param in ghost.state_dict().items():
        full = _key(name, key)
        if full not in shapes:
            raise ModelFileError(f"{path}: layer {name!r} needs tensor {full!r}, which the file does not hold")
        shape, dtype = shapes[full]
        if shape != tuple(param.shape):
            raise ModelFileError(f"{path}: tensor {full!r} has shape {shape} but the layer described by the file's "
                                 f"metadata needs {tuple(param.shape)} (the tensors disagree with their recorded "
                                 f"layout)")
        floating = dtype.startswith(("F", "BF"))  # safetensors dtype names: F16, BF16, F32, F64, I64, …
        if floating != param.is_floating_point():
            kind = "floating point" if param.is_floating_point() else "integer (an index buffer)"
            raise ModelFileError(f"{path}: tensor {full!r} has dtype {dtype}; the layer needs it {kind}")
    return cls.from_layout(dict(record["spec"]), **(factory_of(like) if like is not None else {}))


def _key(layer: str, key: str) -> str:
    """The state-dict key of ``key`` in the recorded layer ``layer`` (``""``: the model itself)."""
    return f"{layer}.{key}" if layer else key


def _checked_state(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelFileError(f"{path}: tensor {key!r} holds NaN or infinite values")
    return dict(tensors)


def load_layers(path: str | os.PathLike) -> dict[str, nn.Module]:
    """Every torchtn layer recorded in a model file, rebuilt and loaded, checked as :func:`load_model` does."""
    path = Path(path)
    records = _validated_records(path, read_metadata(path))
    shapes = _tensor_shapes(path)
    out = {}
    for name, record in records.items():
        layer = _build_checked(path, name, record, shapes)
        state = _checked_state(path, read_tensors(path, prefix=_key(name, "")))
        try:
            layer.load_state_dict(state)
        except RuntimeError as err:
            raise ModelFileError(f"{path}: the tensors of layer {name!r} disagree with its recorded layout "
                                 f"({str(err).strip().splitlines()[-1].strip()[:300]})") from None
        out[name] = layer
    return out


_PARAMETRIZATION = re.compile(r"^(?:(.+)\.)?parametrizations\.([A-Za-z_][A-Za-z0-9_]*)\.0$")


ROOT_NAME = "(model)"  # how reports name a model that is itself the layer (its module name is "")


def tensor_name(layer_name: str) -> str:
    """The name a report gives a layer recorded in a file: ``owner.tensor`` for the parametrization of a tensor
    (``att.parametrizations.in_proj_weight.0`` → ``att.in_proj_weight``, as ``tensorize`` reports it), ``(model)``
    for the model itself, else the module's own name."""
    match = _PARAMETRIZATION.match(layer_name)
    if match is None:
        return layer_name or ROOT_NAME
    return f"{match.group(1)}.{match.group(2)}" if match.group(1) else match.group(2)


def _parametrization_site(model: nn.Module, name: str) -> tuple[nn.Module, str, str] | None:
    """For a layer recorded as the parametrization of a tensor (``<owner>.parametrizations.<tensor>.0``, e.g. by
    ``adtn_parametrize``) whose owner in ``model`` holds that tensor plain: ``(owner, tensor name, owner's key
    prefix)``, so loading parametrizes it as the file's model was. ``None`` for any other layer."""
    match = _PARAMETRIZATION.match(name)
    if match is None:
        return None
    owner_name, tensor = match.group(1) or "", match.group(2)
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        return None
    plain = owner._parameters.get(tensor, owner._buffers.get(tensor))  # a parameter or buffer, not a property
    if parametrize.is_parametrized(owner, tensor) or not isinstance(plain, torch.Tensor):
        return None
    return owner, tensor, f"{owner_name}." if owner_name else ""


def fold_pruned(state: Mapping[str, torch.Tensor], expected: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """``state`` with every tensor that ``torch.nn.utils.prune`` held (``X_orig`` and ``X_mask``, no ``X``) as the
    plain tensor the pruned model computed with, ``X = X_orig · X_mask`` (what ``prune.remove`` makes permanent) —
    unless the model it goes into (``expected``: its state-dict keys) is pruned there too."""
    folded = dict(state)
    for key in state:
        base = key[:-len("_orig")]
        if (key.endswith("_orig") and f"{base}_mask" in state and base not in state
                and (expected is None or (base in expected and key not in expected))):
            folded[base] = folded.pop(key) * folded.pop(f"{base}_mask")
    return folded


def load_model(path: str | os.PathLike, model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Load a file written by :func:`save_model` into ``model`` (a freshly built dense skeleton is fine).

    The registered torchtn layers recorded in the file (any type: ``MPOLinear`` and every later one) are first put
    where the file says, with the recorded shapes and ranks. Anything wrong with the file — unknown layer types,
    malformed metadata, tensors whose shapes disagree with it, non-float or non-finite tensors — raises
    :class:`ModelFileError` naming the file and the problem, before the model is changed. A file of a model pruned by
    ``torch.nn.utils.prune`` loads into an unpruned one as the weights it computed with (:func:`fold_pruned`).
    Returns the (same) model — or, for a file whose model is itself a registered layer (``save_model(MPOLinear(…))``),
    that layer, built where ``model`` is (its device and dtype) and loaded: take the returned model.
    """
    path = Path(path)
    given, model = model, unwrapped(model)  # a compiled or DDP-wrapped skeleton: into the model it wraps
    records = _validated_records(path, read_metadata(path))
    shapes = _tensor_shapes(path)
    if "" in records:  # the model itself is the recorded layer: it comes back as that layer
        if strict and type_name(model) != records[""].get("type") and list(model.children()):
            raise ModelFileError(f"{path}: the file's model is a single {records[''].get('type')} layer, but the "
                                 f"given model is a {type(model).__name__} holding submodules: pass the layer's "
                                 f"dense counterpart (or the layer itself) as the skeleton")
        layer = _build_checked(path, "", records[""], shapes, like=model)
        state = _checked_state(path, {k: v for k, v in read_tensors(path).items() if not k.startswith("__")})
        try:
            layer.load_state_dict(state, strict=strict)
        except RuntimeError as err:
            raise ModelFileError(f"{path}: its tensors do not fit the model ({error_line(err, 300)})") from None
        return layer
    new_layers, new_parametrizations = {}, {}
    for name, record in records.items():
        site = _parametrization_site(model, name)
        if site is not None:
            owner, tensor, prefix = site
            new_parametrizations[name] = (owner, tensor, prefix, _build_checked(path, name, record, shapes,
                                                                                like=owner))
            continue
        try:
            parent, child = parent_and_attr(model, name)
        except AttributeError:
            raise ModelFileError(f"{path}: the file has a {record['type']} layer at {name!r}, but the model has no "
                                 f"module there") from None
        old = getattr(parent, child, None)
        if not isinstance(old, nn.Module):
            raise ModelFileError(f"{path}: the file has a {record['type']} layer at {name!r}, but the model has no "
                                 f"module there")
        new_layers[name] = (parent, child, _build_checked(path, name, record, shapes, like=old))
    state = _checked_state(path, {k: v for k, v in read_tensors(path).items() if not k.startswith("__")})
    # what the model will expect once the recorded layers are in place — checked before anything is changed
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not any(k.startswith(f"{name}.") for name in new_layers)}
    for name, (_, _, layer) in new_layers.items():
        expected.update({f"{name}.{k}": tuple(v.shape) for k, v in layer.state_dict().items()})
    for name, (owner, tensor, prefix, layer) in new_parametrizations.items():  # `tensor` becomes `original` + layer
        value = getattr(owner, tensor)
        original = layer.right_inverse(value) if hasattr(layer, "right_inverse") else value
        expected.pop(f"{prefix}{tensor}", None)
        expected[f"{prefix}parametrizations.{tensor}.original"] = tuple(original.shape)
        expected.update({f"{name}.{k}": tuple(v.shape) for k, v in layer.state_dict().items()})
    state = fold_pruned(state, expected)  # a pruned model's file into a plain model: the weights it computed with
    for key, tensor in state.items():
        if key in expected and expected[key] != tuple(tensor.shape):
            raise ModelFileError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)} but the model described "
                                 f"by the file's metadata needs {expected[key]}")
    if strict:
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ModelFileError(f"{path}: the file does not fit the model (missing: {missing[:5]}, unexpected: "
                                 f"{unexpected[:5]})")
    for parent, child, layer in new_layers.values():
        setattr(parent, child, layer)
    for owner, tensor, _, layer in new_parametrizations.values():
        parametrize.register_parametrization(owner, tensor, layer, unsafe=True)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise ModelFileError(f"{path}: its tensors do not fit the model ({error_line(err, 300)})") from None
    return given
