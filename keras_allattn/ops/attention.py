"""The all-attention math (SPEC §1), written with `keras.ops` only.

This module is the portable reference path. Backend-specific fused kernels
are reached through `all_attention(..., implementation=...)`, the single
dispatch point, and are tested against `portable_all_attention`.

Layout conventions (shape comments use these letters):
    B batch, M queries (block), A attended distances (span after trimming),
    H heads, D head width, N persistent vectors per head.
Context scores are indexed by column `c = 0 .. A-1` holding distance
`r = A - c` (the oldest key first), as in the reference implementation.

The settings shared with the fused kernels (integrations, deterministic
mode, tile sizes) live in `kernel_settings`; `set_deterministic` and
`is_deterministic` are reachable here too. The portable path has no
atomics, hence nothing to make deterministic.
"""

import math

import keras
import numpy as np
from keras import ops
from keras import random

from keras_allattn.ops.kernel_settings import INTEGRATIONS  # noqa: F401
from keras_allattn.ops.kernel_settings import is_deterministic  # noqa: F401
from keras_allattn.ops.kernel_settings import resolve_deterministic  # noqa: F401
from keras_allattn.ops.kernel_settings import set_deterministic  # noqa: F401
from keras_allattn.ops.kernel_settings import tile_size_reason
from keras_allattn.ops.random import attention_dropout_keys
from keras_allattn.ops.random import context_columns
from keras_allattn.ops.random import dropout_multiplier
from keras_allattn.ops.random import next_seed
from keras_allattn.ops.random import persistent_columns

IMPLEMENTATIONS = ("auto", "portable", "fused")

# Added to the renormalisation denominators, as the reference does.
SPAN_EPSILON = 1e-8


def span_mask(span_ratio, max_span, span_ramp, length):
    """Soft adaptive-span mask over the `length` most recent distances.

    `m(r) = clip((R + z * L - r + 1) / R, 0, 1)` for distances
    `r = length .. 1` (column `c` holds distance `length - c`).

    Args:
        span_ratio: float tensor (H,), the learned ratios `z` in [0, 1].
        max_span: int, the maximum span `L`.
        span_ramp: int, the ramp width `R`.
        length: int, the number of distances kept (`<= max_span`).

    Returns:
        A float32 tensor (H, length).
    """
    distance = ops.arange(length, 0, -1, dtype="float32")  # (A,)
    z = ops.cast(span_ratio, "float32")[:, None]  # (H, 1)
    mask = (span_ramp + z * max_span - distance[None, :] + 1.0) / span_ramp
    # Clip whose gradient passes on [0, 1] ends included, as torch.clamp's
    # does in the reference: at z = 0 both ends fall on whole distances.
    inside = ops.logical_and(mask >= 0.0, mask <= 1.0)
    return ops.where(inside, mask, ops.clip(mask, 0.0, 1.0))


def _leading_dims(x, count):
    """The first `count` sizes of `x`, for the new shape of a reshape.

    Static sizes when they are all known (the training path: shapes are
    unchanged). A size unknown when tracing (the batch of a TensorFlow
    graph traced for any batch, as in the SavedModel export) becomes -1
    when it is the only one, else the size read at run time.
    """
    lead = tuple(x.shape[:count])
    unknown = [i for i, size in enumerate(lead) if size is None]
    if not unknown:
        return lead
    if len(unknown) == 1:
        return tuple(-1 if size is None else size for size in lead)
    dynamic = ops.shape(x)
    return tuple(dynamic[i] if size is None else size
                 for i, size in enumerate(lead))


def unskew(scores, length):
    """Turn query-by-key scores into query-by-distance scores.

    Args:
        scores: (..., M, length + M): score of query `i` with key `j`, where
            key `j` sits `length + i - j` positions before query `i`.
        length: the number of distances `A`.

    Returns:
        (..., M, length): column `c` holds the score at distance `A - c`.
    """
    *lead, m, total = scores.shape
    lead = _leading_dims(scores, len(lead))
    flat = ops.reshape(scores, (*lead, m * total))
    flat = ops.pad(flat, [(0, 0)] * len(lead) + [(0, m)])
    rows = ops.reshape(flat, (*lead, m, total + 1))
    return rows[..., :length]


