"""Training: one trainer for every model."""
from .trainer import EpochRecord, TrainConfig, Trainer, TrainingDiverged, evaluate

__all__ = ["Trainer", "TrainConfig", "TrainingDiverged", "EpochRecord", "evaluate"]
