"""A compressed ``transformers`` model as files (the storage side of :mod:`torchtn.hf`): torchtn's safetensors with
the model's own config and tokenizer, loaded back into the same class; or merged dense weights for plain
``transformers``."""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..io import load_model, read_metadata, save_model
from ..layers.registry import densify
from .models import _conv1d_back, _transformers, linearize

__all__ = ["save", "load", "export_dense"]


_FILE = "torchtn.safetensors"


def save(model: nn.Module, directory: str | os.PathLike, tokenizer=None, *, metadata: dict | None = None,
         overwrite: bool = False) -> Path:
    """Write ``directory/torchtn.safetensors`` (weights, torchtn layers recorded), the model's ``config.json`` and the
    tokenizer's files. Refuses an existing ``torchtn.safetensors`` unless ``overwrite``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _FILE
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another directory or pass overwrite=True")
    model.config.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    meta = {"hf_class": type(model).__name__, **(metadata or {})}
    save_model(model, path, meta, overwrite=overwrite)
    return path


def load(directory: str | os.PathLike) -> nn.Module:
    """The model :func:`save` wrote: its ``transformers`` class built from the saved config, with the torchtn layers
    put back where the file records them and every weight loaded (eval mode)."""
    tf = _transformers()
    directory = Path(directory)
    path = directory / _FILE
    if not path.is_file():
        raise ValueError(f"{directory} has no {_FILE}: not a model written by torchtn.hf.save")
    meta = read_metadata(path).get("metadata", {})
    cls = getattr(tf, str(meta.get("hf_class", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{path}: unknown transformers class {meta.get('hf_class')!r}")
    config = tf.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    # a dense skeleton (Conv1D maps as the nn.Linear maps compress saved); load_model puts the recorded torchtn layers
    # in place, then every weight
    model = linearize(cls(config))
    load_model(path, model, strict=True)
    return model.eval()


def export_dense(model: nn.Module, directory: str | os.PathLike, tokenizer=None, *, overwrite: bool = False) -> Path:
    """A copy of ``model`` with every torchtn layer merged back into its dense module, written with the model's own
    ``save_pretrained`` (safetensors): plain ``transformers`` loads it, no torchtn needed. Refuses a directory that
    holds a model already (its ``config.json``) unless ``overwrite``."""
    import copy

    directory = Path(directory)
    if (directory / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{directory} holds a model already (config.json); choose another directory or pass "
                              f"overwrite=True")
    dense = copy.deepcopy(model)
    densify(dense)
    _conv1d_back(dense)
    dense.save_pretrained(str(directory), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory
