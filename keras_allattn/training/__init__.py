"""Optimizer, learning-rate schedule and metrics of the reference recipes."""

from keras_allattn.training.metrics import BitsPerByte
from keras_allattn.training.metrics import BitsPerCharacter
from keras_allattn.training.metrics import Perplexity
from keras_allattn.training.optimizers import AdagradClip
from keras_allattn.training.optimizers import LinearWarmup

__all__ = [
    "AdagradClip",
    "BitsPerByte",
    "BitsPerCharacter",
    "LinearWarmup",
    "Perplexity",
]
