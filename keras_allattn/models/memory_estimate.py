"""Training memory of an `AllAttentionLM`, estimated before compiling.

`AllAttentionLM(remat="auto")` (the default) picks what the backward pass
recomputes from this estimate, so that a model that fits trains without
out-of-memory errors and one that cannot fit fails before compiling, with
an error that says what to change.

The estimate counts, for one training step at the largest span the model
can reach (`max_span`: adaptive spans may grow to it):

- the parameters with their gradients and two optimizer slots (16 bytes
  per parameter, float32);
- the segment memory of every layer, `B x max_span x d` values (as a ring
  buffer, `B x (max_span + M) x d`: it holds the block's rows too);
- what each layer keeps for its backward pass: with the fused kernels the
  concatenated memory and block rows, their keys and values
  (`3 (max_span + M) B d` values) plus about twelve `B x M x d` tensors
  (queries, attention outputs, projections, residual sums, LayerNorm); the
  portable path also keeps about 8 bytes per attention score
  (`B H M (max_span + N)` scores) unless the attention is recomputed;
  with `remat="layer"` the keys and values are dropped and about sixteen
  `B x M x d` tensors stay (most lie outside the attention layer);
- what one layer's recomputation needs at a time (its keys, values and
  rows with their gradients, or the portable path's scores);
- on JAX, the fused kernels' position-score transients: the Pallas path
  builds the position scores `Q P` and their gradients (`B H M max_span`
  values each, in batch chunks of at most
  `kernel_settings.position_bytes()`, 1 GiB) outside the kernels;
  with the whole batch in one chunk the peak held about five such buffers
  at once (23.7 GiB measured at fixed span 2048, 18.1 before the scores
  moved out of the kernels), counted here for one chunk.

Calibrated on one H200 (JAX, bf16, batch 64, recipe dropout), estimated /
measured peak: enwik8_small fused at fixed span 2048 18.1 / 18.1 GiB, at
fixed 1024 13.6 / 13.6 GiB, at its full span 8192 45.1 / 42.1 GiB;
enwik8_large at 8192 with `remat="layer"` 46.0 / 43.9 GiB (6 and 12 of its
layers: 14.6 / 11.3 and 20.9 / 17.3 GiB, about 1 GiB a layer); wikitext103 at
2048 32.3 / 32.6 GiB; the portable path with the attention recomputed at
2048 24.1 / 22.2 GiB. PyTorch (eager autograd, caching allocator) holds
more under whole-layer recomputation (49.1 GiB for enwik8_large, 48.4 for
text8_large), so its activations count 1.4 times (49.4 GiB estimated
there; 17.6 GiB measured for the 18.1 at fixed span 2048). The compiled
PyTorch step with whole-layer recomputation needed more than 80 GiB for
text8_large, so on CUDA that step trains eagerly
(`keras_allattn.compiling.torch_train_step`).

The budget is the memory the backend lets the process use:
`KERAS_ALLATTN_MEMORY_GIB` when set; else JAX's allocator limit of the
first device (its preallocated fraction of the GPU), PyTorch's CUDA device
memory, or the host's physical memory on a CPU; 80 GiB where the backend
does not say (TensorFlow on a GPU). 90% of it is used, for the
allocator's fragmentation and the compiler's workspace.
"""

import math
import os

import keras

from keras_allattn.layers.segment_memory import ring_storage
from keras_allattn.ops.attention import fused_kernel_applies

MEMORY_ENV = "KERAS_ALLATTN_MEMORY_GIB"
# Usable share of the budget.
HEADROOM = 0.9
# Bytes the portable path keeps (or needs at once) per attention score.
PORTABLE_SCORE_BYTES = 8
GIB = 2**30
# PyTorch's activation memory against the JAX-calibrated estimate.
TORCH_FACTOR = 1.4
# Position-score-sized (B, M, H, A) buffers the JAX fused path holds at once
# (QP of the forward or the backward, dS, their layout copies).
JAX_POSITION_BUFFERS = 5


