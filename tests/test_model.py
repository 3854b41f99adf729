import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_allattn import AllAttentionLM
from keras_allattn.models.backbone import trimmed_length
from tests import reference
from tests.conftest import randomize


def ordered(memory_layer):
    """A `SegmentMemory`'s rows, oldest first, as NumPy."""
    return memory_layer.ordered(keras.ops.convert_to_numpy(memory_layer.memory))

V, B, M = 23, 2, 6

BASE = dict(
    vocabulary_size=V,
    num_layers=2,
    hidden_dim=16,
    num_heads=4,
    persistent_memory_size=5,
    max_span=10,
    block_size=M,
    batch_size=B,
    adaptive_span=False,
)


def make_model(rng, **overrides):
    model = AllAttentionLM(**{**BASE, **overrides})
    randomize(model, rng, 0.0, 0.7)
    return model


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


CASES = [
    dict(),
    dict(adaptive_span=True, span_ramp=3),
    dict(integration="separate"),
    dict(adaptive_span=True, span_ramp=3, integration="separate"),
    dict(persistent_memory_size=0, adaptive_span=True, span_ramp=3),
    dict(persistent_memory_size=0, feedforward_dim=24),
    dict(feedforward_dim=24, adaptive_span=True, span_ramp=3),
]


@pytest.mark.parametrize("overrides", CASES, ids=lambda c: str(sorted(c.items())))
def test_model_matches_numpy_over_two_segments(rng, overrides):
    model = make_model(rng, **overrides)
    config = model.get_config()
    weights = reference.extract_weights(model)
    memories = [np.zeros((B, 10, 16))] * 2
    for segment in range(2):
        tokens = rng.integers(0, V, (B, M)).astype("int32")
        expected, memories = reference.model_forward(tokens, memories, weights, config)
        actual = model(tokens)
        assert actual.dtype == "float32" or str(actual.dtype).endswith("float32")
        assert reference.relative_error(actual, expected) < 1e-5, segment
        for memory_layer, memory in zip(model.segment_memories, memories):
            assert reference.relative_error(ordered(memory_layer), memory) < 1e-6


def test_two_segments_equal_one_double_block(rng):
    model = make_model(rng, adaptive_span=True, span_ramp=3)
    tokens = rng.integers(0, V, (B, 2 * M)).astype("int32")
    first = model(tokens[:, :M])
    second = model(tokens[:, M:])
    whole, _ = model.call_with_memory(tokens, model.initial_memories(B))
    stitched = np.concatenate([to_numpy(first), to_numpy(second)], axis=1)
    assert reference.relative_error(stitched, whole) < 1e-5


def test_call_with_memory_matches_stateful_calls(rng):
    model = make_model(rng)
    memories = model.initial_memories(B)
    for _ in range(3):
        tokens = rng.integers(0, V, (B, M)).astype("int32")
        logits, memories = model.call_with_memory(tokens, memories)
        assert reference.relative_error(logits, model(tokens)) < 1e-6
    for memory, layer in zip(memories, model.segment_memories):
        assert reference.relative_error(memory, ordered(layer)) == 0.0
    # Token by token over the memory gives the same logits as the block.
    tokens = rng.integers(0, V, (B, 4)).astype("int32")
    block_logits, _ = model.call_with_memory(tokens, memories)
    steps = []
    for t in range(4):
        step_logits, memories = model.call_with_memory(tokens[:, t : t + 1], memories)
        steps.append(to_numpy(step_logits))
    assert reference.relative_error(np.concatenate(steps, 1), block_logits) < 1e-5


def test_reset_memory(rng):
    model = make_model(rng)
    tokens = rng.integers(0, V, (B, M)).astype("int32")
    fresh = to_numpy(model(tokens))
    assert not np.allclose(to_numpy(model(tokens)), fresh)
    assert np.any(to_numpy(model.segment_memories[0].memory))
    model.reset_memory()
    assert not np.any(to_numpy(model.segment_memories[1].memory))
    np.testing.assert_allclose(to_numpy(model(tokens)), fresh, rtol=1e-6, atol=1e-6)


