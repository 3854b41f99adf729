import lzma

import keras
import numpy as np
import pytest

from keras_allattn import AllAttentionLM
from tests import reference
from tests.conftest import randomize


def stream_batches(ids, batch_size, block_size):
    """Inputs/targets where batch k+1 continues every row of batch k."""
    steps = (len(ids) - 1) // (batch_size * block_size)
    usable = steps * block_size
    stream = len(ids) // batch_size
    rows = np.stack([ids[r * stream : r * stream + usable + 1] for r in range(batch_size)])
    x = rows[:, :-1].reshape(batch_size, steps, block_size).transpose(1, 0, 2)
    y = rows[:, 1:].reshape(batch_size, steps, block_size).transpose(1, 0, 2)
    return x.reshape(-1, block_size), y.reshape(-1, block_size)


def test_memory_is_carried_through_fit_evaluate_predict(rng):
    model = AllAttentionLM(
        vocabulary_size=19, num_layers=2, hidden_dim=16, num_heads=2,
        persistent_memory_size=4, max_span=12, block_size=5, batch_size=3,
        span_ramp=4,
    )
    randomize(model, rng, 0.0, 0.5)
    x = rng.integers(0, 19, (4 * 3, 5)).astype("int32")
    y = rng.integers(0, 19, (4 * 3, 5)).astype("int32")
    memories = model.initial_memories(3)
    chained = []
    for k in range(4):
        logits, memories = model.call_with_memory(x[3 * k : 3 * k + 3], memories)
        chained.append(keras.ops.convert_to_numpy(logits))
    chained = np.concatenate(chained)

    predicted = model.predict(x, batch_size=3, verbose=0)
    assert reference.relative_error(predicted, chained) < 1e-5
    for layer, memory in zip(model.segment_memories, memories):
        assert reference.relative_error(layer.memory, memory) < 1e-6

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    expected_loss = float(keras.ops.convert_to_numpy(loss(y, chained)))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss, jit_compile=True)
    model.reset_memory()
    evaluated = model.evaluate(x, y, batch_size=3, verbose=0)
    np.testing.assert_allclose(evaluated, expected_loss, rtol=1e-5)
    model.reset_memory()
    history = model.fit(x, y, batch_size=3, shuffle=False, verbose=0)
    np.testing.assert_allclose(history.history["loss"][0], expected_loss, rtol=1e-5)
    for layer, memory in zip(model.segment_memories, memories):
        assert reference.relative_error(layer.memory, memory) < 1e-6


def test_fit_lowers_loss_on_real_text(data_dir):
    with lzma.open(data_dir / "tinyshakespeare" / "input.txt.xz", "rt") as f:
        text = f.read()[:200_000]
    vocabulary = sorted(set(text))
    ids = np.array([vocabulary.index(c) for c in text[:20_000]], "int32")
    x, y = stream_batches(ids, batch_size=8, block_size=32)
    keras.utils.set_random_seed(1)
    model = AllAttentionLM(
        vocabulary_size=len(vocabulary), num_layers=2, hidden_dim=64,
        num_heads=4, persistent_memory_size=16, max_span=64, block_size=32,
        batch_size=8, span_loss_coeff=1e-6,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    steps = 40
    before = model.evaluate(x[: 8 * 5], y[: 8 * 5], batch_size=8, verbose=0)
    model.reset_memory()
    model.fit(x[: 8 * steps], y[: 8 * steps], batch_size=8, shuffle=False,
              epochs=2, verbose=0)
    model.reset_memory()
    after = model.evaluate(x[: 8 * 5], y[: 8 * 5], batch_size=8, verbose=0)
    assert after < before - 0.5, (before, after)
    assert np.any(keras.ops.convert_to_numpy(model.segment_memories[0].memory))
