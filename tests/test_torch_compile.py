"""`compile(jit_compile=True)` on PyTorch: one compiled training step.

`keras_allattn.compiling.torch_train_step` traces the whole step into one
graph; these tests count the graphs `torch.compile` builds (dynamo's
`unique_graphs` counter) and compare the compiled steps with eager ones
from the same weights, memory and seeds. They compile with the "eager"
`torch.compile` backend (the traced graph run as it is): the tracing, the
state written back and the graph count are the library's, and inductor's
C++ build of a graph takes minutes on a 2-core CPU.
"""

import keras
import numpy as np
import pytest

from keras_allattn import AllAttentionLM
from keras_allattn import compiling
from tests.conftest import backend

pytestmark = pytest.mark.skipif(
    backend() != "torch", reason="torch.compile of the training step"
)

V, B, M = 11, 2, 8


@pytest.fixture(autouse=True)
def eager_backend(monkeypatch):
    monkeypatch.setattr(compiling, "TORCH_TRAIN_BACKEND", "eager")


def graphs_compiled():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def make_model(seed, jit_compile, **overrides):
    """A tiny model; the same `seed` gives the same weights and seeds."""
    keras.utils.set_random_seed(seed)
    config = dict(
        vocabulary_size=V, num_layers=2, hidden_dim=16, num_heads=2,
        persistent_memory_size=4, max_span=16, block_size=M, batch_size=B,
        adaptive_span=False,
    )
    model = AllAttentionLM(**{**config, **overrides})
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def fit_losses(model, tokens, spans=None):
    """The loss of every step of one `fit` over `tokens`, in order.

    With a set `spans`, the layers' attended spans at the start of every
    step (what a step's graph is compiled for) are added to it.
    """
    losses = []

    def begin(batch, logs):
        if spans is not None:
            spans.add(tuple(model.attended_spans()))

    logger = keras.callbacks.LambdaCallback(
        on_train_batch_begin=begin,
        on_train_batch_end=lambda batch, logs: losses.append(
            float(logs["loss"])
        ),
    )
    model.fit(tokens[:, :-1], tokens[:, 1:], shuffle=False, verbose=0,
              callbacks=[logger])
    return np.array(losses)


def seed_states(model):
    return [
        keras.ops.convert_to_numpy(layer.seed_generator.state)
        for layer in model.attention_layers
    ]


def test_one_graph_per_attended_span(rng):
    """Steps reuse one graph per attended span, each compiled once.

    The spans are whatever training makes them (a ratio leaving 0 moves a
    layer from 96 to 128 rows), so the graphs are counted against the
    distinct spans the steps ran with.
    """
    model = make_model(1, True, adaptive_span=True, max_span=128,
                       span_granularity=32)
    tokens = rng.integers(0, V, (4 * B, M + 1)).astype("int32")
    before = graphs_compiled()
    seen = set()
    fit_losses(model, tokens, seen)
    # Spans of 32 tokens (ratio 0) plus the margin of 64: 96 rows.
    assert (96, 96) in seen
    fit_losses(model, tokens, seen)
    assert graphs_compiled() - before == len(seen)

    def set_ratios(value):
        for layer in model.attention_layers:
            ratio = layer.span.span_ratio
            ratio.assign(np.full(ratio.shape, value, "float32"))

    set_ratios(1.0)
    fit_losses(model, tokens, seen)
    assert (128, 128) in seen
    assert graphs_compiled() - before == len(seen)
    set_ratios(0.0)
    compiled = graphs_compiled()
    fit_losses(model, tokens, seen)
    # The first step attends 96 rows again: that graph is reused.
    assert graphs_compiled() - before == len(seen)
    # 16 steps, at most the four pairs of {96, 128}: graphs are reused.
    assert len(seen) <= 4
    if len(seen) == 2:
        assert graphs_compiled() == compiled