def test_trimming_to_learned_spans_is_exact(rng):
    model = make_model(
        rng, max_span=160, adaptive_span=True, span_ramp=4, span_granularity=16,
        block_size=8,
    )
    for attention, top in zip(model.attention_layers, (0.1, 0.3)):
        attention.span.span_ratio.assign(rng.uniform(0.0, top, (4,)))
    spans = model.current_spans()
    tokens = rng.integers(0, V, (3, B, 8)).astype("int32")
    full = [to_numpy(model(t)) for t in tokens]
    model.reset_memory()
    assert model.update_span_trimming()
    attended = model.attended_spans()
    for largest, length in zip(spans.max(axis=1), attended):
        assert largest <= length < 160 and length % 16 == 0
    trimmed = [to_numpy(model(t)) for t in tokens]
    assert reference.relative_error(np.stack(trimmed), np.stack(full)) < 1e-6
    assert not model.update_span_trimming()
    # A span that outgrows its trimmed length widens the attention again.
    model.attention_layers[0].span.span_ratio.assign(np.full((4,), 0.9))
    assert model.update_span_trimming()
    assert model.attended_spans()[0] == 160


@pytest.mark.parametrize(
    "target, granularity, max_span, expected",
    [
        (1088, "auto", 8192, 1152),  # span 1024 + margin 64: step 128
        (1024, "auto", 8192, 1024),
        (1025, "auto", 8192, 1152),
        (100, "auto", 8192, 128),  # step at least 64, not 8
        (2100, "auto", 8192, 2304),  # step 256, a power of two
        (9000, "auto", 8192, 8192),  # capped
        (100.5, "auto", 8192, 128),
        (1088, 256, 8192, 1280),  # a fixed step, as before
        (1088, 64, 8192, 1088),
        (9000, 256, 8192, 8192),
    ],
)
def test_trimmed_length(target, granularity, max_span, expected):
    length = trimmed_length(target, granularity, max_span)
    assert length == expected and isinstance(length, int)


def test_trimmed_length_auto_bounds():
    """"auto": never below the target, at most 8 lengths per doubling and
    at most 12.5% over the target from 512 rows on (about 40 lengths up to
    8192)."""
    targets = np.arange(1, 9001)
    lengths = np.array([trimmed_length(t, "auto", 8192) for t in targets])
    assert np.all(lengths >= np.minimum(targets, 8192))
    assert np.all(lengths[targets >= 512] <= 1.125 * targets[targets >= 512])
    distinct = np.unique(lengths)
    assert len(distinct) == 40
    for low in (64, 128, 256, 512, 1024, 2048, 4096):
        assert np.sum((distinct > low) & (distinct <= 2 * low)) <= 8


def test_trimming_auto_sets_relative_lengths(rng):
    model = make_model(rng, max_span=2400, adaptive_span=True, span_ramp=4)
    assert model.span_granularity == "auto"
    assert model.update_span_trimming(
        spans=np.array([[1024, 3, 500, 1000], [2036, 7, 0, 1]])
    )
    assert model.attended_spans() == [1152, 2304]
    # Spans a little lower keep their lengths (no retrace).
    assert not model.update_span_trimming(
        spans=np.array([[1000, 3, 500, 1000], [2000, 7, 0, 1]])
    )
    assert model.update_span_trimming(
        spans=np.array([[36, 3, 0, 1], [2400, 7, 0, 1]])
    )
    assert model.attended_spans() == [128, 2400]
    spans = model.current_spans()
    assert model.update_span_trimming()
    assert model.attended_spans() == [
        trimmed_length(largest + 64, "auto", 2400)
        for largest in spans.max(axis=1)
    ]


@pytest.mark.parametrize("granularity", ["auto", 16])
def test_config_keeps_span_granularity(rng, granularity):
    model = make_model(rng, adaptive_span=True, span_granularity=granularity)
    config = json.loads(json.dumps(model.get_config()))
    assert config["span_granularity"] == granularity
    rebuilt = AllAttentionLM.from_config(config)
    assert rebuilt.span_granularity == granularity
    assert rebuilt.get_config() == model.get_config()


def test_save_and_load_keras_file(rng, tmp_path):
    model = make_model(rng, adaptive_span=True, span_loss_coeff=1e-3, dropout=0.1)
    tokens = rng.integers(0, V, (B, M)).astype("int32")
    model(tokens)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, AllAttentionLM)
    assert loaded.get_config() == model.get_config()
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    # The memory is not saved: the loaded model starts its streams afresh.
    assert not any(np.any(memory) for memory in loaded.get_memory())
    nxt = rng.integers(0, V, (B, M)).astype("int32")
    fresh, _ = model.call_with_memory(nxt, model.initial_memories(B))
    np.testing.assert_array_equal(to_numpy(loaded(nxt)), to_numpy(fresh))


