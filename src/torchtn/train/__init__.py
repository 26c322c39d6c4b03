"""Training: one trainer for every model."""
from .trainer import (
    LOSSES,
    EpochRecord,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    accuracy,
    distillation_loss,
    evaluate,
    measure,
)

__all__ = ["Trainer", "TrainConfig", "TrainingDiverged", "EpochRecord", "evaluate", "measure", "accuracy",
           "distillation_loss", "LOSSES"]
