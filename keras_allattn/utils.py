"""Argument validation (token ids too, where values can be read),
initializers, logging, progress bars and the JAX training state's
write-back."""

import difflib
import logging
import math
import numbers
import sys

import keras
from keras import ops

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


def check_positive_or_auto(name, value):
    """Returns `value` if it is "auto" or an integer >= 1 (as an int),
    else raises ValueError."""
    if isinstance(value, str) and value == "auto":
        return value
    if (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and value >= 1
    ):
        return int(value)
    raise ValueError(
        f'`{name}` must be "auto" or a positive integer. '
        f"Received: {name}={value!r}"
    )


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


def check_number(name, value, minimum, strict=False):
    """Returns `value` as float if it is a real number `>= minimum` (`>`
    with `strict`), else raises ValueError."""
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or value < minimum
        or (strict and value == minimum)
    ):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(
            f"`{name}` must be a number {bound}. Received: {name}={value!r}"
        )
    return float(value)


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


def _show_shape(expected):
    parts = [str(e) for e in expected]
    return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"


def check_shape(name, shape, expected):
    """Raises ValueError unless `shape` matches `expected`.

    Args:
        name: the argument's name, e.g. "position_keys".
        shape: the received shape (a tuple; `None` entries are unknown
            sizes and match anything).
        expected: a tuple with one entry per axis: an int (that size) or a
            string (a name for any size, e.g. "batch", shown as is).
    """
    shape = tuple(shape)
    if len(shape) == len(expected) and all(
        isinstance(e, str) or s is None or s == e
        for s, e in zip(shape, expected)
    ):
        return
    raise ValueError(
        f"`{name}` must have shape {_show_shape(expected)}. "
        f"Received: {name}.shape={shape}"
    )


def check_last_axis(name, shape, size):
    """Raises ValueError unless `shape` is `(..., size)` (any leading axes).

    `size=None` only requires the last axis to be known; an unknown last
    axis (while tracing) matches any `size`.
    """
    shape = tuple(shape)
    if shape and (
        (size is None and shape[-1] is not None)
        or (size is not None and shape[-1] in (None, size))
    ):
        return
    expected = "a known size" if size is None else size
    raise ValueError(
        f"`{name}` must have shape (..., {expected}). "
        f"Received: {name}.shape={shape}"
    )


def check_known_arguments(owner, received, known):
    """Raises TypeError naming every key of `received` not in `known`.

    Each unknown name comes with the closest known one, when there is one
    close enough (`difflib.get_close_matches`), so that a misspelled
    argument fails loudly instead of being ignored.

    Args:
        owner: what the arguments were given to, e.g. "AllAttentionLM".
        received: dict of keyword arguments.
        known: iterable of accepted names.
    """
    known = sorted(known)
    unknown = [name for name in received if name not in known]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        hints.append(f"`{name}`{hint}")
    values = ", ".join(f"{name}={received[name]!r}" for name in unknown)
    raise TypeError(
        f"{owner} got unexpected keyword argument"
        f"{'s' if len(unknown) > 1 else ''}: {', '.join(hints)}. "
        f"Received: {values}"
    )


def is_concrete(x):
    """Whether `x` holds values that can be read now (not traced)."""
    if isinstance(x, keras.KerasTensor):
        return False
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    if backend == "jax":
        import jax

        return not isinstance(x, jax.core.Tracer)
    if backend == "torch":
        import torch

        # Fake tensors: traced by `make_fx` (`compiling.torch_compile`).
        return not (
            torch.compiler.is_compiling()
            or isinstance(x, torch._subclasses.FakeTensor)
        )
    return True


def check_token_ids(tokens, vocabulary_size):
    """Raises ValueError for ids outside [0, vocabulary_size), when eager."""
    if not is_concrete(tokens):
        return
    values = ops.convert_to_numpy(tokens)
    if values.size and (values.min() < 0 or values.max() >= vocabulary_size):
        bad = values[(values < 0) | (values >= vocabulary_size)][0]
        raise ValueError(
            f"Token ids must lie in [0, vocabulary_size={vocabulary_size}). "
            f"Received: a token id {int(bad)} in `tokens`"
        )


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


def sync_jax_state(model):
    """Writes JAX's in-flight training state back to `model`'s variables.

    On JAX, `fit` holds the variables' values apart from the variables
    between steps; a callback that reads or writes a variable in between
    calls this first. Nothing happens on the other backends.
    """
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()


class HostRead:
    """A device-to-host read of tensors, started now, waited for later.

    `HostRead(values).result()` is `np.stack` of the values as they are
    when the read starts, stacked on the device (one copy, not one per
    value). Starting a read queues it behind the work already queued and
    nothing else; `result()` waits for that copy only. On PyTorch with
    CUDA tensors the copy goes to pinned host memory without blocking,
    and `result()` waits for its event: a plain `.cpu()` when reading
    would be queued behind every step launched since, so the host would
    wait for the step in flight. On JAX the copy to the host starts
    asynchronously (`copy_to_host_async`); an array waits for its own
    computation only. Elsewhere the values are read when `result()` is
    called.

    Args:
        values: a list of tensors of one shape and dtype.
    """

    def __init__(self, values):
        self._event = None
        backend = keras.backend.backend()
        if backend == "torch":
            # torch's own stack, outside autograd: Keras's `ops.stack` and
            # conversions cost more host time than the read itself, and
            # this runs between two steps while the device waits.
            import torch

            with torch.no_grad():
                stacked = torch.stack([torch.as_tensor(v) for v in values])
            if stacked.is_cuda:
                host = torch.empty(
                    stacked.shape, dtype=stacked.dtype, pin_memory=True
                )
                host.copy_(stacked, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record()
                stacked = host
        else:
            stacked = ops.stack([ops.convert_to_tensor(v) for v in values])
            if backend == "jax":
                stacked.copy_to_host_async()
        self._value = stacked

    def result(self):
        """The values read, a NumPy array (the host waits for them)."""
        if self._event is not None:
            self._event.synchronize()
        return ops.convert_to_numpy(self._value)


REMAT_MODES = ("attention", "layer")


def check_remat(remat, allow_auto=False):
    """A remat setting: False, "attention" (True is an alias) or "layer";
    with `allow_auto`, also "auto"."""
    if remat is False or remat is None:
        return False
    if remat is True:
        return "attention"
    modes = REMAT_MODES + (("auto",) if allow_auto else ())
    if isinstance(remat, str) and remat in modes:
        return remat
    raise ValueError(
        f"`remat` must be False, True or one of {modes}. Received: "
        f"remat={remat!r}"
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
