"""Adaptive input embeddings, adaptive softmax and the word-level model."""

import math

import keras
import numpy as np
import pytest

from keras_allattn import AdaptiveEmbedding
from keras_allattn import AdaptiveSoftmax
from keras_allattn import AllAttentionLM
from keras_allattn.data import load_ptb
from tests import reference
from tests.test_fit import stream_batches

V, D = 50, 16
CUTOFFS = [10, 30]


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x), np.float64)


def randomize_all(layer, rng):
    """Every weight drawn at random (biases and cluster rows start at 0)."""
    for variable in layer.weights:
        variable.assign(rng.normal(0.0, 0.5, variable.shape))


# === float64 NumPy references, written from the papers' definitions ===


def numpy_embedding(ids, tables, projections, bounds, hidden_dim):
    out = np.zeros(ids.shape + (hidden_dim,))
    for i, table in enumerate(tables):
        inside = (ids >= bounds[i]) & (ids < bounds[i + 1])
        vectors = table[ids[inside] - bounds[i]]
        out[inside] = vectors @ projections[i] if projections else vectors
    return out * math.sqrt(hidden_dim)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_log_probs(hidden, softmax):
    """log p(w) = log p_head(cluster of w) + log p_cluster(w), per token."""
    variables = [
        tuple(None if v is None else to_numpy(v) for v in cluster)
        for cluster in softmax.cluster_variables()
    ]
    bounds = softmax.bounds

    def logits(h, kernel, bias, projection):
        if projection is not None:
            h = h @ projection.T
        return h @ kernel.T + bias

    kernel, bias, projection = variables[0]
    if softmax.num_clusters:
        kernel = np.concatenate([kernel, to_numpy(softmax.cluster_kernel)])
        bias = np.concatenate([bias, to_numpy(softmax.cluster_bias)])
    head = log_softmax(logits(hidden, kernel, bias, projection))
    out = np.empty(hidden.shape[:-1] + (bounds[-1],))
    out[..., : bounds[1]] = head[..., : bounds[1]]
    for i in range(1, len(variables)):
        within = log_softmax(logits(hidden, *variables[i]))
        cluster = head[..., bounds[1] + i - 1, None]  # log p(cluster i)
        out[..., bounds[i] : bounds[i + 1]] = cluster + within
    return out