def skew(weights):
    """Inverse of `unskew`: place distance weights at their key positions.

    Args:
        weights: (..., M, A), column `c` for distance `A - c`.

    Returns:
        (..., M, A + M) weights over keys, zeros elsewhere.
    """
    *lead, m, length = weights.shape
    lead = _leading_dims(weights, len(lead))
    padded = ops.pad(weights, [(0, 0)] * len(lead) + [(0, 0), (0, m + 1)])
    flat = ops.reshape(padded, (*lead, m * (length + m + 1)))
    flat = flat[..., : m * (length + m)]
    return ops.reshape(flat, (*lead, m, length + m))


def apply_span_mask(weights, mask, normalize=True):
    """Multiplies attention weights by a span mask, then renormalises.

    Args:
        weights: (..., A) attention weights.
        mask: a tensor broadcastable to `weights`, values in [0, 1].
        normalize: whether to divide by the masked sum plus 1e-8.

    Returns:
        The masked weights, same shape as `weights`.
    """
    weights = weights * mask
    if normalize:
        weights = _renormalise(weights, ops.sum(weights, -1, keepdims=True))
    return weights


def _renormalise(weights, total):
    return weights / (total + SPAN_EPSILON)


def _dropout_keys(query, rate, seed):
    """The (B, H, M, 1) dropout row keys of a call, or None without dropout."""
    if rate <= 0.0:
        return None
    if seed is None:
        raise ValueError(
            "`dropout_seed` is needed when `dropout_rate` > 0. Received: "
            f"dropout_rate={rate}, dropout_seed=None"
        )
    if isinstance(seed, random.SeedGenerator):
        seed = next_seed(seed)
    batch, queries, heads = _leading_dims(query, 3)
    return attention_dropout_keys(seed, batch, heads, queries)[..., None]


def attention_probabilities(
    query,
    key,
    position_keys,
    persistent_keys=None,
    span_ratio=None,
    max_span=None,
    span_ramp=32,
    integration="joint",
):
    """The attention weights of `portable_all_attention`, before dropout.

    The weights the portable path multiplies with the values (it calls
    this function): the softmax over context and persistent scores (one
    or two, by `integration`), the adaptive-span mask and the
    renormalisation applied. Attention dropout is not applied: these are
    the weights of evaluation.

    Args:
        query: (B, M, H, D) projected queries.
        key: (B, A + M, H, D) projected keys of `[memory; inputs]`.
        position_keys: (D, A) relative-position keys; column `c` is the key
            of distance `A - c`.
        persistent_keys: None or (H, N, D) persistent keys, as used.
        span_ratio: None or (H,) adaptive-span ratios `z`.
        max_span: int `L`, needed with `span_ratio`.
        span_ramp: int `R`.
        integration: "joint" or "separate" (see `portable_all_attention`).

    Returns:
        `(context, persistent)`: float32 context weights (B, H, M, A),
        column `c` for distance `A - c` (the oldest first), and the
        persistent weights (B, H, M, N), or None without persistent keys.
        With "joint" the two together sum to 1 for every query (up to the
        1e-8 of the span renormalisation); with "separate" each sums to 1.
    """
    length = position_keys.shape[-1]
    head_dim = query.shape[-1]
    scale = 1.0 / math.sqrt(head_dim)
    q = ops.transpose(query, (0, 2, 1, 3))  # (B, H, M, D)
    k = ops.transpose(key, (0, 2, 1, 3))  # (B, H, A+M, D)

    context = unskew(ops.matmul(q, ops.swapaxes(k, -1, -2)), length)
    context = context + ops.matmul(q, ops.cast(position_keys, q.dtype))
    context = ops.cast(context, "float32") * scale  # (B, H, M, A)

    mask = None
    if span_ratio is not None:
        mask = span_mask(span_ratio, max_span, span_ramp, length)
        mask = mask[None, :, None, :]  # (1, H, 1, A)

    persistent = None
    if persistent_keys is not None:
        pk = ops.cast(persistent_keys, q.dtype)[None]  # (1, H, N, D)
        persistent = ops.matmul(q, ops.swapaxes(pk, -1, -2))
        persistent = ops.cast(persistent, "float32") * scale  # (B, H, M, N)

    if persistent is None or integration == "separate":
        context = ops.softmax(context, axis=-1)
        if mask is not None:
            context = apply_span_mask(context, mask)
        if persistent is not None:
            persistent = ops.softmax(persistent, axis=-1)
    else:
        num_context = context.shape[-1]
        joint = ops.softmax(ops.concatenate([context, persistent], -1), -1)
        context, persistent = joint[..., :num_context], joint[..., num_context:]
        if mask is not None:
            context = context * mask
            total = ops.sum(context, -1, keepdims=True) + ops.sum(
                persistent, -1, keepdims=True
            )
            context = _renormalise(context, total)
            persistent = _renormalise(persistent, total)
    return context, persistent


