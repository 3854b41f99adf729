"""An independent float64 NumPy implementation of SPEC.md §1-§3.

Written from the specification, not from the library: distances are
gathered explicitly (no skew trick) and the adaptive-span mask is applied
by multiplying the softmax weights and renormalising, as the reference
implementation does.
"""

import math

import numpy as np


def softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def layer_norm(x, gamma, beta, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def span_mask(z, max_span, ramp):
    """m[h, r-1] = clip((R + z_h L - r + 1) / R, 0, 1) for r = 1..L."""
    r = np.arange(1, max_span + 1, dtype=np.float64)
    return np.clip((ramp + z[:, None] * max_span - r[None, :] + 1) / ramp, 0, 1)


_U32 = np.uint32


def _mix(x):
    """lowbias32 on uint32 arrays (wrapping products)."""
    x = np.asarray(x, np.uint64) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def dropout_keys(seed, batch, heads, queries):
    """Row keys (B, H, M) of the counter-based attention dropout, uint64."""
    s0, s1 = (int(v) & 0xFFFFFFFF for v in np.asarray(seed).reshape(-1)[:2])
    call = _mix(s0 ^ int(_mix((s1 + 0x9E3779B9) & 0xFFFFFFFF)))
    index = np.arange(batch * heads * queries, dtype=np.uint64)
    keys = _mix((int(call) + index * 0x9E3779B9) & 0xFFFFFFFF)
    return keys.reshape(batch, heads, queries)


def dropout_factors(keys, columns, rate):
    """0 or 1 / (1 - rate) for row keys (..., 1) and column ids `u`: the
    hash of the pair `u >> 1`, its 16-bit half `u & 1`."""
    u = (np.asarray(columns, np.int64) & 0xFFFFFFFF).astype(np.uint64)
    x = _mix(keys ^ (((u >> 1) * 0x85EBCA6B) & 0xFFFFFFFF))
    bits = (x >> (16 * (u & 1))) & 0xFFFF
    threshold = int(round((1.0 - rate) * 2**16))
    return np.where(bits < threshold, 1.0 / (1.0 - rate), 0.0)


def context_column_ids(queries, length):
    """(M, A) column ids of the context weights by distance `r = 1 .. A`
    (axis 1 is `r - 1`): the key's place from the last key, M - 1 - i + r."""
    return (queries - 1 - np.arange(queries))[:, None] + np.arange(1, length + 1)[None, :]


def attention_probabilities(x, memory, w, num_heads, max_span, ramp=32,
                            integration="joint"):
    """The attention weights of one sublayer, before dropout.

    Args: as `attention`.

    Returns:
        `(a_ctx, a_pers, v_r)`: context weights (B, H, M, L) with axis 3
        the distance `r - 1` (the previous token first), persistent weights
        (B, H, M, N) or None, and the values by distance (B, M, L, H, D).
    """
    batch, block, d = x.shape
    head_dim = d // num_heads
    length = max_span
    joined = np.concatenate([memory[:, -length:], x], axis=1)  # (B, L+M, d)
    q = (x @ w["query"]).reshape(batch, block, num_heads, head_dim)
    k = (joined @ w["key"]).reshape(batch, length + block, num_heads, head_dim)
    v = (joined @ w["value"]).reshape(batch, length + block, num_heads, head_dim)

    # Query i sits at index L + i of `joined`; distance r is index L + i - r.
    r = np.arange(1, length + 1)
    index = length + np.arange(block)[:, None] - r[None, :]  # (M, L)
    k_r = k[:, index]  # (B, M, L, H, D)
    v_r = v[:, index]
    p_r = w["position"][:, length - r].T  # (L, D): p_r is column L - r
    logits = np.einsum("bihd,birhd->bhir", q, k_r)
    logits += np.einsum("bihd,rd->bhir", q, p_r)
    logits /= math.sqrt(head_dim)  # (B, H, M, L), axis 3 = distance r - 1

    mask = None
    if w.get("span_ratio") is not None:
        mask = span_mask(w["span_ratio"], max_span, ramp)[None, :, None, :]

    a_pers = None
    if w.get("persistent_keys") is not None:
        pk = w["persistent_keys"] * math.sqrt(head_dim)
        pers_logits = np.einsum("bihd,hnd->bhin", q, pk) / math.sqrt(head_dim)
        if integration == "joint":
            joint = softmax(np.concatenate([logits, pers_logits], -1))
            a_ctx, a_pers = joint[..., :length], joint[..., length:]
            if mask is not None:
                a_ctx = a_ctx * mask
                total = a_ctx.sum(-1, keepdims=True) + a_pers.sum(-1, keepdims=True)
                a_ctx = a_ctx / (total + 1e-8)
                a_pers = a_pers / (total + 1e-8)
            return a_ctx, a_pers, v_r
        a_pers = softmax(pers_logits)
    a_ctx = softmax(logits)
    if mask is not None:
        a_ctx = a_ctx * mask
        a_ctx = a_ctx / (a_ctx.sum(-1, keepdims=True) + 1e-8)
    return a_ctx, a_pers, v_r


def attention(x, memory, w, num_heads, max_span, ramp=32, integration="joint",
              dropout=None):
    """One all-attention sublayer (before residual and LayerNorm).

    Args:
        x: (B, M, d) inputs. memory: (B, L, d) previous inputs (L = max_span).
        w: dict with query, key, value, output (d, d) kernels, position
            (D, L), optional persistent_keys / persistent_values (H, N, D)
            as stored, optional span_ratio (H,).
        dropout: None or (rate, seed): attention dropout with the
            counter-based mask (distance `r` for context weights,
            `2^32 - 1 - n` for persistent vector `n`).

    Returns:
        (B, M, d) outputs.
    """
    batch, block, d = x.shape
    a_ctx, a_pers, v_r = attention_probabilities(
        x, memory, w, num_heads, max_span, ramp, integration
    )
    has_persistent = a_pers is not None
    r = np.arange(1, max_span + 1)
    if has_persistent:
        n = w["persistent_keys"].shape[1]
        pv = w["persistent_values"] * math.sqrt(n)

    if dropout is not None:
        rate, seed = dropout
        keys = dropout_keys(seed, batch, num_heads, block)[..., None]
        a_ctx = a_ctx * dropout_factors(keys, context_column_ids(block, max_span), rate)
        if has_persistent:
            a_pers = a_pers * dropout_factors(keys, -1 - np.arange(n), rate)

    out = np.einsum("bhir,birhd->bihd", a_ctx, v_r)
    if has_persistent:
        out = out + np.einsum("bhin,hnd->bihd", a_pers, pv)
    return out.reshape(batch, block, d) @ w["output"]


def model_forward(tokens, memories, weights, config, probabilities=None):
    """The whole network on one segment.

    Args:
        tokens: (B, M) ints. memories: list of (B, L, d) arrays.
        weights: dict from `extract_weights`. config: model config dict.
        probabilities: None, or a list to which `(a_ctx, a_pers)` of every
            layer is appended (see `attention_probabilities`).

    Returns:
        (logits (B, M, V), next memories).
    """
    h = weights["embedding"][tokens]
    next_memories = []
    max_span = config["max_span"]
    for i, layer in enumerate(weights["layers"]):
        joined = np.concatenate([memories[i], h], axis=1)
        next_memories.append(joined[:, -max_span:])
        args = (h, memories[i], layer, config["num_heads"], max_span,
                config["span_ramp"], config["integration"])
        if probabilities is not None:
            probabilities.append(attention_probabilities(*args)[:2])
        out = attention(*args)
        h = layer_norm(h + out, *layer["norm"])
        if "inner" in layer:
            inner = np.maximum(h @ layer["inner"][0] + layer["inner"][1], 0)
            h = layer_norm(h + inner @ layer["outer"][0] + layer["outer"][1],
                           *layer["ff_norm"])
    logits = h @ weights["output"][0] + weights["output"][1]
    return logits, next_memories


def _np(variable):
    import keras

    return np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float64)


