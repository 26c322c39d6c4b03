"""The layer registry: one registration makes a torchtn layer savable, loadable, tensorizable and inspectable.

A registered layer class implements the small :class:`RegisteredLayer` protocol — how to describe itself in a model
file's JSON (``layout``), how to rebuild an empty copy from that description (``from_layout``), which tensor networks
it holds (``tt_matrices``, for reports and ``torchtn inspect``) and, when it replaces a dense PyTorch module, how to
read that module's weight as a matrix and build itself from a TT-matrix (``dense_matrix``, ``tt_shapes_for``,
``from_tt``). ``io``, ``tensorize``, the CLI and the reports only ever talk to the registry.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._modules import parent_and_attr, replace_submodule
from ..core.tt import TTMatrix

__all__ = ["register_layer", "convertible_types", "layer_types", "layer_type", "type_name", "converter_for",
           "densify", "densify_model", "put_back", "RegisteredLayer"]


class RegisteredLayer(Protocol):
    def layout(self) -> dict[str, Any]: ...

    @classmethod
    def from_layout(cls, spec: dict[str, Any], *, device=None, dtype=None) -> nn.Module: ...

    def tt_matrices(self) -> dict[str, TTMatrix]: ...


_TYPES: dict[str, type[nn.Module]] = {}
_CONVERTS: dict[type[nn.Module], type[nn.Module]] = {}


def _same_class(a: type, b: type) -> bool:
    """The same class, or a redefinition of it (a module reloaded, a notebook cell run again)."""
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register_layer(name: str | None = None, *, converts: Sequence[type[nn.Module]] = (), replace: bool = False):
    """Class decorator: register a layer under ``name`` (default: the class name). A name or a dense type taken by
    another class raises — files and ``tensorize`` would silently change meaning — unless ``replace=True``.

    ``converts``: dense module types that ``tensorize`` replaces by this layer (the class then provides
    ``dense_matrix(module)``, ``tt_shapes_for(module, in_shape, out_shape)`` and ``from_tt(module, tt)``, and
    optionally ``cannot_convert(module)``: why this instance computes what the layer cannot, or ``None`` —
    ``tensorize`` then keeps it dense and says why).
    """
    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        key = name or cls.__name__
        for method in ("layout", "from_layout", "tt_matrices"):
            if not hasattr(cls, method):
                raise TypeError(f"{cls.__name__} cannot be registered: it has no {method}()")
        if converts:
            for method in ("dense_matrix", "tt_shapes_for", "from_tt"):
                if not hasattr(cls, method):
                    raise TypeError(f"{cls.__name__} converts {[c.__name__ for c in converts]} but has no {method}()")
        taken = [f"the name {key!r} ({_TYPES[key].__qualname__})"] if key in _TYPES and not _same_class(
            _TYPES[key], cls) else []
        taken += [f"{dense.__name__} (converted to {_CONVERTS[dense].__qualname__})" for dense in converts
                  if dense in _CONVERTS and not _same_class(_CONVERTS[dense], cls)]
        if taken and not replace:
            raise ValueError(f"cannot register {cls.__qualname__}: {' and '.join(taken)} taken already; pass "
                             f"replace=True to take it over")
        _TYPES[key] = cls
        cls._registry_name = key
        for dense in converts:
            _CONVERTS[dense] = cls
        return cls
    return deco


def convertible_types() -> tuple[type[nn.Module], ...]:
    """The dense module types ``tensorize`` can replace (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``, …)."""
    return tuple(_CONVERTS)


def layer_types() -> dict[str, type[nn.Module]]:
    """Registered layer types by name."""
    return dict(_TYPES)


def layer_type(name: str, where: str = "") -> type[nn.Module]:
    """The class registered as ``name``; an unknown name raises ``ValueError`` naming the known ones."""
    if name not in _TYPES:
        place = f" (at {where!r})" if where else ""
        raise ValueError(f"layer type {name!r}{place} is not a registered torchtn layer: expected one of "
                         f"{', '.join(map(repr, sorted(_TYPES)))} — was the file written by a newer torchtn?")
    return _TYPES[name]


def type_name(module: nn.Module) -> str | None:
    """The registry name of ``module``'s class, or ``None`` if it is not a registered layer."""
    name = getattr(type(module), "_registry_name", None)
    return name if name in _TYPES and _TYPES[name] is type(module) else None