def test_saved_files_hold_the_parameters_not_the_memory(rng, tmp_path):
    """`.keras` files, weight files and `count_params` leave the memory out.

    The memory here (batch 4, span 512, width 256, 2 layers: 4 MiB) is
    larger than the parameters (2.9 MiB); a trained model's file is still
    within a few percent of the parameter bytes.
    """
    vocabulary, width, heads, persistent, span, batch = 256, 256, 4, 64, 512, 4
    model = AllAttentionLM(
        vocabulary_size=vocabulary, num_layers=2, hidden_dim=width,
        num_heads=heads, persistent_memory_size=persistent, max_span=span,
        block_size=8, batch_size=batch,
    )
    head = width // heads
    per_layer = 4 * width * width + 2 * heads * persistent * head + heads + 2 * width
    expected = (
        vocabulary * width  # token embedding
        + head * span  # relative position keys, shared
        + 2 * per_layer
        + width * vocabulary + vocabulary  # output projection
    )
    assert model.count_params() == expected
    assert sum(int(np.prod(w.shape)) for w in model.weights) == expected
    assert model.non_trainable_weights == []
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),  # no per-weight slots
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = rng.integers(0, vocabulary, (2 * batch, 9)).astype("int32")
    model.fit(x[:, :-1], x[:, 1:], shuffle=False, verbose=0)
    memory = model.get_memory()
    assert np.all([np.any(m) for m in memory])
    memory_bytes = sum(m.nbytes for m in memory)
    assert memory_bytes > 4 * expected, (memory_bytes, 4 * expected)
    model.save(tmp_path / "model.keras")
    size = os.path.getsize(tmp_path / "model.keras")
    assert 4 * expected <= size < 1.05 * 4 * expected, (size, 4 * expected)
    model.save_weights(tmp_path / "model.weights.h5")
    assert os.path.getsize(tmp_path / "model.weights.h5") < 1.05 * 4 * expected
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert loaded.count_params() == expected
    assert not any(np.any(m) for m in loaded.get_memory())
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    # The training memory itself is still there, and can be set and read.
    loaded.set_memory(memory)
    for a, b in zip(loaded.get_memory(), memory):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"memories\[1\]` must have shape"):
        loaded.set_memory([memory[0], memory[1][:1]])


NEXT_BACKEND = {"tensorflow": "jax", "jax": "torch", "torch": "tensorflow"}

LOAD_SCRIPT = """
import sys, json, numpy as np, keras
import keras_allattn
path, inputs, expected = sys.argv[1:4]
model = keras.saving.load_model(path)
out = keras.ops.convert_to_numpy(model(np.load(inputs)))
want = np.load(expected)
print(json.dumps({"backend": keras.backend.backend(),
                  "error": float(np.abs(out - want).max() / np.abs(want).max())}))
"""


def test_model_saved_under_one_backend_loads_under_another(rng, tmp_path):
    model = make_model(rng, adaptive_span=True)
    model(rng.integers(0, V, (B, M)).astype("int32"))  # non-zero memory
    model.save(tmp_path / "model.keras")
    tokens = rng.integers(0, V, (B, M)).astype("int32")
    np.save(tmp_path / "tokens.npy", tokens)
    expected, _ = model.call_with_memory(tokens, model.initial_memories(B))
    np.save(tmp_path / "expected.npy", to_numpy(expected))  # zero memory
    other = NEXT_BACKEND[keras.backend.backend()]
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "model.keras"),
         str(tmp_path / "tokens.npy"), str(tmp_path / "expected.npy")],
        env={**os.environ, "KERAS_BACKEND": other},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == other
    assert report["error"] < 1e-5


def test_mixed_precision_logits_are_float32(rng):
    model = make_model(rng, dtype="mixed_bfloat16", adaptive_span=True)
    logits = model(rng.integers(0, V, (B, M)).astype("int32"))
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    assert model.attention_layers[0].compute_dtype == "bfloat16"


