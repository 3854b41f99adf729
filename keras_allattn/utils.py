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


class _StdoutWhenUnconfigured(logging.Handler):
    """Writes records to stdout while the application configured no logging.

    Once the root logger has a handler (`logging.basicConfig`, a framework),
    records reach the application's handlers through propagation and this
    one stays quiet, so nothing is written twice.
    """

    def emit(self, record):
        if logging.getLogger().handlers:
            return
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


def install_log_handler():
    """Sets up the `keras_allattn` logger, the parent of the library's loggers.

    Its messages (training progress lines, notes) are INFO and WARNING
    records. Unless the application configured logging, they go to stdout
    next to Keras's progress bars; otherwise they propagate to the
    application's handlers. `logging.getLogger("keras_allattn").setLevel(
    logging.WARNING)` silences the INFO lines. Called once, on import.
    """
    logger = logging.getLogger(LOGGER_NAME)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not any(isinstance(h, _StdoutWhenUnconfigured) for h in logger.handlers):
        logger.addHandler(_StdoutWhenUnconfigured())
    return logger
