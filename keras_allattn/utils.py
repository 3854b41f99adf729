"""Argument validation, initializers, logging and progress bars."""

import logging
import math
import numbers
import sys

import keras

LOGGER_NAME = "keras_allattn"
VERBOSE_VALUES = (0, 1, 2, "auto")


def torch_default_uniform(fan_in):
    """PyTorch's default `nn.Linear` init: uniform in +-1/sqrt(fan_in)."""
    limit = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-limit, limit)


def check_positive(name, value):
    """Returns `value` if it is an integer >= 1, else raises ValueError."""
    if (
        not isinstance(value, numbers.Integral)
        or isinstance(value, bool)
        or value < 1
    ):
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )
    return int(value)


def check_non_negative(name, value):
    """Returns `value` if it is an integer >= 0, else raises ValueError."""
    if (
        not isinstance(value, numbers.Integral)
        or isinstance(value, bool)
        or value < 0
    ):
        raise ValueError(
            f"`{name}` must be a non-negative integer. "
            f"Received: {name}={value!r}"
        )
    return int(value)


def check_unit_interval(name, value):
    """Returns `value` as float if it lies in [0, 1], else raises ValueError."""
    if not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"`{name}` must be a number in [0, 1]. Received: {name}={value!r}"
        )
    return float(value)


def check_rate(name, value):
    """Returns `value` as float if it lies in [0, 1), else raises ValueError."""
    if not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(
            f"`{name}` must be a number in [0, 1). Received: {name}={value!r}"
        )
    return float(value)


def check_choice(name, value, choices):
    """Returns `value` if it is one of `choices`, else raises ValueError."""
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {tuple(choices)}. "
            f"Received: {name}={value!r}"
        )
    return value


def device_name():
    """The accelerator's name for the current backend, or "CPU"."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return device.device_kind if device.platform == "gpu" else "CPU"
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    return tf.config.experimental.get_device_details(gpus[0]).get(
        "device_name", "GPU"
    )


def check_verbose(verbose):
    """`verbose` as Keras reads it: 0 silent, 1 a progress bar, 2 one line.

    "auto" is 1, as in `Model.predict`.
    """
    if isinstance(verbose, bool) or verbose not in VERBOSE_VALUES:
        raise ValueError(
            f"`verbose` must be one of {VERBOSE_VALUES}. "
            f"Received: verbose={verbose!r}"
        )
    return 1 if verbose == "auto" else verbose


def progress_bar(target, verbose, unit_name="token", stateful_metrics=None):
    """A `keras.utils.Progbar` to `target`, or None when `verbose` is 0.

    `stateful_metrics` are values shown as given (not averaged by the bar).
    """
    verbose = check_verbose(verbose)
    if not verbose or not target:
        return None
    return keras.utils.Progbar(
        target, verbose=verbose, unit_name=unit_name,
        stateful_metrics=stateful_metrics,
    )


class _StdoutHandler(logging.StreamHandler):
    """A `StreamHandler` on whatever `sys.stdout` is when a record comes."""

    def __init__(self):
        super().__init__(sys.stdout)

    def emit(self, record):
        self.setStream(sys.stdout)
        super().emit(record)


def install_log_handler():
    """Sets up the `keras_allattn` logger, the parent of the library's loggers.

    Its messages (training progress lines, notes) are INFO and WARNING
    records, written to stdout next to Keras's progress bars by the
    logger's own handler; they do not propagate to the root logger (which
    absl, under TensorFlow, configures for WARNING on stderr). Silence them
    with `logging.getLogger("keras_allattn").setLevel(logging.WARNING)`;
    send them to the application's handlers instead with
    `logger.handlers.clear(); logger.propagate = True`. Called on import.
    """
    logger = logging.getLogger(LOGGER_NAME)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        logger.addHandler(_StdoutHandler())
        logger.propagate = False
    return logger
