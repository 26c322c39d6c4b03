"""Training: one trainer for every model."""
from .trainer import LOSSES, EpochRecord, TrainConfig, Trainer, TrainingDiverged, accuracy, evaluate, measure

__all__ = ["Trainer", "TrainConfig", "TrainingDiverged", "EpochRecord", "evaluate", "measure", "accuracy", "LOSSES"]
