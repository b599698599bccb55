"""Fine-tuning our BERT encoder with a classification head (``dynaprune finetune``): data reading and
label maps (data.py), the training loop, optionally with a pruning recipe on (train.py), and the atomic
checkpoint writer (checkpoint.py)."""

from dynaprune.finetune.checkpoint import save_classifier
from dynaprune.finetune.data import LabelMap, TrainingData, bucketed_batches, read_training_data
from dynaprune.finetune.train import FinetuneConfig, FinetuneReport, StepInfo, finetune

__all__ = ["FinetuneConfig", "FinetuneReport", "LabelMap", "StepInfo", "TrainingData", "bucketed_batches",
           "finetune", "read_training_data", "save_classifier"]
