"""A user's own architecture, named as ``FILE.py:NAME`` or ``package.module:NAME`` (``torchtn compress --arch``).

``NAME`` is an ``nn.Module`` class or a function that returns one, called with keyword arguments the user gives. This
imports and runs the user's named code, by design (as ``python FILE.py`` would); model *files* are still never
unpickled (weights come from safetensors or a weights-only state dict).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .._checks import error_line

__all__ = ["is_user_arch", "build_user_model", "check_arch"]


def is_user_arch(spec: object) -> bool:
    """Whether ``spec`` names code of the user's (``WHERE:NAME``) rather than a zoo model."""
    return isinstance(spec, str) and ":" in spec


def _split(spec: str, flag: str) -> tuple[str, str]:
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise ValueError(f"{flag} {spec!r} is not allowed: expected a zoo name, FILE.py:NAME or package.module:NAME "
                         f"(NAME a class or function in it)")
    return where, name


def _import(where: str, spec: str, flag: str) -> Any:
    """The module ``where`` names: a Python file (``*.py`` or a path; imported once per process and file version)
    or an importable module (the working directory is put on ``sys.path`` for it, as ``python -m`` does)."""
    try:
        if where.endswith(".py") or os.sep in where or "/" in where:
            path = Path(where).expanduser()
            if not path.is_file():
                raise ValueError(f"{flag} {spec!r}: no Python file at {path}")
            resolved = path.resolve()
            name = f"torchtn_user_arch_{path.stem}_{abs(hash((str(resolved), resolved.stat().st_mtime_ns))):x}"
            if name in sys.modules:  # imported once per process (and again when the file changes)
                return sys.modules[name]
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise ValueError(f"{flag} {spec!r}: {path} cannot be imported as a Python module")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module  # classes defined there (dataclasses, pickling) look themselves up here
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]  # a failed import is not cached
                raise
            return module
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(where)
    except ValueError:
        raise
    except SystemExit as err:  # a script's top-level code (argparse, sys.exit) ran on import
        raise ValueError(f"{flag} {spec!r}: importing {where} ran code that exited (SystemExit: {err.code!r}); put "
                         f"the file's script part under `if __name__ == \"__main__\":` so that importing it only "
                         f"defines the model") from None
    except Exception as err:  # the user's code failed to import: say where, not a traceback from deep inside
        raise ValueError(f"{flag} {spec!r}: importing {where} failed ({error_line(err)})") from None


def build_user_model(spec: str, kwargs: Mapping[str, Any] | None = None, *, flag: str = "--arch") -> nn.Module:
    """``NAME(**kwargs)`` from ``FILE.py:NAME`` or ``package.module:NAME``; every failure is one ``ValueError`` that
    names ``flag``, the spec and what went wrong."""
    where, name = _split(spec, flag)
    module = _import(where, spec, flag)
    factory = getattr(module, name, None)
    if factory is None:
        raise ValueError(f"{flag} {spec!r}: {where} defines no {name}")
    if not callable(factory):
        raise ValueError(f"{flag} {spec!r}: {name} is not callable ({type(factory).__name__}): expected an "
                         f"nn.Module class or a function returning one")
    try:
        model = factory(**dict(kwargs or {}))
    except Exception as err:
        raise ValueError(f"{flag} {spec!r}: {name}(**{dict(kwargs or {})!r}) failed ({error_line(err)})") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{flag} {spec!r}: {name}(...) returned a {type(model).__name__}, expected an nn.Module")
    return model


def check_arch(arch: object, arch_args: object, zoo: Mapping[str, Any]) -> None:
    """``arch`` is a zoo name or names the user's code (``WHERE:NAME``, imported only when the model is built);
    ``arch_args`` (keyword arguments, a ``dict`` with string keys) only go with the latter."""
    if not is_user_arch(arch) and arch not in zoo:
        raise ValueError(f"arch={arch!r} is not allowed: expected one of {', '.join(sorted(zoo))}, or your own as "
                         f"FILE.py:NAME or package.module:NAME")
    if arch_args is not None:
        if not is_user_arch(arch):
            raise ValueError(f"arch_args (--arch-args) are only for an architecture of your own (FILE.py:NAME), "
                             f"not arch={arch!r}")
        if not (isinstance(arch_args, dict) and all(isinstance(k, str) for k in arch_args)):
            raise ValueError(f"arch_args={arch_args!r} is not allowed: expected keyword arguments as a dict")