def test_compiled_steps_match_eager_steps(rng):
    """Losses, weights and the carried segment memory equal eager's."""
    compiled, eager = make_model(2, True), make_model(2, False)
    memory = [rng.normal(size=m.shape).astype("float32")
              for m in eager.get_memory()]
    for model in (compiled, eager):
        model.set_memory(memory)
    tokens = rng.integers(0, V, (5 * B, M + 1)).astype("int32")
    before = graphs_compiled()
    losses = fit_losses(compiled, tokens)
    assert graphs_compiled() - before == 1
    np.testing.assert_allclose(losses, fit_losses(eager, tokens), rtol=1e-5)
    for got, expected in zip(compiled.get_memory(), eager.get_memory()):
        np.testing.assert_allclose(got, expected, atol=1e-5)
    for got, expected in zip(compiled.get_weights(), eager.get_weights()):
        np.testing.assert_allclose(got, expected, atol=1e-5)
    # A second fit continues from the memory the first one left.
    more = rng.integers(0, V, (2 * B, M + 1)).astype("int32")
    np.testing.assert_allclose(
        fit_losses(compiled, more), fit_losses(eager, more), rtol=1e-5
    )
    assert graphs_compiled() - before == 1


def test_dropout_seeds_move_on_every_compiled_step(rng):
    """Every compiled step draws a fresh attention dropout mask, as eager.

    A seed frozen into the graph would repeat the first step's mask: the
    steps of a model whose seeds are put back before every step show that
    this gives other losses.
    """
    tokens = rng.integers(0, V, (4 * B, M + 1)).astype("int32")
    compiled = make_model(3, True, dropout=0.5)
    eager = make_model(3, False, dropout=0.5)
    initial = seed_states(eager)
    before = graphs_compiled()
    losses = fit_losses(compiled, tokens)
    assert graphs_compiled() - before == 1
    expected = fit_losses(eager, tokens)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    for got, want, first in zip(seed_states(compiled), seed_states(eager), initial):
        np.testing.assert_array_equal(got, want)
        assert not np.array_equal(got, first)

    frozen = make_model(3, False, dropout=0.5)
    frozen_losses = []
    for step in range(4):
        for layer, state in zip(frozen.attention_layers, initial):
            layer.seed_generator.state.assign(state)
        frozen_losses.extend(fit_losses(frozen, tokens[step * B:(step + 1) * B]))
    assert frozen_losses[0] == pytest.approx(expected[0], rel=1e-5)
    assert not np.allclose(frozen_losses[1:], expected[1:], rtol=1e-3)


def test_seeded_keras_dropout_runs_eagerly_with_a_warning(rng):
    """Keras's seeded Dropout cannot be traced: the step says so, runs
    eagerly, and trains as the eager model does."""
    tokens = rng.integers(0, V, (2 * B, M + 1)).astype("int32")
    compiled = make_model(4, True, embedding_dropout=0.5)
    eager = make_model(4, False, embedding_dropout=0.5)
    before = graphs_compiled()
    with pytest.warns(UserWarning, match=r"runs eagerly.*embedding_dropout=0.5"):
        losses = fit_losses(compiled, tokens)
    assert graphs_compiled() == before
    np.testing.assert_allclose(losses, fit_losses(eager, tokens), rtol=1e-6)


def test_compiling_again_uses_the_new_optimizer(rng):
    """A graph built for one `compile` is not reused after another."""
    tokens = rng.integers(0, V, (2 * B, M + 1)).astype("int32")
    model, eager = make_model(5, True), make_model(5, False)
    for twin in (model, eager):
        twin.compile(
            optimizer=keras.optimizers.SGD(0.0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=twin is model,
        )
    initial = model.get_weights()
    fit_losses(model, tokens)
    for got, kept in zip(model.get_weights(), initial):
        np.testing.assert_array_equal(got, kept)
    for twin in (model, eager):
        twin.compile(
            optimizer=keras.optimizers.Adam(0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=twin is model,
        )
    eager.set_memory(model.get_memory())
    before = graphs_compiled()
    np.testing.assert_allclose(
        fit_losses(model, tokens), fit_losses(eager, tokens), rtol=1e-5
    )
    assert graphs_compiled() - before == 1
    for got, expected in zip(model.get_weights(), eager.get_weights()):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_memory_plan_follows_the_compiled_step(monkeypatch, rng):
    """`remat="auto"` plans for the attention that will run: where the fused
    kernels apply eagerly, the compiled step still traces the portable path."""
    from keras_allattn.models import memory_estimate

    monkeypatch.setattr(memory_estimate, "fused_kernel_applies",
                        lambda head_dim, dropout: (True, ""))
    model = make_model(3, True)
    assert not memory_estimate.uses_fused_kernels(model)
    model.compile(optimizer="sgd", jit_compile=False)
    assert memory_estimate.uses_fused_kernels(model)