def gradients(loss_fn, variables):
    """Gradients of the scalar `loss_fn()` w.r.t. `variables`, as NumPy.

    Compiled on TensorFlow (XLA) and JAX (`jax.jit`), eager on PyTorch.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def stateless(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return loss_fn()

        grads = jax.jit(jax.grad(stateless))([v.value for v in variables])
    elif backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def compiled():
            with tf.GradientTape() as tape:
                loss = loss_fn()
            return tape.gradient(loss, variables)

        grads = compiled()
    else:
        for v in variables:
            v.value.grad = None
        loss_fn().backward()
        grads = [v.value.grad for v in variables]
    return [to_numpy(g) for g in grads]


# === Layers ===


@pytest.mark.parametrize("cutoffs, div_val", [(CUTOFFS, 2), (CUTOFFS, 1), ([], 4)])
def test_embedding_matches_numpy(rng, cutoffs, div_val):
    layer = AdaptiveEmbedding(V, D, cutoffs, div_val=div_val)
    ids = rng.integers(0, V, (3, 7))
    ids[0, :3] = [0, V - 1, 10]  # cluster edges
    out = layer(ids)
    widths = [w.shape[1] for w in layer.cluster_embeddings]
    assert widths == [D // div_val**i for i in range(len(cutoffs) + 1)]
    assert len(layer.cluster_projections) == (len(widths) if div_val > 1 else 0)
    expected = numpy_embedding(
        ids,
        [to_numpy(t) for t in layer.cluster_embeddings],
        [to_numpy(p) for p in layer.cluster_projections],
        [0, *cutoffs, V],
        D,
    )
    assert reference.relative_error(out, expected) < 1e-6


@pytest.mark.parametrize("tied", [True, False])
def test_log_probabilities_sum_to_one_and_match_numpy(rng, tied):
    embedding = AdaptiveEmbedding(V, D, CUTOFFS, div_val=2)
    softmax = AdaptiveSoftmax(
        V, D, CUTOFFS, div_val=2, embedding=embedding if tied else None
    )
    softmax.build((None, D))
    randomize_all(softmax, rng)
    hidden = rng.normal(0, 1, (2, 5, D)).astype("float32")
    log_probs = softmax(hidden)
    assert tuple(log_probs.shape) == (2, 5, V)
    assert keras.backend.standardize_dtype(log_probs.dtype) == "float32"
    np.testing.assert_allclose(np.exp(to_numpy(log_probs)).sum(-1), 1.0, atol=1e-5)
    expected = numpy_log_probs(hidden.astype(np.float64), softmax)
    assert reference.relative_error(log_probs, expected) < 1e-6


def test_target_path_equals_gathering_full_log_probabilities(rng):
    # 14 positions in chunks of 4: three full chunks and a partial one.
    softmax = AdaptiveSoftmax(V, D, CUTOFFS, div_val=2, chunk_size=4)
    softmax.build((None, D))
    randomize_all(softmax, rng)
    hidden = rng.normal(0, 1, (2, 7, D)).astype("float32")
    targets = rng.integers(0, V, (2, 7)).astype("int32")
    targets[0, :4] = [0, 9, 10, V - 1]
    picked = softmax(hidden, targets=targets)
    assert tuple(picked.shape) == (2, 7)
    full = to_numpy(softmax(hidden))
    gathered = np.take_along_axis(full, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(to_numpy(picked), gathered, rtol=1e-5, atol=1e-5)

    # The gradients of both paths agree too (the target path is recomputed
    # chunk by chunk in the backward pass).
    hidden_t = keras.ops.convert_to_tensor(hidden)

    def target_loss():
        return keras.ops.sum(softmax(hidden_t, targets=targets))

    def full_loss():
        log_probs = softmax(hidden_t)
        return keras.ops.sum(
            keras.ops.take_along_axis(log_probs, targets[..., None], axis=-1)
        )

    variables = softmax.trainable_weights
    for a, b in zip(gradients(target_loss, variables), gradients(full_loss, variables)):
        assert reference.relative_error(a, b) < 1e-5


def test_single_cluster_equals_plain_softmax(rng):
    softmax = AdaptiveSoftmax(V, D, [], div_val=1)
    softmax.build((None, D))
    randomize_all(softmax, rng)
    assert [tuple(w.shape) for w in softmax.trainable_weights] == [(V, D), (V,)]
    dense = keras.layers.Dense(V)
    dense.build((None, D))
    kernel, bias, _ = softmax.cluster_variables()[0]
    dense.set_weights([to_numpy(kernel).T, to_numpy(bias)])
    hidden = rng.normal(0, 1, (3, 4, D)).astype("float32")
    plain = to_numpy(keras.ops.log_softmax(dense(hidden), axis=-1))
    assert reference.relative_error(softmax(hidden), plain) < 1e-6
    targets = rng.integers(0, V, (3, 4))
    expected = np.take_along_axis(plain, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(
        to_numpy(softmax(hidden, targets=targets)), expected, rtol=1e-5
    )


def test_tied_weights_are_one_variable_with_both_gradients(rng):
    embedding = AdaptiveEmbedding(V, D, CUTOFFS, div_val=2)
    tied = AdaptiveSoftmax(V, D, CUTOFFS, div_val=2, embedding=embedding)
    tied.build((None, D))
    randomize_all(tied, rng)
    shared = embedding.cluster_embeddings + embedding.cluster_projections
    for cluster, kernel, projection in zip(
        tied.cluster_variables(), embedding.cluster_embeddings,
        embedding.cluster_projections,
    ):
        assert cluster[0] is kernel and cluster[2] is projection
    assert len({id(v) for v in tied.trainable_weights}) == len(tied.trainable_weights)
    assert all(any(v is w for w in tied.trainable_weights) for v in shared)

    # An untied copy with the same values separates the two uses.
    untied = AdaptiveSoftmax(V, D, CUTOFFS, div_val=2)
    untied.build((None, D))
    for cluster, (kernel, bias, projection) in zip(
        untied.cluster_variables(), tied.cluster_variables()
    ):
        for mine, theirs in zip(cluster, (kernel, bias, projection)):
            mine.assign(theirs)
    untied.cluster_kernel.assign(tied.cluster_kernel)
    untied.cluster_bias.assign(tied.cluster_bias)
    ids = rng.integers(0, V, (2, 6))
    ids[0, :3] = [0, 10, 30]  # every cluster is an input
    targets = rng.integers(0, V, (2, 6))

    def loss(softmax):
        return lambda: keras.ops.sum(softmax(embedding(ids), targets=targets))

    output_use = [c[0] for c in untied.cluster_variables()] + [
        c[2] for c in untied.cluster_variables()
    ]
    both = gradients(loss(untied), shared + output_use)
    input_grads, output_grads = both[: len(shared)], both[len(shared) :]
    tied_grads = gradients(loss(tied), shared)
    for total, a, b in zip(tied_grads, input_grads, output_grads):
        assert np.abs(a).max() > 0 and np.abs(b).max() > 0
        assert reference.relative_error(total, a + b) < 1e-5


def test_mixed_precision_log_probabilities_are_float32(rng):
    softmax = AdaptiveSoftmax(V, D, CUTOFFS, dtype="mixed_bfloat16")
    hidden = rng.normal(0, 1, (2, 3, D)).astype("float32")
    assert keras.backend.standardize_dtype(softmax(hidden).dtype) == "float32"


@pytest.mark.parametrize(
    "cutoffs, div_val, message",
    [
        ([30, 10], 4, r"strictly increasing.*cutoffs=\[30, 10\]"),
        ([10, 10], 4, r"without duplicates.*cutoffs=\[10, 10\]"),
        ([0, 10], 4, r"\[1, vocabulary_size\).*cutoffs=\[0, 10\]"),
        ([-5, 10], 4, r"cutoffs=\[-5, 10\]"),
        ([10, 50], 4, r"\[1, 50\).*cutoffs=\[10, 50\]"),
        ([10, 70], 4, r"cutoffs=\[10, 70\]"),
        ([2.5], 4, r"list of integers.*cutoffs=\[2.5\]"),
        (10, 4, r"list of integers.*cutoffs=10"),
        (CUTOFFS, 0, "div_val=0"),
        (CUTOFFS, -1, "div_val=-1"),
        ([5, 10, 20, 30], 4, r"div_val.*too large.*hidden_dim=16, div_val=4"),
    ],
)
@pytest.mark.parametrize("layer_class", [AdaptiveEmbedding, AdaptiveSoftmax])
def test_bad_arguments(layer_class, cutoffs, div_val, message):
    with pytest.raises(ValueError, match=message):
        layer_class(V, D, cutoffs, div_val=div_val)


def test_tied_embedding_must_match():
    embedding = AdaptiveEmbedding(V, D, CUTOFFS, div_val=2)
    with pytest.raises(ValueError, match="same .vocabulary_size"):
        AdaptiveSoftmax(V, D, CUTOFFS, div_val=4, embedding=embedding)
    with pytest.raises(ValueError, match="must be None or an `AdaptiveEmbedding`"):
        AdaptiveSoftmax(V, D, CUTOFFS, embedding=keras.layers.Embedding(V, D))


@pytest.mark.parametrize("tied", [True, False])
def test_layer_config_round_trip(tied):
    embedding = AdaptiveEmbedding(V, D, CUTOFFS, div_val=2, name="emb")
    for layer in (
        embedding,
        AdaptiveSoftmax(V, D, CUTOFFS, div_val=2, chunk_size=7,
                        embedding=embedding if tied else None),
    ):
        config = layer.get_config()
        assert type(layer).from_config(config).get_config() == config
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(layer)
        )
        assert type(restored) is type(layer)
        assert restored.get_config() == config


# === The word-level model ===

B, M = 2, 6
MODEL = dict(
    vocabulary_size=V, num_layers=2, hidden_dim=D, num_heads=4,
    persistent_memory_size=4, max_span=8, block_size=M, batch_size=B,
    adaptive_span=True, span_ramp=3, adaptive_cutoffs=CUTOFFS,
    adaptive_div_val=2,
)


def test_model_outputs_hidden_states_and_log_probabilities(rng):
    model = AllAttentionLM(**MODEL)
    assert isinstance(model.token_embedding, AdaptiveEmbedding)
    assert model.adaptive_softmax.embedding is model.token_embedding
    weights = model.trainable_weights
    assert len({id(v) for v in weights}) == len(weights)
    assert any(v is model.token_embedding.cluster_embeddings[1] for v in weights)
    assert any(v is model.adaptive_softmax.cluster_kernel for v in weights)

    tokens = rng.integers(0, V, (B, M)).astype("int32")
    hidden = model(tokens)
    assert tuple(hidden.shape) == (B, M, D)
    log_probs, _ = model.call_with_memory(tokens, model.initial_memories(B))
    assert tuple(log_probs.shape) == (B, M, V)
    np.testing.assert_allclose(np.exp(to_numpy(log_probs)).sum(-1), 1.0, atol=1e-5)
    expected = model.adaptive_softmax(hidden)
    assert reference.relative_error(log_probs, expected) < 1e-5

    untied = AllAttentionLM(**MODEL, adaptive_tie_weights=False)
    assert untied.adaptive_softmax.embedding is None
    assert len(untied.trainable_weights) == len(weights) + 6


def test_model_evaluate_reports_the_targets_nll_plus_span_loss(rng):
    model = AllAttentionLM(**MODEL, span_loss_coeff=0.01)
    for attention in model.attention_layers:
        attention.span.span_ratio.assign(rng.uniform(0.1, 0.9, (4,)))
    span_loss = sum(
        0.01 * 8 * to_numpy(a.span.span_ratio).mean() for a in model.attention_layers
    )
    x = rng.integers(0, V, (3 * B, M)).astype("int32")
    y = rng.integers(0, V, (3 * B, M)).astype("int32")
    memories, nll = model.initial_memories(B), []
    for k in range(3):
        log_probs, memories = model.call_with_memory(x[k * B : (k + 1) * B], memories)
        picked = np.take_along_axis(
            to_numpy(log_probs), y[k * B : (k + 1) * B, :, None], -1
        )
        nll.append(-picked.mean())
    model.compile(optimizer="adam", jit_compile=keras.backend.backend() != "torch")
    model.reset_memory()
    np.testing.assert_allclose(
        model.evaluate(x, y, batch_size=B, verbose=0), np.mean(nll) + span_loss,
        rtol=1e-5,
    )


def test_model_refuses_a_logits_loss_or_metrics(rng):
    model = AllAttentionLM(**MODEL)
    x = rng.integers(0, V, (B, M)).astype("int32")
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="loss=None.*Received: loss=<"):
        model.fit(x, x, batch_size=B, verbose=0)
    model = AllAttentionLM(**MODEL)
    model.compile(metrics=["accuracy"])
    with pytest.raises(ValueError, match=r"loss=None, metrics=\['accuracy'\]"):
        model.evaluate(x, x, batch_size=B, verbose=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(adaptive_cutoffs=[30, 10]), r"adaptive_cutoffs=\[30, 10\]"),
        (dict(adaptive_cutoffs=[10, V]), rf"adaptive_cutoffs=\[10, {V}\]"),
        (dict(adaptive_div_val=0), "adaptive_div_val=0"),
        (dict(adaptive_div_val=8), "adaptive_div_val=8"),
    ],
)
def test_model_bad_adaptive_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        AllAttentionLM(**{**MODEL, **overrides})


def test_model_config_round_trip_and_keras_file(rng, tmp_path):
    model = AllAttentionLM(**MODEL, span_loss_coeff=1e-3)
    randomize_all(model.adaptive_softmax, rng)
    config = model.get_config()
    assert config["adaptive_cutoffs"] == CUTOFFS
    assert config["adaptive_div_val"] == 2 and config["adaptive_tie_weights"]
    assert AllAttentionLM.from_config(config).get_config() == config
    model(rng.integers(0, V, (B, M)).astype("int32"))  # non-zero memory
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert loaded.get_config() == config
    assert loaded.adaptive_softmax.embedding is loaded.token_embedding
    # The segment memory is state, not saved: the loaded model starts from
    # zero memory, as the saved one does after reset_memory().
    assert not any(np.any(memory) for memory in loaded.get_memory())
    model.reset_memory()
    tokens = rng.integers(0, V, (B, M)).astype("int32")
    np.testing.assert_array_equal(to_numpy(loaded(tokens)), to_numpy(model(tokens)))
    memories = model.initial_memories(B)
    np.testing.assert_array_equal(
        to_numpy(loaded.call_with_memory(tokens, memories)[0]),
        to_numpy(model.call_with_memory(tokens, memories)[0]),
    )


def test_wikitext103_preset_has_the_adaptive_softmax():
    from keras_allattn.presets import check_buildable
    from keras_allattn.presets import get_preset

    check_buildable("wikitext103")
    preset = get_preset("wikitext103")["model"]
    assert preset["adaptive_cutoffs"] == [20_000, 40_000, 200_000]
    assert preset["adaptive_div_val"] == 4
    small = dict(num_layers=1, persistent_memory_size=4, max_span=8,
                 block_size=4, batch_size=1, hidden_dim=64, num_heads=2)
    model = AllAttentionLM.from_preset("wikitext103", **small)
    widths = [w.shape for w in model.token_embedding.cluster_embeddings]
    assert widths == [(20_000, 64), (20_000, 16), (160_000, 4), (67_735, 1)]


@pytest.fixture
def one_torch_thread():
    """Tiny eager PyTorch ops run faster on one thread (no thread hand-offs,
    which on a busy 2-core machine cost more than the arithmetic)."""
    if keras.backend.backend() != "torch":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fit_lowers_the_loss_on_ptb(data_dir, one_torch_thread):
    if not (data_dir / "ptb").is_dir():
        pytest.skip(f"PTB not found at {data_dir / 'ptb'}")
    corpus = load_ptb(data_dir / "ptb")
    keras.utils.set_random_seed(0)
    batch, block = 4, 16
    model = AllAttentionLM(
        vocabulary_size=corpus.vocabulary_size, num_layers=2, hidden_dim=32,
        num_heads=4, persistent_memory_size=8, max_span=16, block_size=block,
        batch_size=batch, adaptive_span=False, adaptive_cutoffs=[2000, 6000],
        adaptive_div_val=4,
    )
    # 64 positions per batch in chunks of at most 24: the compiled steps
    # run the target path's loop (3 chunks, the last one padded).
    model.adaptive_softmax.chunk_size = 24
    model.compile(
        optimizer=keras.optimizers.Adam(5e-3),
        jit_compile=keras.backend.backend() != "torch",
    )
    x, y = stream_batches(corpus.train[:3000], batch, block)
    vx, vy = stream_batches(corpus.valid[:1000], batch, block)
    before = model.evaluate(vx, vy, batch_size=batch, verbose=0)
    assert abs(before - math.log(corpus.vocabulary_size)) < 1.0
    history = model.fit(x, y, batch_size=batch, epochs=2, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5, losses
    model.reset_memory()
    after = model.evaluate(vx, vy, batch_size=batch, verbose=0)
    assert after < before - 1.0, (before, after)
