"""Optimizers, schedules, metrics, recipes, callbacks and checkpoints."""

from keras_allattn.training.callbacks import SpanLogger
from keras_allattn.training.callbacks import StreamValidation
from keras_allattn.training.callbacks import save_span_heatmap
from keras_allattn.training.checkpoint import TrainingCheckpoint
from keras_allattn.training.checkpoint import latest_checkpoint
from keras_allattn.training.checkpoint import restore_training
from keras_allattn.training.checkpoint import save_training
from keras_allattn.training.metrics import BitsPerByte
from keras_allattn.training.metrics import BitsPerCharacter
from keras_allattn.training.metrics import Perplexity
from keras_allattn.training.optimizers import AdagradClip
from keras_allattn.training.optimizers import LinearWarmup
from keras_allattn.training.recipes import optimizer_from_recipe
from keras_allattn.training.recipes import scale_recipe
from keras_allattn.training.recipes import schedule_from_recipe

__all__ = [
    "AdagradClip",
    "BitsPerByte",
    "BitsPerCharacter",
    "LinearWarmup",
    "Perplexity",
    "SpanLogger",
    "StreamValidation",
    "TrainingCheckpoint",
    "latest_checkpoint",
    "optimizer_from_recipe",
    "restore_training",
    "save_span_heatmap",
    "save_training",
    "scale_recipe",
    "schedule_from_recipe",
]
