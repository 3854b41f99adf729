"""The counter-based attention dropout (keras_allattn.ops.random).

The mask is compared bit for bit with a NumPy uint32 transcription of its
definition (tests/reference.py), and the attention layer with dropout with
the float64 reference using that mask. Its statistics are checked too.
"""

import keras
import numpy as np
import pytest

from keras_allattn.ops import random as dropout_hash
from keras_allattn.ops.attention import portable_all_attention
from tests import reference
from tests.test_layers import B, D_MODEL, H, L, M, build_attention

SEEDS = [(0, 0), (1, 2), (809713578, 0), (2**31 - 1, 2**31 - 1), (12345, 77)]


def _np(x):
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize("seed", SEEDS)
def test_row_keys_and_factors_match_numpy(seed):
    b, h, m = 3, 2, 7
    keys = _np(dropout_hash.attention_dropout_keys(np.asarray(seed), b, h, m))
    want = reference.dropout_keys(seed, b, h, m)
    assert keys.dtype == np.int32
    assert np.array_equal(keys.astype(np.int64) & 0xFFFFFFFF, want.astype(np.int64))
    columns = np.concatenate([np.arange(50, 0, -1), -1 - np.arange(9)]).astype("int32")
    for rate in (0.1, 0.3, 0.75):
        got = _np(dropout_hash.dropout_multiplier(
            keys[..., None], columns, rate
        ))
        expected = reference.dropout_factors(want[..., None], columns, rate)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_context_columns_count_keys_from_the_last():
    """Column ids of the layout by distance: query i's key at distance r is
    the (M - 1 - i + r)-th key before the last, the same key for every
    query (so adjacent keys of a row pair up alike in every row)."""
    m, a = 5, 7
    ids = _np(dropout_hash.context_columns(m, a))
    assert ids.shape == (m, a)
    for i in range(m):
        for c in range(a):
            r = a - c
            key = a + i - r  # row of the key in [memory; block]
            assert ids[i, c] == (a + m - 1) - key


def test_two_weights_share_one_hash():
    """Ids 2p and 2p + 1 take the low and high halves of one hash."""
    keys = np.asarray([[123456789], [-5]], "int32")
    rate = 0.3
    u = np.arange(0, 64, dtype="int32")
    got = _np(dropout_hash.dropout_multiplier(keys, u, rate))
    keys64 = (np.asarray(keys, np.int64) & 0xFFFFFFFF).astype(np.uint64)
    want = reference.dropout_factors(keys64, u, rate)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    x = reference._mix(keys64 ^ (((u >> 1).astype(np.uint64) * 0x85EBCA6B) & 0xFFFFFFFF))
    low = (x & 0xFFFF)[:, 0::2]
    high = (x >> 16)[:, 1::2]
    threshold = round(0.7 * 2**16)
    np.testing.assert_array_equal(got[:, 0::2] > 0, low < threshold)
    np.testing.assert_array_equal(got[:, 1::2] > 0, high < threshold)


def test_seed_from_a_seed_generator_draws_a_new_mask_each_step():
    generator = keras.random.SeedGenerator(3)
    first = _np(dropout_hash.attention_dropout_keys(generator.next(), 2, 2, 4))
    second = _np(dropout_hash.attention_dropout_keys(generator.next(), 2, 2, 4))
    assert not np.array_equal(first, second)


def test_next_seed_draws_as_the_seed_generator_does():
    """`next_seed` gives `SeedGenerator.next()`'s draws and leaves the
    generator's state where `next()` would."""
    ours, keras_own = keras.random.SeedGenerator(7), keras.random.SeedGenerator(7)
    for _ in range(3):
        np.testing.assert_array_equal(
            _np(dropout_hash.next_seed(ours)), _np(keras_own.next())
        )
        np.testing.assert_array_equal(_np(ours.state), _np(keras_own.state))


@pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="a PyTorch trace's constants"
)
def test_next_seed_traces_without_a_host_constant():
    """Traced (as the compiled PyTorch step is), `next_seed` holds no
    tensor constant: each would be a host tensor copied to the device at
    every step (Keras's `next()` adds its step `[0, 1]` as one)."""
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    generator = keras.random.SeedGenerator(7)
    variable = generator.state

    def step(value):
        with keras.StatelessScope(state_mapping=[(variable, value)]) as scope:
            seed = dropout_hash.next_seed(generator)
            return seed, scope.get_current_value(variable)

    traced = make_fx(step)(torch.clone(variable.value))
    constants = [n.target for n in traced.graph.nodes if n.op == "get_attr"]
    assert constants == []
    seed, state = traced(torch.tensor([7, 5], dtype=variable.value.dtype))
    assert seed.tolist() == [7, 5] and state.tolist() == [7, 6]


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_keep_rate_and_independence(rate):
    b, h, m, a = 2, 4, 64, 1024
    keys = dropout_hash.attention_dropout_keys(np.asarray((7, 11)), b, h, m)
    columns = dropout_hash.context_columns(m, a)
    kept = _np(dropout_hash.dropout_multiplier(keys[..., None], columns, rate)) > 0
    n = kept.size
    keep = 1.0 - rate
    sigma = np.sqrt(keep * rate / n)
    assert abs(kept.mean() - keep) < 5 * sigma
    # Per row and per column: binomial spread, no position is favoured.
    rows = kept.reshape(-1, a).mean(-1)
    assert abs(rows.std() - np.sqrt(keep * rate / a)) < 0.25 * np.sqrt(keep * rate / a)
    cols = kept.reshape(-1, a).mean(0)
    assert abs(cols.std() - np.sqrt(keep * rate / (n // a))) < 0.25 * np.sqrt(
        keep * rate / (n // a)
    )
    # Neighbouring decisions (along keys, queries, heads) are uncorrelated.
    x = kept.astype(np.float64) - kept.mean()
    limit = 5 / np.sqrt(n)
    for axis in (1, 2, 3):
        a0 = np.take(x, np.arange(x.shape[axis] - 1), axis=axis)
        a1 = np.take(x, np.arange(1, x.shape[axis]), axis=axis)
        corr = (a0 * a1).mean() / x.var()
        assert abs(corr) < limit, (axis, corr)
    # The next step's seed draws an independent mask.
    other = dropout_hash.attention_dropout_keys(np.asarray((7, 12)), b, h, m)
    kept2 = _np(dropout_hash.dropout_multiplier(other[..., None], columns, rate)) > 0
    agree = (kept == kept2).mean()
    assert abs(agree - (keep**2 + rate**2)) < 5 * np.sqrt(0.25 / n)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(persistent_memory_size=0),
        dict(persistent_memory_size=6, adaptive_span=True, span_ramp=4),
        dict(persistent_memory_size=6, integration="separate"),
    ],
    ids=["context", "joint_span", "separate"],
)
def test_layer_with_dropout_matches_numpy(rng, kwargs):
    layer, positions = build_attention(rng, dropout=0.3, **kwargs)
    w = reference.attention_weights(layer, positions.table)
    memory = rng.normal(size=(B, L, D_MODEL))
    x = rng.normal(size=(B, M, D_MODEL))
    seed = _np(layer.seed_generator.state)
    actual = layer(
        x.astype("float32"), memory=memory.astype("float32"),
        position_keys=positions(x), training=True,
    )
    expected = reference.attention(
        x, memory, w, H, L, layer.span_ramp, layer.integration,
        dropout=(0.3, seed),
    )
    assert reference.relative_error(actual, expected) < 1e-5
    # Without the mask the outputs differ: dropout is active.
    plain = reference.attention(x, memory, w, H, L, layer.span_ramp,
                                layer.integration)
    assert reference.relative_error(plain, expected) > 1e-2


def test_mask_follows_the_distance_when_the_span_is_trimmed(rng):
    """A key keeps its mask when older memory rows are trimmed away."""
    rng_ = np.random.default_rng(5)
    b, m, a, h, d, n = 2, 6, 20, 2, 4, 3
    q = rng_.normal(size=(b, m, h, d)).astype("float32")
    k = rng_.normal(size=(b, a + m, h, d)).astype("float32")
    v = rng_.normal(size=(b, a + m, h, d)).astype("float32")
    pos = rng_.normal(size=(d, a)).astype("float32")
    pk = rng_.normal(size=(h, n, d)).astype("float32")
    z = np.asarray([0.1, 0.2], "float32")  # spans 4 + 2 and 4 + 4 of L = 20
    seed = np.asarray((3, 9))
    common = dict(span_ratio=z, max_span=a, span_ramp=4, dropout_rate=0.4,
                  dropout_seed=seed)
    full = portable_all_attention(q, k, v, pos, pk, pk, **common)
    trim = 10
    trimmed = portable_all_attention(
        q, k[:, a - trim:], v[:, a - trim:], pos[:, a - trim:], pk, pk, **common
    )
    np.testing.assert_allclose(_np(trimmed), _np(full), rtol=1e-5, atol=1e-6)


def test_dropout_needs_a_seed():
    q = np.ones((1, 2, 1, 4), "float32")
    k = np.ones((1, 5, 1, 4), "float32")
    pos = np.ones((4, 3), "float32")
    with pytest.raises(ValueError, match="dropout_seed"):
        portable_all_attention(q, k, k, pos, dropout_rate=0.2)
    with pytest.raises(ValueError, match=r"rate=1\.0"):
        dropout_hash.keep_threshold(1.0)
