"""Layers: thin ``nn.Module``s over the math core, and the registry that makes them files, tensorize rules and reports."""
from .adtn import ADTNConv2d, ADTNGenerator, ADTNLinear, ADTNParametrization, adtn_parametrize
from .attention import LinearAttention, SoftmaxAttention, TensorAttention
from .computed_weight import ComputedWeight, WeightCache
from .mpo_conv import MPOConv2d
from .mpo_embedding import MPOEmbedding
from .mpo_linear import MPOLinear
from .mpo_parametrize import MPOParametrization, mpo_parametrize
from .registry import converter_for, densify, densify_model, layer_type, layer_types, register_layer, type_name
from .tensor_interaction import TensorInteraction
from .tlayers import TAntisymmetric, THamiltonian, TLinear, TResidual
from .tt_layer import TTLayer

__all__ = ["MPOLinear", "MPOConv2d", "TTLayer", "ComputedWeight", "WeightCache", "register_layer", "layer_types",
           "layer_type", "type_name", "converter_for",
           "TensorAttention", "LinearAttention", "SoftmaxAttention", "TensorInteraction", "TLinear", "TResidual",
           "TAntisymmetric", "THamiltonian", "ADTNLinear",
           "ADTNConv2d", "ADTNGenerator", "ADTNParametrization", "adtn_parametrize", "MPOEmbedding",
           "MPOParametrization", "mpo_parametrize", "densify", "densify_model"]
