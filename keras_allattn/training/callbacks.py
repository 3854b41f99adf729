"""Callbacks of training: the memory trimming that follows the learned
spans, span logging and exact validation."""

import importlib.util
import logging
import os
import warnings

import keras
import numpy as np
from keras import ops

from keras_allattn.data.evaluation import evaluate_stream
from keras_allattn.layers.adaptive_span import spans_from_ratios
from keras_allattn.utils import HostRead
from keras_allattn.utils import check_non_negative
from keras_allattn.utils import check_positive
from keras_allattn.utils import sync_jax_state

logger = logging.getLogger(__name__)

# evaluate_stream's result key for each reported metric.
VALIDATION_METRICS = {
    "bits_per_character": "bits_per_token",
    "bits_per_byte": "bits_per_token",
    "bits_per_token": "bits_per_token",
    "perplexity": "perplexity",
}


def _log_line(line, params):
    """Logs `line` (INFO), starting a new line below `fit`'s progress bar."""
    progress_bar = (params or {}).get("verbose") in (1, "auto")
    logger.info(("\n" if progress_bar else "") + line)


def _summary_module():
    """`tf.summary`, or None without TensorFlow and TensorBoard installed.

    On other backends TensorFlow only writes event files: it is kept off
    the GPUs so that it does not reserve their memory.
    """
    if importlib.util.find_spec("tensorboard") is None:
        return None  # tf.summary's ops live in the tensorboard package.
    try:
        import tensorflow as tf
    except ImportError:
        return None
    if keras.backend.backend() != "tensorflow":
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:
            pass  # TensorFlow's devices were initialised already.
    return tf.summary


def save_span_heatmap(spans, path, max_span=None, title=None):
    """Writes a PNG heat map of learned spans, layers by heads.

    Uses matplotlib's Agg renderer through a bare `Figure`, so it neither
    needs a display nor changes pyplot's backend.

    Args:
        spans: array `(num_layers, num_heads)` of spans in tokens, e.g.
            `model.current_spans()`.
        path: the PNG file to write (its folder is created).
        max_span: the top of the colour scale; `None` uses the largest span.
        title: the figure title.

    Returns:
        `path`.
    """
    from matplotlib.figure import Figure

    spans = np.asarray(spans)
    if spans.ndim != 2:
        raise ValueError(
            "`spans` must have shape (num_layers, num_heads). Received: "
            f"spans with shape {spans.shape}"
        )
    layers, heads = spans.shape
    figure = Figure(
        figsize=(max(4.0, 0.7 * heads + 2.5), max(3.0, 0.4 * layers + 1.5))
    )
    axes = figure.subplots()
    top = max_span if max_span is not None else max(int(spans.max()), 1)
    image = axes.imshow(
        spans, cmap="viridis", aspect="auto", vmin=0, vmax=top,
        interpolation="nearest",
    )
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_xticks(range(heads))
    axes.set_yticks(range(layers))
    if layers * heads <= 512:
        for (layer, head), span in np.ndenumerate(spans):
            axes.text(
                head, layer, f"{span:g}", ha="center", va="center",
                fontsize=7, color="white" if span < 0.6 * top else "black",
            )
    figure.colorbar(image, ax=axes, label="span (tokens)")
    if title:
        axes.set_title(title)
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return path