def portable_all_attention(
    query,
    key,
    value,
    position_keys,
    persistent_keys=None,
    persistent_values=None,
    span_ratio=None,
    max_span=None,
    span_ramp=32,
    integration="joint",
    dropout_rate=0.0,
    dropout_seed=None,
):
    """All-attention with `keras.ops`; the reference for fused kernels.

    Args:
        query: (B, M, H, D) projected queries.
        key: (B, A + M, H, D) projected keys of `[memory; inputs]`, the
            memory trimmed to its last `A` rows.
        value: (B, A + M, H, D) projected values, same rows as `key`.
        position_keys: (D, A) relative-position keys; column `c` is the key
            of distance `A - c`.
        persistent_keys: None or (H, N, D) persistent keys, as used (the
            reference's stored value times `sqrt(D)`).
        persistent_values: None or (H, N, D) persistent values, as used.
        span_ratio: None or (H,) adaptive-span ratios `z`.
        max_span: int `L`, needed with `span_ratio`.
        span_ramp: int `R`.
        integration: "joint" (one softmax over context and persistent
            scores) or "separate" (two softmaxes, outputs summed).
        dropout_rate: dropout rate on the attention weights (0 when not
            training).
        dropout_seed: the seed of the dropout: a `keras.random.SeedGenerator`
            or a seed tensor (`SeedGenerator.next()`), needed when
            `dropout_rate > 0`. The mask is the counter-based one of
            `keras_allattn.ops.random`, drawn identically by the fused
            kernels.

    Returns:
        (B, M, H, D) attention outputs, in the dtype of `query`.
    """
    out_dtype = query.dtype
    length = position_keys.shape[-1]
    v = ops.transpose(value, (0, 2, 1, 3))  # (B, H, A+M, D)
    context, persistent = attention_probabilities(
        query, key, position_keys, persistent_keys=persistent_keys,
        span_ratio=span_ratio, max_span=max_span, span_ramp=span_ramp,
        integration=integration,
    )

    keys = _dropout_keys(query, dropout_rate, dropout_seed)
    if keys is not None:
        context = context * dropout_multiplier(
            keys, context_columns(ops.shape(query)[1], length), dropout_rate
        )
    out = ops.matmul(ops.cast(skew(context), v.dtype), v)  # (B, H, M, D)
    if persistent is not None:
        if keys is not None:
            persistent = persistent * dropout_multiplier(
                keys, persistent_columns(persistent.shape[-1]), dropout_rate
            )
        pv = ops.cast(persistent_values, v.dtype)[None]  # (1, H, N, D)
        out = out + ops.matmul(ops.cast(persistent, v.dtype), pv)
    return ops.cast(ops.transpose(out, (0, 2, 1, 3)), out_dtype)