def converter_for(module: nn.Module) -> type[nn.Module] | None:
    """The registered layer class that ``tensorize`` turns ``module`` into (its most specific registered base), if any."""
    for base in type(module).__mro__:
        if base in _CONVERTS:
            return _CONVERTS[base]
    return None


def factory_of(module: nn.Module) -> dict[str, torch.device | torch.dtype | None]:
    """``device``/``dtype`` of a module's first parameter (``None`` each when it has none)."""
    p = next(iter(module.parameters()), None)
    return {"device": None if p is None else p.device, "dtype": None if p is None else p.dtype}


def densify(model: nn.Module, skip: Callable[[str, nn.Module], bool] | None = None) -> dict[str, nn.Module]:
    """Merge the registered layers of ``model`` back into PyTorch's own, in place: every layer with a dense counterpart
    (``to_dense_module``: ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``) is replaced by it, and every tensor held by
    a registered parametrization alone becomes a plain parameter with the value it reads. Layers with no dense
    counterpart (t-product layers) stay; ``skip(name, module)`` keeps others. Returns ``{name: the layer replaced}``
    (a parametrized tensor's name is ``<owner>.<tensor>``). A model that is itself such a layer cannot be replaced in
    place: that raises ``ValueError`` (:func:`densify_model` returns its counterpart instead)."""
    if not (skip is not None and skip("", model)) and _dense_counterpart(model) is not None:
        raise ValueError(f"densify replaces a model's layers in place, but the model is itself a {type_name(model)}: "
                         f"take model.to_dense_module(), or torchtn.layers.densify_model(model), which returns it")
    done: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if skip is not None and skip(name, module):
            continue
        dense = _dense_counterpart(module) if name else None  # (the model itself: densify_model)
        if dense is not None:
            replace_submodule(model, name, dense)
            done[name] = module
        for tensor, chain in list(getattr(module, "parametrizations", {}).items()):
            full = f"{name}.{tensor}" if name else tensor
            if (len(chain) == 1 and type_name(chain[0]) is not None
                    and not (skip is not None and skip(full, module))):
                # a class of its own first: a deep copy shares the class PyTorch made for the module it copies, and
                # removing a parametrization deletes the tensor's property from that class (the original broke)
                cls = type(module)
                module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
                done[full] = chain[0]
    return done


def densify_model(model: nn.Module, skip: Callable[[str, nn.Module], bool] | None = None
                  ) -> tuple[nn.Module, dict[str, nn.Module]]:
    """:func:`densify`, the model itself included: when ``model`` is a registered layer with a dense counterpart
    (and not ``skip``-ped under the name ``""``), that counterpart is returned in its place. Returns ``(the model,
    {name: the layer replaced})``."""
    done: dict[str, nn.Module] = {}
    dense = None if skip is not None and skip("", model) else _dense_counterpart(model)
    if dense is not None:
        done[""], model = model, dense
    done.update(densify(model, skip))
    return model, done


def _dense_counterpart(module: nn.Module) -> nn.Module | None:
    """A registered layer's PyTorch counterpart (``to_dense_module``), or ``None`` where it has none."""
    if type_name(module) is None or not hasattr(module, "to_dense_module"):
        return None
    try:
        return module.to_dense_module()  # (frozen parameters and the mode carried over)
    except NotImplementedError:
        return None


def put_back(model: nn.Module, name: str, layer: nn.Module) -> nn.Module:
    """Undo :func:`densify` (or :func:`densify_model`) for one entry of what it returned: ``layer`` back in place of
    the dense module ``name``, or back as the parametrization of the tensor ``name``. Returns the model (``layer``
    itself for ``name == ""``, the model that was a registered layer)."""
    if not name:
        return layer
    owner, tensor = parent_and_attr(model, name)
    if isinstance(getattr(owner, tensor, None), nn.Module):
        setattr(owner, tensor, layer)
    else:
        parametrize.register_parametrization(owner, tensor, layer, unsafe=True)
    return model