class SpanLogger(keras.callbacks.Callback):
    """Logs the learned span of every layer while an `AllAttentionLM` trains.

    Every `every_steps` steps it reads `model.current_spans()` (layers by
    heads, in tokens) and logs one short line (an INFO record of the
    `keras_allattn.training.callbacks` logger), the mean and the largest
    span of each layer:

        step 400 spans mean/max per layer: 12/40 30/96 51/160 77/224

    With `log_dir` it also writes the scalars `span_mean/layer_i` and
    `span_max/layer_i` and a histogram of all spans as TensorBoard events
    (through `tf.summary`; without TensorFlow and TensorBoard this is
    skipped with a one-time note). With `heatmap_path` it writes a PNG heat
    map of the final spans when training ends (matplotlib needed).

    Steps are the optimizer's iterations, so they continue across resumed
    runs. `records` keeps every `(step, spans)` logged.

    Args:
        every_steps: int > 0, steps between two logs.
        log_dir: None, or the folder for TensorBoard event files.
        heatmap_path: None, or the PNG written at the end of training.
        verbose: bool, whether to log the line.

    Example:

    >>> model.fit(dataset, steps_per_epoch=1000, epochs=10, callbacks=[
    ...     SpanLogger(100, log_dir="run/tensorboard/spans",
    ...                heatmap_path="run/spans.png")])  # doctest: +SKIP
    """

    def __init__(self, every_steps=100, log_dir=None, heatmap_path=None,
                 verbose=True):
        super().__init__()
        self.every_steps = check_positive("every_steps", every_steps)
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.heatmap_path = heatmap_path
        self.verbose = bool(verbose)
        if heatmap_path is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ImportError(
                    "SpanLogger's heat map needs matplotlib "
                    "(`pip install matplotlib`). Received: "
                    f"heatmap_path={heatmap_path!r}"
                ) from None
        self.step = 0
        self.records = []
        self._writer = None
        self._summary = None
        if self.log_dir is not None:
            self._summary = _summary_module()
            if self._summary is None:
                logger.warning(
                    "SpanLogger: TensorFlow and TensorBoard are not both "
                    "installed, so no TensorBoard events are written to "
                    "%s.", self.log_dir,
                )

    def on_train_begin(self, logs=None):
        if not callable(getattr(self.model, "current_spans", None)):
            raise ValueError(
                "SpanLogger needs a model with a `current_spans()` method "
                f"such as AllAttentionLM. Received: model={self.model!r}"
            )
        optimizer = self.model.optimizer
        self.step = (
            int(ops.convert_to_numpy(optimizer.iterations)) if optimizer else 0
        )
        if self._summary is not None and self._writer is None:
            self._writer = self._summary.create_file_writer(self.log_dir)

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every_steps == 0:
            self.log()

    def on_train_end(self, logs=None):
        if not self.records or self.records[-1][0] != self.step:
            self.log()
        if self.heatmap_path is not None:
            save_span_heatmap(
                self.records[-1][1],
                self.heatmap_path,
                max_span=getattr(self.model, "max_span", None),
                title=f"learned spans at step {self.step}",
            )
        if self._writer is not None:
            self._writer.flush()

    def log(self):
        """Reads, logs and records the spans of the current step."""
        sync_jax_state(self.model)
        spans = np.asarray(self.model.current_spans())
        self.records.append((self.step, spans))
        means, maxima = spans.mean(axis=1), spans.max(axis=1)
        if self.verbose:
            layers = " ".join(f"{m:.0f}/{x:.0f}" for m, x in zip(means, maxima))
            _log_line(
                f"step {self.step} spans mean/max per layer: {layers}",
                self.params,
            )
        if self._writer is not None:
            summary = self._summary
            with self._writer.as_default(step=self.step):
                for i, (mean, largest) in enumerate(zip(means, maxima)):
                    summary.scalar(f"span_mean/layer_{i}", float(mean))
                    summary.scalar(f"span_max/layer_{i}", float(largest))
                summary.histogram("spans", spans.astype("float32").ravel())
            self._writer.flush()
        return spans


class StreamValidation(keras.callbacks.Callback):
    """Exact validation with `evaluate_stream` at the end of epochs.

    Every `every_epochs` epochs it scores the whole `tokens` split (every
    token once, segment memory carried, batch `batch_size`) and adds
    `val_loss` and `val_<metric>` to the epoch's logs, so that the progress
    bar, `History` and `keras.callbacks.TensorBoard` show them (place it
    before those in the callback list).

    Args:
        tokens: 1-D array of the validation split's token ids.
        metric: "bits_per_character", "bits_per_byte", "bits_per_token" or
            "perplexity": the number reported next to the loss.
        batch_size: int, streams of the evaluation (8 in the reference).
        every_epochs: int > 0, epochs between two validations.
        prefix: the prefix of the log names.

    Attributes:
        results: a list of `(optimizer iteration, evaluate_stream result)`.

    Example:

    >>> model.fit(dataset, steps_per_epoch=1000, epochs=10, callbacks=[
    ...     StreamValidation(corpus.valid, "bits_per_character")])  # doctest: +SKIP
    """

    def __init__(self, tokens, metric="bits_per_token", batch_size=8,
                 every_epochs=1, prefix="val_"):
        super().__init__()
        if metric not in VALIDATION_METRICS:
            raise ValueError(
                f"`metric` must be one of {tuple(VALIDATION_METRICS)}. "
                f"Received: metric={metric!r}"
            )
        self.tokens = tokens
        self.metric = metric
        self.batch_size = check_positive("batch_size", batch_size)
        self.every_epochs = check_positive("every_epochs", every_epochs)
        self.prefix = prefix
        self.results = []

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_epochs:
            return
        sync_jax_state(self.model)
        result = evaluate_stream(
            self.model, self.tokens, self.batch_size, verbose=0
        )
        iteration = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        self.results.append((iteration, result))
        if logs is not None:
            logs[f"{self.prefix}loss"] = result["loss"]
            logs[f"{self.prefix}{self.metric}"] = result[
                VALIDATION_METRICS[self.metric]
            ]