def all_attention(*args, implementation="auto", **kwargs):
    """The dispatch point for all-attention implementations.

    Takes the arguments of `portable_all_attention` plus `implementation`:

    - "portable": the `keras.ops` reference path, on every backend.
    - "fused": the fused kernel of the backend (Pallas on JAX with a GPU,
      Triton on PyTorch with CUDA tensors); raises ValueError where there
      is none.
    - "auto": the fused kernel where it applies, else the portable path.

    Attention dropout draws the same counter-based mask on every path
    (`keras_allattn.ops.random`), so the fused kernels compute the portable
    path's function with dropout too.

    Returns:
        (B, M, H, D) attention outputs.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"`implementation` must be one of {IMPLEMENTATIONS}. "
            f"Received: implementation={implementation!r}"
        )
    if implementation != "portable":
        fused, reason = _fused_kernel(*args, **kwargs)
        if fused is not None:
            query = kwargs.get("query", args[0] if args else None)
            rate = kwargs.pop("dropout_rate", 0.0)
            seed = kwargs.pop("dropout_seed", None)
            keys = _dropout_keys(query, rate, seed)
            if keys is not None:
                kwargs["dropout_rate"] = rate
                kwargs["dropout_keys"] = keys[..., 0]
            return fused(*args, **kwargs)
        if implementation == "fused":
            raise ValueError(
                f"No fused all-attention kernel applies here: {reason}. "
                f"Received: implementation={implementation!r}"
            )
    return portable_all_attention(*args, **kwargs)


def fused_kernel_applies(head_dim, dropout_rate=0.0):
    """Whether `implementation="auto"` will run a fused kernel here.

    Decided from the backend and its devices, before any tensor exists
    (`all_attention` checks the tensors themselves when it is called).

    Args:
        head_dim: int, the head width `D`.
        dropout_rate: the attention dropout rate of training.

    Returns:
        (bool, reason): the reason says why not when the answer is False.
    """
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        from keras_allattn.ops import triton_attention

        if not torch.cuda.is_available():
            return False, "PyTorch has no CUDA device"
        if not triton_attention.triton_available():
            return False, "triton is not installed"
        if dropout_rate > 0.0 and not triton_attention.HAS_DROPOUT:
            return False, "attention dropout is active"
        return True, ""
    if backend == "jax":
        import jax

        if jax.default_backend() != "gpu":
            return False, "JAX runs on no GPU"
        reason = tile_size_reason(head_dim)
        if reason:
            return False, reason
        return True, ""
    return False, f"no fused kernel for the {backend} backend"


def _fused_kernel(query, *args, dropout_rate=0.0, **kwargs):
    """The backend's fused kernel for these inputs, or (None, reason)."""
    backend = keras.backend.backend()
    if backend == "torch":
        from keras_allattn.ops import triton_attention

        if not getattr(query, "is_cuda", False):
            return None, "the inputs are not on a CUDA device"
        if not triton_attention.triton_available():
            return None, "triton is not installed"
        if dropout_rate > 0.0 and not triton_attention.HAS_DROPOUT:
            return None, "attention dropout is active"
        # The kernels run inside PyTorch custom operators: `make_fx` and
        # `torch.compile` trace them into their graphs.
        return triton_attention.triton_all_attention, ""
    if backend == "jax":
        import jax

        if jax.default_backend() != "gpu":
            return None, "JAX runs on no GPU"
        reason = tile_size_reason(query.shape[-1])
        if reason:
            return None, reason
        from keras_allattn.ops.pallas_attention import pallas_all_attention

        return batch_sharded(pallas_all_attention), ""
    return None, f"no fused kernel for the {backend} backend"


def batch_sharded(kernel, distribution=None):
    """`kernel` run per batch shard under a data-parallel distribution (JAX).

    XLA cannot partition a Pallas kernel: under `keras.distribution` it
    would gather the batch onto every device and run the whole kernel on
    each. This wraps the kernel in `jax.shard_map` over the distribution's
    batch axis instead: each device runs it on its own rows (query, key and
    value sharded along the batch; the position keys, persistent vectors
    and span ratios replicated, their gradients summed over the devices).
    Without a distribution, or with one device along the batch axis, it
    returns `kernel` unchanged.

    Args:
        kernel: a function with `pallas_all_attention`'s signature.
        distribution: the `keras.distribution.Distribution`; default the
            current one.
    """
    import jax

    distribution = distribution or keras.distribution.distribution()
    axis = getattr(distribution, "batch_dim_name", None)
    if axis is None:
        return kernel
    mesh = distribution.device_mesh
    if mesh.shape[list(mesh.axis_names).index(axis)] == 1:
        return kernel
    devices = np.asarray(mesh.devices)
    jax_mesh = jax.sharding.Mesh(
        np.array([_jax_device(d) for d in devices.flat]).reshape(devices.shape),
        tuple(mesh.axis_names),
    )
    spec = jax.sharding.PartitionSpec

    def run(query, key, value, position_keys, persistent_keys=None,
            persistent_values=None, span_ratio=None, dropout_keys=None,
            **static):
        # The dropout row keys are cut along the batch like the queries:
        # each device draws its rows' part of the single-device mask.
        arrays = (query, key, value, position_keys, persistent_keys,
                  persistent_values, span_ratio, dropout_keys)
        in_specs = tuple(
            spec(axis) if i < 3 or i == 7 else spec() for i in range(8)
        )

        def local(q, k, v, pos, pk, pv, ratio, keys):
            return kernel(q, k, v, pos, persistent_keys=pk,
                          persistent_values=pv, span_ratio=ratio,
                          dropout_keys=keys, **static)

        return jax.shard_map(
            local, mesh=jax_mesh, in_specs=in_specs, out_specs=spec(axis),
            check_vma=False,
        )(*arrays)

    return run


def _jax_device(device):
    """A `jax.Device` from a Keras device name ("gpu:1") or a device."""
    import jax

    if isinstance(device, jax.Device):
        return device
    platform, _, index = str(device).partition(":")
    for candidate in jax.devices(platform):
        if candidate.id == int(index or 0):
            return candidate
    raise ValueError(f"No JAX device named {device!r}")