def test_span_loss_is_added(rng):
    model = make_model(rng, adaptive_span=True, span_loss_coeff=0.01)
    model(rng.integers(0, V, (B, M)).astype("int32"))
    expected = sum(
        0.01 * 10 * to_numpy(a.span.span_ratio).mean() for a in model.attention_layers
    )
    np.testing.assert_allclose(sum(to_numpy(x) for x in model.losses), expected,
                               rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_dim=18), "hidden_dim=18, num_heads=4"),
        (dict(persistent_memory_size=-2), "persistent_memory_size=-2"),
        (dict(max_span=0), "max_span=0"),
        (dict(span_ramp=0), "span_ramp=0"),
        (dict(block_size=0), "block_size=0"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(span_init=-0.1), "span_init=-0.1"),
        (dict(span_init=1.01), "span_init=1.01"),
        (dict(integration="sum"), "integration='sum'"),
        (dict(vocabulary_size=0), "vocabulary_size=0"),
        (dict(feedforward_dim=0), "feedforward_dim=0"),
        (dict(dropout=-0.1), "dropout=-0.1"),
        (dict(embedding_dropout=1.5), "embedding_dropout=1.5"),
        (dict(span_loss_coeff=-1.0), "span_loss_coeff=-1.0"),
    ],
)
def test_bad_constructor_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        AllAttentionLM(**{**BASE, **overrides})


def test_bad_call_inputs(rng):
    model = make_model(rng)
    with pytest.raises(ValueError, match="batch_size`=2.*batch of size 3"):
        model(rng.integers(0, V, (3, M)).astype("int32"))
    bad = rng.integers(0, V, (B, M)).astype("int32")
    bad[1, 2] = V
    with pytest.raises(ValueError, match=f"vocabulary_size={V}.*token id {V}"):
        model(bad)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="token id -1"):
        model.call_with_memory(bad, model.initial_memories(B))
    with pytest.raises(ValueError, match="num_layers=2 tensors. Received: 1"):
        model.call_with_memory(bad, model.initial_memories(B)[:1])
    with pytest.raises(ValueError, match=r"memories\[0\]"):
        model.call_with_memory(
            rng.integers(0, V, (B, M)), [np.zeros((B, 3, 16), "float32")] * 2
        )


def test_remat_gives_the_same_training_step(rng, dropout=0.3):
    """Recomputing the attention or whole layers changes no number, with
    attention dropout on (the recomputation redraws the same mask)."""
    x = rng.integers(0, V, (2 * B, M)).astype("int32")
    y = rng.integers(0, V, (2 * B, M)).astype("int32")
    modes = (False, "attention", "layer")
    models = [make_model(rng, adaptive_span=True, remat=remat, dropout=dropout)
              for remat in modes]
    initial = [to_numpy(w) for w in models[0].trainable_weights]
    for model in models[1:]:
        model.set_weights(models[0].get_weights())
        for mine, theirs in zip(model.attention_layers, models[0].attention_layers):
            mine.seed_generator.state.assign(to_numpy(theirs.seed_generator.state))
    for model, mode in zip(models, modes):
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=keras.backend.backend() != "torch",
        )
        model.fit(x, y, batch_size=B, shuffle=False, verbose=0)
        assert model.resolved_remat == mode
        assert all(layer.remat == mode for layer in model.attention_layers)
    for other in models[1:]:
        for a, b in zip(models[0].trainable_weights, other.trainable_weights):
            assert reference.relative_error(b, a) < 1e-5, (other.remat, a.path)
    # The steps moved the weights (the comparison can fail).
    moved = [reference.relative_error(w, w0) for w, w0 in
             zip(models[0].trainable_weights, initial)]
    assert max(moved) > 1e-3


def test_layer_remat_trains_under_mixed_precision(rng):
    """The recomputed layer reads what the forward pass read (dtypes
    included), under mixed precision and with adaptive span and dropout."""
    model = make_model(rng, adaptive_span=True, remat="layer", dropout=0.2,
                       dtype="mixed_bfloat16")
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.integers(0, V, (2 * B, M)).astype("int32")
    history = model.fit(x, x, batch_size=B, shuffle=False, verbose=0)
    assert model.resolved_remat == "layer"
    assert np.isfinite(history.history["loss"][-1])