class SpanTrimming(keras.callbacks.Callback):
    """Keeps `AllAttentionLM`'s memory trimming in step with learned spans.

    `AllAttentionLM.fit` adds it for models with adaptive span. When
    training starts it sets the attended lengths from the spans; then,
    every `update_every` batches, it reads the spans one step late: before
    a step it starts one read of every layer's span ratios, as that step
    will use them (`keras_allattn.utils.HostRead`: one copy queued behind
    the steps already queued), and takes its result before the next
    batch, when the step after it is already queued. So the host waits
    only for the step before (not for the one in flight), and the lengths
    are set from spans one step old, with `headroom` tokens to spare (the
    length grows when a span comes closer than that to it).

    The spans read are exactly those the previous step used, so every
    step whose spans were read is checked: if a span outgrew the length
    that step attended (it grew by more than `headroom` in one step),
    that step's result was not the untrimmed model's; the step is added
    to `inexact_steps`, a warning says so, and the length grows. With
    `update_every=1` (the default) every step is checked.

    The work happens in `on_train_batch_begin`: a callback with
    `on_train_batch_end` would stop Keras from running the other
    callbacks' batch ends (progress bar, history) off the training thread.

    Args:
        update_every: int, batches between two span reads.
        margin: int, tokens added to the largest span (see
            `AllAttentionLM.update_span_trimming`).
        headroom: int, tokens a span may grow in one step and still be
            attended.

    Attributes:
        inexact_steps: the training steps (counted from the start of
            `fit`) whose spans reached past their attended length.
    """

    def __init__(self, update_every=1, margin=64, headroom=32):
        super().__init__()
        self.update_every = check_positive("update_every", update_every)
        self.margin = check_non_negative("margin", margin)
        self.headroom = check_non_negative("headroom", headroom)
        if headroom > margin:
            raise ValueError(
                "`headroom` must be at most `margin`. Received: "
                f"headroom={headroom}, margin={margin}"
            )
        self.inexact_steps = []
        self._pending = None
        self._batches = 0

    def on_train_begin(self, logs=None):
        self.inexact_steps = []
        self._pending = None
        self._batches = 0
        sync_jax_state(self.model)
        self.model.update_span_trimming(self.margin)

    def on_train_batch_begin(self, batch, logs=None):
        step = self._batches
        self._batches += 1
        if self._pending is not None:
            self._check_and_update()
        if step % self.update_every == 0:
            # The ratios step `step` will use, read while it runs.
            sync_jax_state(self.model)
            self._pending = (
                step,
                self.model.attended_spans(),
                HostRead([a.span.span_ratio.value
                          for a in self.model.attention_layers]),
            )

    def on_train_end(self, logs=None):
        if self._pending is not None:
            self._check_and_update(update=False)

    def _check_and_update(self, update=True):
        step, attended, read = self._pending
        self._pending = None
        model = self.model
        spans = spans_from_ratios(
            np.asarray(read.result(), "float64"), model.max_span,
            model.span_ramp,
        )
        largest = spans.max(axis=1)
        if np.any(largest > np.asarray(attended)):
            self.inexact_steps.append(step)
            warnings.warn(
                f"SpanTrimming: at training step {step} a span reached "
                f"{largest.tolist()} tokens (per layer) while the layers "
                f"attended {list(attended)} memory rows: that step's result "
                "is not the untrimmed model's. Spans grew by more than "
                f"headroom={self.headroom} tokens in one step; widening. "
                "Pass a larger `headroom` and `margin` to avoid this.",
                stacklevel=2,
            )
        if update:
            model.update_span_trimming(
                self.margin, spans=spans, headroom=self.headroom
            )
