"""`keras_allattn.analysis.attention_statistics` against float64 NumPy."""

import numpy as np
import pytest

from keras_allattn import AllAttentionLM
from keras_allattn.analysis import attention_statistics
from tests import reference
from tests.conftest import randomize

V, B, L = 23, 2, 10

BASE = dict(
    vocabulary_size=V, num_layers=2, hidden_dim=16, num_heads=4,
    persistent_memory_size=5, max_span=L, block_size=6, batch_size=B,
    adaptive_span=True, span_ramp=3,
)

CASES = {
    "joint_adaptive": dict(),
    # Blocks longer than the span, a warm-up inside a segment, fixed span.
    "fixed_long_block": dict(adaptive_span=False, block_size=14),
    "separate": dict(integration="separate"),
    "transformer": dict(persistent_memory_size=0, feedforward_dim=24),
}


def numpy_statistics(model, tokens, warmup):
    """The statistics from tests/reference.py, block by block in float64."""
    config = model.get_config()
    weights = reference.extract_weights(model)
    rows, length = tokens.shape
    memories = [np.zeros((rows, L, model.hidden_dim))] * model.num_layers
    context, persistent = [], []
    for start in range(0, length, model.block_size):
        probabilities = []
        _, memories = reference.model_forward(
            tokens[:, start : start + model.block_size], memories, weights,
            config, probabilities,
        )
        context.append([a for a, _ in probabilities])
        persistent.append([p for _, p in probabilities])
    # (layers, B, H, T, L) with axis 4 the distance r - 1.
    context = np.stack([np.concatenate(c, axis=2) for c in zip(*context)])
    counted = context[:, :, :, warmup:]
    by_distance = counted.mean(axis=(1, 3))
    if persistent[0][0] is None:
        share = np.zeros(by_distance.shape[:2])
    else:
        kept = np.stack([np.concatenate(p, axis=2) for p in zip(*persistent)])
        share = kept[:, :, :, warmup:].sum(-1).mean(axis=(1, 3))
    return share, by_distance


@pytest.mark.parametrize("case", sorted(CASES))
def test_statistics_match_numpy(rng, case):
    model = AllAttentionLM(**{**BASE, **CASES[case]})
    randomize(model, rng, 0.0, 0.8)
    tokens = rng.integers(0, V, (B, 30))  # whole segments: one compile
    warmup = 13 if case == "fixed_long_block" else None
    stats = attention_statistics(model, tokens, warmup_tokens=warmup)
    warmup = L if warmup is None else warmup

    share, by_distance = numpy_statistics(model, tokens, warmup)
    assert stats["queries"] == B * (30 - warmup)
    assert stats["mass_by_distance"].shape == (2, 4, L)
    np.testing.assert_allclose(stats["mass_by_distance"], by_distance,
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(stats["persistent_share"], share,
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(stats["context_share"],
                               stats["mass_by_distance"].sum(-1))
    np.testing.assert_array_equal(stats["spans"], model.current_spans())
    if case == "separate":
        # Two softmaxes: each part sums to 1 on its own.
        np.testing.assert_allclose(stats["context_share"], 1.0, atol=1e-5)
        np.testing.assert_allclose(stats["persistent_share"], 1.0, atol=1e-5)
    else:
        np.testing.assert_allclose(
            stats["context_share"] + stats["persistent_share"], 1.0, atol=1e-5
        )
    if case == "transformer":
        assert not stats["persistent_share"].any()
    if case == "fixed_long_block":
        assert (stats["spans"] == L).all()
    else:
        # The learned spans cut the mass off beyond them.
        beyond = np.arange(L)[None, None, :] >= stats["spans"][..., None]
        assert not stats["mass_by_distance"][beyond].any()


def test_statistics_leave_the_training_memory_and_use_the_models_method(rng):
    model = AllAttentionLM(**BASE)
    randomize(model, rng, 0.0, 0.8)
    memory = [rng.normal(size=m.shape) for m in model.get_memory()]
    model.set_memory(memory)
    tokens = rng.integers(0, V, 24)  # one stream
    stats = model.attention_statistics(tokens, warmup_tokens=4)
    again = attention_statistics(model, tokens[None], warmup_tokens=4)
    np.testing.assert_array_equal(stats["persistent_share"],
                                  again["persistent_share"])
    assert stats["queries"] == 20
    for kept, now in zip(memory, model.get_memory()):
        np.testing.assert_allclose(now, kept, rtol=1e-6)


@pytest.mark.parametrize(
    "tokens, warmup, message",
    [
        (np.zeros((2, 10), "int32"), None, "longer than `warmup_tokens`=10"),
        (np.zeros((2, 3, 4), "int32"), 0, r"shape \(T,\) or \(B, T\)"),
        (np.zeros((2, 20), "float32"), 0, "integer token ids"),
        (np.zeros((2, 20), "int32"), -1, "Received: warmup_tokens=-1"),
        (np.full((2, 20), V, "int32"), 0,
         rf"\[0, vocabulary_size={V}\). Received: tokens\[0\]={V}"),
    ],
)
def test_statistics_reject_bad_input(tokens, warmup, message):
    model = AllAttentionLM(**BASE)
    with pytest.raises(ValueError, match=message):
        attention_statistics(model, tokens, warmup_tokens=warmup)