def memory_budget_bytes():
    """The device memory training may use, in bytes (see module doc)."""
    value = os.environ.get(MEMORY_ENV, "").strip()
    if value:
        try:
            gib = float(value)
        except ValueError:
            gib = -1.0
        if not gib > 0:
            raise ValueError(
                f"The environment variable {MEMORY_ENV} must be a positive "
                f"number of GiB. Received: {MEMORY_ENV}={value!r}"
            )
        return int(gib * GIB)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        # This process's device: in a multi-process run `jax.devices()`
        # starts with the first process's, whose memory cannot be read here.
        device = jax.local_devices()[0]
        if device.platform != "cpu":
            limit = (device.memory_stats() or {}).get("bytes_limit")
            if limit:
                return int(limit)
            return 80 * GIB
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    elif backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_logical_devices("GPU"):
            return 80 * GIB
    return _host_memory()


def _host_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 80 * GIB


def _compute_bytes(model):
    # The layers' compute dtype (the model's own policy may differ).
    layers = getattr(model, "attention_layers", None)
    dtype = layers[0].compute_dtype if layers else model.compute_dtype
    return 2 if dtype in ("bfloat16", "float16") else 4


def uses_fused_kernels(model):
    """Whether training `model` here will run the fused attention kernels."""
    if model.implementation == "portable":
        return False
    # Compiled or not: the compiled PyTorch step keeps the fused kernels
    # (`keras_allattn.compiling.torch_train_step`).
    head_dim = model.hidden_dim // model.num_heads
    return fused_kernel_applies(head_dim, model.dropout)[0]


def training_memory_bytes(model, remat, fused=None):
    """Estimated peak bytes of one training step of `model`.

    Args:
        model: an `AllAttentionLM`.
        remat: False, "attention" or "layer".
        fused: whether the fused kernels run; default `uses_fused_kernels`.
    """
    if fused is None:
        fused = uses_fused_kernels(model)
    c = _compute_bytes(model)
    b, m, d = model.batch_size, model.block_size, model.hidden_dim
    span, n = model.max_span, model.persistent_memory_size
    rows = b * (span + m) * d  # keys (or values) of one layer
    block = b * m * d
    scores = b * model.num_heads * m * (span + n) * PORTABLE_SCORE_BYTES
    params = 16 * _parameter_count(model)
    # A ring buffer (`ring_storage`) also holds the block's rows.
    ring = m if ring_storage() else 0
    state = model.num_layers * b * (span + ring) * d * c
    kept = 3 * rows * c + 12 * block * c
    if model.feedforward_dim:
        kept += 2 * b * m * model.feedforward_dim * c
    at_once = 0
    if remat == "layer":
        # The recomputed keys, values and rows, and their gradients; the
        # activations outside the attention layer (residual, LayerNorm)
        # are still kept: about 16 block-sized tensors a layer, measured
        # (enwik8_large on an H200: 1.0 GiB a layer with its 0.5 GiB of
        # segment memory).
        # (Never more than without recomputation: a tiny block next to
        # the memory rows.)
        at_once = 6 * rows * c
        kept = min(16 * block * c, kept)
        if not fused:
            at_once += scores
    elif not fused:
        if remat == "attention":
            at_once = scores
        else:
            kept += scores
    if fused and keras.backend.backend() == "jax":
        at_once += JAX_POSITION_BUFFERS * _position_chunk_bytes(
            b, model.num_heads, m, span, c
        )
    vocabulary = model.vocabulary_size if model.adaptive_softmax is None else d
    logits = 3 * b * m * vocabulary * 4
    activations = model.num_layers * kept + at_once + logits
    if keras.backend.backend() == "torch":
        # Eager autograd and the caching allocator hold more than XLA's
        # planned buffers: 49.1 GiB measured where the XLA-calibrated
        # estimate gives 36.5 (enwik8_large, full span, remat="layer").
        activations *= TORCH_FACTOR
    return int(params + state + activations)


