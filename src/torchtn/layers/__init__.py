"""Layers: thin ``nn.Module``s over the math core."""
from .mpo_linear import MPOLinear

__all__ = ["MPOLinear"]
