"""Model zoo: the five networks of Gao et al. 2020 and the hybrid network of Jahromi & Orús, each buildable dense or
with MPO layers.

``build_model(config)`` rebuilds a model from its ``config()`` dict (stored in every model file torchtn writes).
"""
from collections.abc import Mapping

from torch import nn

from .cifar import VGG16, AlexNet, DenseNet, ResNet18, ZFNet
from .dtn import DeepTensorNetwork, SequenceClassifier, TensorBlock, TokenPredictor
from .fc2 import FC2
from .hybrid import HybridMLP
from .lenet5 import LeNet5

__all__ = ["FC2", "HybridMLP", "LeNet5", "VGG16", "AlexNet", "ZFNet", "ResNet18", "DenseNet", "build_model", "MODELS", "DeepTensorNetwork", "TensorBlock",
           "SequenceClassifier", "TokenPredictor"]

MODELS: dict[str, type[nn.Module]] = {"fc2": FC2, "lenet5": LeNet5, "vgg16": VGG16, "resnet18": ResNet18,
                                      "densenet": DenseNet, "hybrid": HybridMLP, "alexnet": AlexNet, "zfnet": ZFNet}


def build_model(config: Mapping) -> nn.Module:
    """Rebuild a zoo model from its ``config()`` dict (``{"name": "fc2", ...}``)."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"model name {name!r} is not in the zoo: expected one of {sorted(MODELS)}")
    try:
        return MODELS[name](**config)
    except TypeError as err:
        raise ValueError(f"model config for {name!r} is invalid: {err}") from None