def _position_chunk_bytes(batch, heads, queries, span, itemsize):
    """Bytes of the position scores of one batch chunk of the Pallas path
    (it splits the batch so that they stay under its cap)."""
    from keras_allattn.ops.pallas_attention import position_chunks

    n = position_chunks(batch, heads, queries, span, itemsize)
    return (batch // n) * heads * queries * span * itemsize


def _parameter_count(model):
    """Parameters from the constructor arguments (the model may be unbuilt)."""
    d, layers = model.hidden_dim, model.num_layers
    per_layer = 4 * d * d + 2 * model.persistent_memory_size * d + 2 * d
    if model.feedforward_dim:
        per_layer += 2 * d * model.feedforward_dim + 2 * d
    vocabulary = model.vocabulary_size
    return layers * per_layer + 2 * vocabulary * d + vocabulary


def choose_remat(model, budget=None):
    """The least recomputation whose estimate fits; raises if none does.

    Tries no recomputation, then (portable path only: the fused kernels keep
    no scores) the attention's, then whole layers'.

    Returns:
        (remat, estimate_bytes, budget_bytes).

    Raises:
        ValueError: naming the estimate, the budget and what to change,
            before anything is compiled.
    """
    budget = memory_budget_bytes() if budget is None else budget
    usable = HEADROOM * budget
    fused = uses_fused_kernels(model)
    options = [False] + ([] if fused else ["attention"]) + ["layer"]
    for remat in options:
        need = training_memory_bytes(model, remat, fused)
        if need <= usable:
            return remat, need, budget
    check_fits(model, "layer", budget, fused)


def check_fits(model, remat, budget=None, fused=None):
    """Raises ValueError before compiling when `remat` cannot fit."""
    budget = memory_budget_bytes() if budget is None else budget
    fused = uses_fused_kernels(model) if fused is None else fused
    need = training_memory_bytes(model, remat, fused)
    if need <= HEADROOM * budget:
        return need
    per_row = need - training_memory_bytes(
        _with_batch(model, 0), remat, fused
    )
    fixed = need - per_row
    fitting = math.floor((HEADROOM * budget - fixed) / (per_row / model.batch_size))
    advice = [
        f"a smaller `batch_size` ({fitting} would fit)" if fitting >= 1
        else "a smaller `max_span` or model (no batch size fits)",
        "a smaller `max_span`",
    ]
    if remat != "layer":
        advice.insert(0, 'remat="layer" (or "auto")')
    if not fused and model.implementation != "portable":
        reason = fused_kernel_applies(
            model.hidden_dim // model.num_heads, model.dropout
        )[1]
        advice.append(f"a device with the fused kernels (here: {reason})")
    elif model.implementation == "portable":
        advice.append('implementation="auto" on a GPU (fused kernels)')
    advice.append(f"more memory ({MEMORY_ENV} sets the budget)")
    raise ValueError(
        f"Training this AllAttentionLM needs about {need / GIB:.1f} GiB "
        f"(batch_size={model.batch_size}, max_span={model.max_span}, "
        f"num_layers={model.num_layers}, remat={remat!r}, "
        f"{'fused kernels' if fused else 'portable attention'}), more than "
        f"{HEADROOM:.0%} of the {budget / GIB:.1f} GiB available. Use "
        + "; or ".join(advice) + "."
    )


class _Geometry:
    """The attributes the estimate reads, with another batch size."""

    def __init__(self, model, batch_size):
        for name in ("block_size", "hidden_dim", "num_heads", "max_span",
                     "persistent_memory_size", "num_layers",
                     "feedforward_dim", "vocabulary_size", "adaptive_softmax",
                     "compute_dtype", "implementation", "dropout"):
            setattr(self, name, getattr(model, name))
        self.batch_size = batch_size


def _with_batch(model, batch_size):
    return _Geometry(model, batch_size)
