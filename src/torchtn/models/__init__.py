"""Model zoo built from torchtn layers; ``build_model(config)`` rebuilds a dense skeleton from a file's metadata."""
from collections.abc import Mapping

from torch import nn

from .fc2 import FC2

__all__ = ["FC2", "build_model", "MODELS"]

MODELS = {"fc2": FC2}


def build_model(config: Mapping) -> nn.Module:
    """Rebuild a zoo model from its ``config()`` dict (``{"name": "fc2", ...}``)."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"model name {name!r} is not in the zoo: expected one of {sorted(MODELS)}")
    return MODELS[name](**config)