def test_remat_auto_follows_the_memory_estimate(rng, monkeypatch):
    from keras_allattn.models import memory_estimate

    # Six layers: whole-layer recomputation keeps about 16 block-sized
    # tensors a layer and needs one layer's rows at once, which saves
    # memory only over a few layers when the span is this short.
    model = make_model(rng, adaptive_span=True, dropout=0.2, num_layers=6)
    assert model.remat == "auto" and model.resolved_remat is None
    fused = memory_estimate.uses_fused_kernels(model)
    need = {mode: memory_estimate.training_memory_bytes(model, mode)
            for mode in (False, "attention", "layer")}
    assert need["layer"] < need[False]
    gib = 2**30
    # At each estimate as the budget, the first option (in the order none,
    # attention (portable path only), layer) that fits is chosen.
    order = [False] + ([] if fused else ["attention"]) + ["layer"]
    for target in order:
        budget = need[target] / memory_estimate.HEADROOM * 1.001
        monkeypatch.setenv("KERAS_ALLATTN_MEMORY_GIB", str(budget / gib))
        expected = next(m for m in order if need[m] <= need[target])
        assert memory_estimate.choose_remat(model)[0] == expected
    # Nothing fits: fit raises before compiling, naming what to change.
    budget = min(need[m] for m in order) / memory_estimate.HEADROOM * 0.9
    monkeypatch.setenv("KERAS_ALLATTN_MEMORY_GIB", str(budget / gib))
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.integers(0, V, (B, M)).astype("int32")
    with pytest.raises(ValueError, match=r"batch_size=2.*max_span=10.*max_span"):
        model.fit(x, x, batch_size=B, shuffle=False, verbose=0)
    assert model.train_function is None
    # A fixed setting that cannot fit is refused too.
    fixed = make_model(rng, remat=False, num_layers=6)
    fixed.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="remat=\"layer\""):
        fixed.fit(x, x, batch_size=B, shuffle=False, verbose=0)
    monkeypatch.setenv("KERAS_ALLATTN_MEMORY_GIB", "lots")
    with pytest.raises(ValueError, match="KERAS_ALLATTN_MEMORY_GIB='lots'"):
        memory_estimate.memory_budget_bytes()
    with pytest.raises(ValueError, match="remat='sometimes'"):
        make_model(rng, remat="sometimes")


def test_dropout_trains_with_remat(rng):
    model = make_model(rng, adaptive_span=True, remat=True, dropout=0.3)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = rng.integers(0, V, (2 * B, M)).astype("int32")
    history = model.fit(x, x, batch_size=B, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    model.reset_memory()
    eval_a = model.predict(x[:B], batch_size=B, verbose=0)
    model.reset_memory()
    eval_b = model.predict(x[:B], batch_size=B, verbose=0)
    np.testing.assert_allclose(eval_a, eval_b, rtol=1e-6)  # no dropout in predict


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX devices")
def test_memory_budget_reads_this_process_device(monkeypatch):
    # In a multi-process JAX run, `jax.devices()` lists every process's
    # devices, the first process's first; only this process's own devices
    # report their memory (others raise "MemoryStats is only supported for
    # addressable PjRt devices").
    import jax

    from keras_allattn.models import memory_estimate

    class Device:
        platform = "gpu"

        def __init__(self, limit, addressable):
            self.limit, self.addressable = limit, addressable

        def memory_stats(self):
            if not self.addressable:
                raise RuntimeError("MemoryStats is only supported for "
                                   "addressable PjRt devices.")
            return {"bytes_limit": self.limit}

    monkeypatch.delenv("KERAS_ALLATTN_MEMORY_GIB", raising=False)
    other, mine = Device(11 * 2**30, False), Device(7 * 2**30, True)
    monkeypatch.setattr(jax, "devices", lambda *a, **k: [other, mine])
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: [mine])
    assert memory_estimate.memory_budget_bytes() == 7 * 2**30


def test_trimmed_layer_remat_keeps_only_the_attended_rows(rng):
    """With whole-layer recomputation and a trimmed span, what a training
    forward pass saves for its backward holds the attended memory rows,
    not a copy of all `max_span` rows (on PyTorch the memory handed to the
    attention was a slice of a copy of the whole memory, which the saved
    slice kept alive: at text8_large's 8,192 rows, the whole memory again
    for every layer while spans are short)."""
    if keras.backend.backend() != "torch":
        pytest.skip("PyTorch's saved tensors")
    import torch

    model = make_model(rng, adaptive_span=True, span_ramp=3, remat="layer",
                       max_span=37)
    tokens = rng.integers(0, V, (B, M)).astype("int32")
    model(tokens)
    for layer in model.attention_layers:
        layer.set_attended_span(4)
    full = B * model.max_span * model.hidden_dim * 4  # float32 bytes
    saved = []

    def pack(tensor):
        saved.append(tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = keras.ops.sum(model(tokens, training=True))
    loss.backward()
    assert saved and full not in saved, (full, saved)