def attention_weights(layer, position_table):
    """Weights of a `PersistentMemoryAttention` layer as float64 arrays."""
    w = {
        "query": _np(layer.query_dense.kernel),
        "key": _np(layer.key_dense.kernel),
        "value": _np(layer.value_dense.kernel),
        "output": _np(layer.output_dense.kernel),
        "position": _np(position_table),
    }
    if layer.persistent_memory_size:
        w["persistent_keys"] = _np(layer.persistent_keys)
        w["persistent_values"] = _np(layer.persistent_values)
    if layer.span is not None:
        w["span_ratio"] = _np(layer.span.span_ratio)
    return w


def extract_weights(model):
    """All weights of an `AllAttentionLM` as float64 arrays."""
    table = model.relative_position.table
    layers = []
    for i, attn in enumerate(model.attention_layers):
        w = attention_weights(attn, table)
        norm = model.attention_norms[i]
        w["norm"] = (_np(norm.gamma), _np(norm.beta))
        if model.feedforward_layers:
            ff = model.feedforward_layers[i]
            w["inner"] = (_np(ff.inner_dense.kernel), _np(ff.inner_dense.bias))
            w["outer"] = (_np(ff.outer_dense.kernel), _np(ff.outer_dense.bias))
            ffn = model.feedforward_norms[i]
            w["ff_norm"] = (_np(ffn.gamma), _np(ffn.beta))
        layers.append(w)
    return {
        "embedding": _np(model.token_embedding.embeddings),
        "layers": layers,
        "output": (_np(model.output_dense.kernel), _np(model.output_dense.bias)),
    }


def relative_error(actual, expected):
    import keras

    actual = np.asarray(keras.ops.convert_to_numpy(actual), np.float64)
    expected = np.asarray(keras.ops.convert_to_numpy(expected), np.float64)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)
