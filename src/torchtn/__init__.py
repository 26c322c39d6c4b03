"""torchtn — tensor networks inside deep neural networks, for PyTorch.

The top level holds the verbs and layers most users need; everything else is one import deeper
(``torchtn.core``, ``torchtn.functional``, ``torchtn.layers``, ``torchtn.models``, ``torchtn.compress``,
``torchtn.train``, ``torchtn.data``).
"""
from ._version import __version__
from .compress import calibrate, tensorize
from .core import TTMatrix, set_autotune, tt_round, tt_svd, tt_to_dense
from .core.tt import bond_spectra, entanglement_entropy
from .io import ModelFileError, load_model, save_model
from .layers import (
    ADTNConv2d,
    ADTNLinear,
    LinearAttention,
    MPOConv2d,
    MPOEmbedding,
    MPOLinear,
    SoftmaxAttention,
    TensorAttention,
    TensorInteraction,
)
from .models.dtn import DeepTensorNetwork, TensorBlock
from .summary import summary

__all__ = ["__version__", "TTMatrix", "tt_svd", "tt_to_dense", "tt_round", "bond_spectra", "entanglement_entropy",
           "MPOLinear", "MPOConv2d", "tensorize", "calibrate", "save_model", "load_model", "ModelFileError",
           "set_autotune", "TensorAttention", "LinearAttention", "SoftmaxAttention", "TensorInteraction", "TensorBlock",
           "DeepTensorNetwork", "ADTNLinear", "ADTNConv2d", "MPOEmbedding", "summary"]
