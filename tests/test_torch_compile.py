"""`compile(jit_compile=True)` on PyTorch: one compiled training step.

`keras_allattn.compiling.torch_train_step` traces the whole step into one
graph; these tests count the graphs `torch.compile` builds (dynamo's
`unique_graphs` counter) and compare the compiled steps with eager ones
from the same weights, memory and seeds. They compile with the "eager"
`torch.compile` backend (the traced graph run as it is): the tracing, the
state written back and the graph count are the library's, and inductor's
C++ build of a graph takes minutes on a 2-core CPU.
"""

import os
import warnings

import keras
import numpy as np
import pytest

from keras_allattn import AllAttentionLM
from keras_allattn import compiling
from keras_allattn.ops import kernel_settings
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


def compiled_graphs_expected(model):
    """1, or 0 where the step runs eagerly by design: on CUDA with
    whole-layer recomputation (`compiling._unmeasured_memory_reason`)."""
    from keras_allattn.compiling import _unmeasured_memory_reason

    return 0 if _unmeasured_memory_reason(model) else 1


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


def compiled_and_eager(seed, rng, **overrides):
    """The same model compiled and eager, from one random segment memory
    (returned too)."""
    compiled = make_model(seed, True, **overrides)
    eager = make_model(seed, False, **overrides)
    memory = [rng.normal(size=m.shape).astype("float32")
              for m in eager.get_memory()]
    for model in (compiled, eager):
        model.set_memory(memory)
    return compiled, eager, memory


def assert_trained_alike(compiled, eager):
    """Weights and segment memory of two models trained alike are equal."""
    for got, expected in zip(compiled.get_weights(), eager.get_weights()):
        np.testing.assert_allclose(got, expected, atol=1e-5)
    for got, expected in zip(compiled.get_memory(), eager.get_memory()):
        np.testing.assert_allclose(got, expected, atol=1e-5)


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
    """Steps reuse one graph; a new attended span compiles one more, once."""
    model = make_model(1, True, adaptive_span=True, max_span=128,
                       span_granularity=32)
    for layer in model.attention_layers:
        # Held, so that only `set_ratios` below moves the spans: trained,
        # they may grow past the attended length on some random tokens.
        layer.span.span_ratio.trainable = False
    tokens = rng.integers(0, V, (4 * B, M + 1)).astype("int32")
    before = graphs_compiled()
    spans = set()
    fit_losses(model, tokens, spans)
    # Spans of 32 tokens (ratio 0) plus the margin of 64: 96 rows.
    assert spans == {(96, 96)}
    assert graphs_compiled() - before == 1
    fit_losses(model, tokens, spans)
    assert graphs_compiled() - before == 1

    def set_ratios(value):
        for layer in model.attention_layers:
            ratio = layer.span.span_ratio
            ratio.assign(np.full(ratio.shape, value, "float32"))

    set_ratios(1.0)
    fit_losses(model, tokens, spans)
    assert spans == {(96, 96), (128, 128)}
    assert graphs_compiled() - before == 2
    set_ratios(0.0)
    fit_losses(model, tokens, spans)
    assert model.attended_spans() == [96, 96]
    assert graphs_compiled() - before == 2  # 96 rows: compiled before


def test_freezing_a_layer_between_fits_takes_effect(rng):
    """A layer frozen after some compiled steps (no new `compile`) keeps
    its weights from then on, as eagerly. The compiled step's optimizer
    was built for the old variables, so the step says so and runs
    eagerly."""
    tokens = rng.integers(0, V, (4 * B, M + 1)).astype("int32")
    compiled, eager, _ = compiled_and_eager(8, rng)
    for model in (compiled, eager):
        fit_losses(model, tokens[: 2 * B])
        model.attention_layers[0].trainable = False
    frozen = [np.array(w) for w in compiled.attention_layers[0].get_weights()]
    with pytest.warns(UserWarning, match="optimizer was built with"):
        losses = fit_losses(compiled, tokens[2 * B:])
    np.testing.assert_allclose(losses, fit_losses(eager, tokens[2 * B:]), rtol=1e-5)
    for got, want in zip(compiled.attention_layers[0].get_weights(), frozen):
        np.testing.assert_array_equal(got, want)
    assert_trained_alike(compiled, eager)


def test_weights_set_between_fits_are_the_ones_trained(rng):
    """Weights set between compiled fits (the step keeps the variables'
    tensors, which `set_weights` copies into) are what the next steps
    start from, as eagerly."""
    tokens = rng.integers(0, V, (4 * B, M + 1)).astype("int32")
    compiled, eager, _ = compiled_and_eager(9, rng)
    for model in (compiled, eager):
        fit_losses(model, tokens[: 2 * B])
    weights = [w + rng.normal(0.0, 0.1, w.shape).astype(w.dtype)
               if w.dtype.kind == "f" else w for w in eager.get_weights()]
    for model in (compiled, eager):
        model.set_weights(weights)
    np.testing.assert_allclose(
        fit_losses(compiled, tokens[2 * B:]), fit_losses(eager, tokens[2 * B:]),
        rtol=1e-5,
    )
    assert_trained_alike(compiled, eager)


def test_pinned_batches_are_the_rows_in_order():
    """`pinned_batches` yields every row once, in order, `batch_size` at a
    time (the last batch shorter)."""
    x = np.arange(7 * 3, dtype="int32").reshape(7, 3)
    y = -x
    batches = list(compiling.pinned_batches((x, y), 3, pin_memory=False))
    assert [len(b[0]) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)


def pinned_fit_spy(monkeypatch):
    """Makes `fit` take its pinned loaders as on CUDA (unpinned here) and
    returns the list of the loaders' kinds it built."""
    from keras_allattn.models import all_attention_lm

    used = []
    batches, stream = compiling.pinned_batches, compiling.pinned_stream

    def spy_batches(arrays, batch_size, pin_memory=True):
        used.append(("arrays", batch_size))
        return batches(arrays, batch_size, pin_memory=False)

    def spy_stream(dataset, pin_memory=True):
        used.append(("stream", None))
        return stream(dataset, pin_memory=False)

    monkeypatch.setattr(compiling, "pinned_batches", spy_batches)
    monkeypatch.setattr(compiling, "pinned_stream", spy_stream)
    monkeypatch.setattr(all_attention_lm, "_on_cuda", lambda model: True)
    return used


def test_fit_from_pinned_batches_trains_as_from_arrays(monkeypatch, rng):
    """`fit` on arrays through `pinned_batches` (what it does on CUDA)
    trains as Keras's own array loader does: losses, weights, memory."""
    tokens = rng.integers(0, V, (3 * B, M + 1)).astype("int32")
    pinned, plain, _ = compiled_and_eager(10, rng)
    plain.compile(optimizer=keras.optimizers.Adam(0.05), jit_compile=True,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    expected = fit_losses(plain, tokens)
    used = pinned_fit_spy(monkeypatch)
    np.testing.assert_allclose(fit_losses(pinned, tokens), expected, rtol=1e-6)
    assert used == [("arrays", B)]
    assert_trained_alike(pinned, plain)


def test_fit_from_a_pinned_stream_trains_as_from_the_dataset(monkeypatch, rng):
    """`fit` on a `StreamDataset` through `pinned_stream` (what it does on
    CUDA) reads the same batches in the same order, across epochs, as
    Keras's `PyDataset` loader: the same losses, weights and memory."""
    from keras_allattn.data.stream import StreamBatcher

    tokens = rng.integers(0, V, 40 * B * M).astype("int32")
    pinned, plain, _ = compiled_and_eager(11, rng)
    plain.compile(optimizer=keras.optimizers.Adam(0.05), jit_compile=True,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    runs = []
    for model in (plain, pinned):
        if model is pinned:
            used = pinned_fit_spy(monkeypatch)
        dataset = StreamBatcher(tokens, batch_size=B, block_size=M).as_dataset(start_step=2)
        history = model.fit(dataset, steps_per_epoch=2, epochs=2, verbose=0)
        runs.append(history.history["loss"])
    assert used == [("stream", None)]
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-6)
    assert_trained_alike(pinned, plain)


def test_pinned_stream_is_the_dataset_in_order():
    """`pinned_stream` yields items 0, 1, 2, ... of the dataset."""
    from keras_allattn.data.stream import StreamBatcher

    tokens = np.arange(3 * 4 * 6, dtype="int32")
    dataset = StreamBatcher(tokens, batch_size=3, block_size=4).as_dataset(start_step=1)
    loader = iter(compiling.pinned_stream(dataset, pin_memory=False))
    for index in range(5):
        got = next(loader)
        for tensor, want in zip(got, dataset[index]):
            np.testing.assert_array_equal(tensor.numpy(), want)


def test_compiled_steps_match_eager_steps(rng):
    """Losses, weights and the carried segment memory equal eager's."""
    compiled, eager, _ = compiled_and_eager(2, rng)
    tokens = rng.integers(0, V, (5 * B, M + 1)).astype("int32")
    before = graphs_compiled()
    losses = fit_losses(compiled, tokens)
    assert graphs_compiled() - before == 1
    np.testing.assert_allclose(losses, fit_losses(eager, tokens), rtol=1e-5)
    assert_trained_alike(compiled, eager)
    # A second fit continues from the memory the first one left.
    more = rng.integers(0, V, (2 * B, M + 1)).astype("int32")
    np.testing.assert_allclose(
        fit_losses(compiled, more), fit_losses(eager, more), rtol=1e-5
    )
    assert graphs_compiled() - before == 1


def test_evaluate_and_predict_are_one_graph_each(rng):
    """`evaluate` and `predict` after `compile(jit_compile=True)`: one graph
    each for all their batches (Keras's own `torch.compile` of these steps
    recompiled its layer machinery up to dynamo's limit), the numbers of
    eager ones from the same weights, and the training memory left as it
    was."""
    compiled, eager, memory = compiled_and_eager(4, rng)
    tokens = rng.integers(0, V, (4 * B, M + 1)).astype("int32")
    x, y = tokens[:, :-1], tokens[:, 1:]
    before = graphs_compiled()
    got = compiled.evaluate(x, y, batch_size=B, verbose=0)
    assert graphs_compiled() - before == 1
    np.testing.assert_allclose(
        got, eager.evaluate(x, y, batch_size=B, verbose=0), rtol=1e-5
    )
    assert compiled.evaluate(x, y, batch_size=B, verbose=0) == got
    predicted = compiled.predict(x, batch_size=B, verbose=0)
    assert graphs_compiled() - before == 2
    np.testing.assert_allclose(
        predicted, eager.predict(x, batch_size=B, verbose=0), atol=1e-5
    )
    np.testing.assert_array_equal(
        compiled.predict(x, batch_size=B, verbose=0), predicted
    )
    assert graphs_compiled() - before == 2
    for got_memory, kept in zip(compiled.get_memory(), memory):
        np.testing.assert_array_equal(got_memory, kept)


@pytest.mark.parametrize("remat", ["attention", "layer"])
def test_compiled_step_with_remat_matches_eager(rng, remat):
    """With recomputation (what `remat="auto"` picks for the large presets)
    the step still compiles into one graph, with no warning, and trains as
    the eager step: the backward's recomputation reads the traced weights
    (it once read the variables themselves, failed to trace, and the step
    ran eagerly). On CUDA, `remat="layer"` runs eagerly by design, with a
    warning saying so."""
    settings = dict(remat=remat, dropout=0.3, adaptive_span=True)
    compiled, eager = make_model(7, True, **settings), make_model(7, False, **settings)
    tokens = rng.integers(0, V, (3 * B, M + 1)).astype("int32")
    before = graphs_compiled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = fit_losses(compiled, tokens)
    expected = compiled_graphs_expected(compiled)
    assert bool([w for w in caught if "eagerly" in str(w.message)]) == (not expected)
    assert graphs_compiled() - before == expected
    np.testing.assert_allclose(losses, fit_losses(eager, tokens), rtol=1e-5)
    assert_trained_alike(compiled, eager)


@pytest.mark.parametrize("remat", [False, "layer"])
def test_torch_ring_trains_like_the_rotation(monkeypatch, rng, remat):
    """With `KERAS_ALLATTN_TORCH_RING=1` the memory is a ring buffer written
    in place inside the compiled step (one graph); at trimmed spans (fewer
    attended rows than `max_span`) it trains as the rotating memory of an
    eager model: losses, weights and memory equal; `evaluate` (memory
    written out of place) gives the same numbers and leaves the training
    memory as it was."""
    from keras_allattn.layers.segment_memory import TORCH_RING_ENV

    settings = dict(remat=remat, adaptive_span=True, max_span=128,
                    span_granularity=32)
    monkeypatch.setenv(TORCH_RING_ENV, "1")
    ring = make_model(8, True, **settings)
    monkeypatch.setenv(TORCH_RING_ENV, "0")
    eager = make_model(8, False, **settings)
    assert all(m.ring for m in ring.segment_memories)
    assert not any(m.ring for m in eager.segment_memories)
    memory = [rng.normal(size=m.shape).astype("float32") for m in eager.get_memory()]
    for model in (ring, eager):
        model.set_memory(memory)
    tokens = rng.integers(0, V, (4 * B, M + 1)).astype("int32")
    before = graphs_compiled()
    losses = fit_losses(ring, tokens)
    assert graphs_compiled() - before == compiled_graphs_expected(ring)
    assert ring.attended_spans() == [96, 96]  # of 128 rows
    np.testing.assert_allclose(losses, fit_losses(eager, tokens), rtol=1e-5)
    assert_trained_alike(ring, eager)
    x, y = tokens[:, :-1], tokens[:, 1:]
    kept = ring.get_memory()
    np.testing.assert_allclose(
        ring.evaluate(x, y, batch_size=B, verbose=0),
        eager.evaluate(x, y, batch_size=B, verbose=0), rtol=1e-5,
    )
    for got, expected in zip(ring.get_memory(), kept):
        np.testing.assert_array_equal(got, expected)


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
    kernels apply, the compiled step keeps them, as the eager one does."""
    from keras_allattn.models import memory_estimate

    monkeypatch.setattr(memory_estimate, "fused_kernel_applies",
                        lambda head_dim, dropout: (True, ""))
    model = make_model(3, True)
    assert memory_estimate.uses_fused_kernels(model)
    model.compile(optimizer="sgd", jit_compile=False)
    assert memory_estimate.uses_fused_kernels(model)
    monkeypatch.setattr(memory_estimate, "fused_kernel_applies",
                        lambda head_dim, dropout: (False, "no CUDA device"))
    for jit_compile in (True, False):
        model.compile(optimizer="sgd", jit_compile=jit_compile)
        assert not memory_estimate.uses_fused_kernels(model)


def fused_kernels_on_cpu(monkeypatch):
    """Makes `implementation="auto"` pick the Triton kernels for CPU tensors,
    run by Triton's interpreter (on a CUDA machine it picks them anyway)."""
    torch = pytest.importorskip("torch")
    from keras_allattn.ops import attention
    from keras_allattn.ops import triton_attention

    if not triton_attention.triton_available():
        pytest.skip("triton cannot be imported")
    if torch.cuda.is_available():
        return
    if os.environ.get("TRITON_INTERPRET") == "0" or (
        triton_attention._BUILT is not None
        and type(triton_attention._fwd_kernel).__name__ != "InterpretedFunction"
    ):
        pytest.skip("the kernels are built for a GPU, not the interpreter")
    # Read when the kernels are built (on first use).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dispatcher = attention._fused_kernel

    class CudaTensor:  # the dispatcher reads only the query's device
        is_cuda = True

    def on_cpu(query, *args, **kwargs):
        return dispatcher(CudaTensor(), *args, **kwargs)

    monkeypatch.setattr(attention, "_fused_kernel", on_cpu)


def test_compiled_step_keeps_the_fused_kernels(monkeypatch, rng):
    """Where the Triton kernels run eagerly, the compiled step's graph holds
    their operators (forward and backward), not the portable attention, and
    trains as the eager step on the same kernels does: losses, weights,
    segment memory and dropout seeds, attention dropout active."""
    fused_kernels_on_cpu(monkeypatch)
    import torch

    graphs = []

    def recording_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    monkeypatch.setattr(compiling, "TORCH_TRAIN_BACKEND", recording_backend)
    monkeypatch.setattr(kernel_settings, "_deterministic", False)
    settings = dict(hidden_dim=32, adaptive_span=True, dropout=0.3)
    compiled, eager, _ = compiled_and_eager(6, rng, **settings)
    tokens = rng.integers(0, V, (3 * B, M + 1)).astype("int32")
    losses = fit_losses(compiled, tokens)
    assert len(graphs) == 1
    targets = {node.target for node in graphs[0].graph.nodes}
    assert torch.ops.aten._softmax.default not in targets  # the portable path's
    kernels = torch.ops.keras_allattn
    assert kernels.triton_all_attention.default in targets
    assert kernels.triton_all_attention_backward.default in targets
    np.testing.assert_allclose(losses, fit_losses(eager, tokens), rtol=1e-5)
    assert_trained_alike(compiled, eager)
    for got, expected in zip(seed_states(compiled), seed_states(eager)):
        np.testing.assert_array_equal(got, expected)

    def deterministic_arguments(graph):
        return [node.args[-1] for node in graph.graph.nodes
                if node.target == kernels.triton_all_attention.default]

    # The kernels' deterministic mode is an argument of the operators, read
    # when tracing: switching it traces the step again.
    assert deterministic_arguments(graphs[0]) == [False, False]
    monkeypatch.setattr(kernel_settings, "_deterministic", True)
    fit_losses(compiled, tokens[:B])
    assert len(graphs) == 2
    assert deterministic_arguments(graphs[1]) == [True, True]


def test_compiled_generation_call_keeps_the_fused_kernels(monkeypatch, rng):
    """`compiling.torch_compile` (generation's compiled calls) traces the
    Triton forward operator where the kernels run eagerly, not the
    portable attention, and computes what the eager call does."""
    fused_kernels_on_cpu(monkeypatch)
    import torch

    graphs = []

    def recording_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compile_with = torch.compile
    # torch_compile uses inductor, whose C++ build takes minutes on a CPU.
    monkeypatch.setattr(
        torch, "compile",
        lambda fn, **options: compile_with(fn, backend=recording_backend, **options),
    )
    model = make_model(8, False, hidden_dim=32, adaptive_span=True)
    tokens = rng.integers(0, V, (B, M)).astype("int32")
    memories = [rng.normal(size=m.shape).astype("float32")
                for m in model.get_memory()]

    def call(tokens, *memories):
        return model.call_with_memory(tokens, list(memories))

    compiled = compiling.torch_compile(model, call)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to eager
        logits, next_memories = compiled(tokens, *memories)
    assert len(graphs) == 1
    targets = {node.target for node in graphs[0].graph.nodes}
    assert torch.ops.aten._softmax.default not in targets  # the portable path's
    assert torch.ops.keras_allattn.triton_all_attention.default in targets
    with torch.no_grad():
        want_logits, want_memories = call(
            *(keras.ops.convert_to_tensor(x) for x in (tokens, *memories))
        )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(logits),
        keras.ops.convert_to_numpy(want_logits), rtol=1e-5, atol=1e-5,
    )
    for got, expected in zip(next_memories, want_memories):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got),
                                   keras.ops.convert_to_numpy(expected))


def test_throughput_auto_compiles_the_step_where_it_traces(monkeypatch):
    """`benchmarks/throughput.py --jit-compile auto` compiles the PyTorch
    step (fused kernels included) unless it would run eagerly anyway."""
    import argparse
    import pathlib

    monkeypatch.syspath_prepend(
        str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks")
    )
    import throughput

    def choice(flag, **overrides):
        model = make_model(7, False, **overrides)
        return throughput.jit_compile(argparse.Namespace(jit_compile=flag), model)

    assert choice("auto") is True
    assert choice("auto", dropout=0.3) is True  # the attention dropout traces
    assert choice("auto", embedding_dropout=0.1) is False
    assert choice("on", embedding_dropout=0.1) is True
    assert choice("off") is False


def test_throughput_reports_a_step_that_fell_back_to_eager(monkeypatch, rng):
    """`throughput.py`'s `jit_compile` says whether the steps ran compiled:
    not where `jit_compile=True` fell back to eager (Keras's seeded
    Dropout)."""
    import pathlib

    monkeypatch.syspath_prepend(
        str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks")
    )
    import throughput

    tokens = rng.integers(0, V, (B, M + 1)).astype("int32")
    for overrides, compiled in (({}, True), ({"embedding_dropout": 0.1}, False)):
        model = make_model(8, True, **overrides)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit_losses(model, tokens)
        assert throughput.step_compiled(model) is compiled
    assert throughput.step_compiled(make_model(8, False)) is False


def test_layer_remat_recomputes_from_the_values_the_forward_read(rng):
    """remat="layer" on PyTorch: the backward's recomputation uses the
    values the forward read under a `keras.StatelessScope` (how the compiled
    step maps every variable to a traced value) even when the backward runs
    outside that scope, as it does on CUDA, where the autograd engine runs
    it on a thread of its own. Gradients equal those without remat."""
    import torch

    from keras_allattn import PersistentMemoryAttention
    from keras_allattn import RelativePosition

    positions = RelativePosition(head_dim=8, max_span=16)
    x = torch.tensor(rng.normal(size=(2, 5, 16)), dtype=torch.float32)
    memory = torch.tensor(rng.normal(size=(2, 16, 16)), dtype=torch.float32)
    grads = {}
    for remat in (False, "layer"):
        layer = PersistentMemoryAttention(
            num_heads=2, max_span=16, persistent_memory_size=4,
            adaptive_span=True, remat=remat,
        )
        position_keys = positions(x)
        layer(x, memory=memory, position_keys=position_keys)
        # Values other than the variables' own: a recomputation that reads
        # the variables gives other gradients.
        keras.utils.set_random_seed(11)
        values = [
            (torch.randn_like(v.value) * 0.5).requires_grad_(v.trainable)
            if v.value.is_floating_point() else v.value
            for v in layer.variables
        ]
        with keras.StatelessScope(state_mapping=list(zip(layer.variables, values))):
            out = layer(x, memory=memory, position_keys=position_keys)
        leaves = [v for v in values if v.requires_grad]
        grads[remat] = torch.autograd.grad((out ** 2).sum(), leaves)
    for plain, recomputed in zip(grads[False], grads["layer"]):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-6)


def test_inductor_recomputes_each_layer_just_before_its_backward(monkeypatch, rng):
    """With inductor and remat="layer", the compiled step's code runs each
    layer's recomputation right before that layer's backward: the forward
    operators of every layer, then (forward, backward) pairs. Inductor's
    peak-memory reordering moved every recomputation ahead of the first
    backward (forward, forward, forward, forward, backward, backward), so
    every layer's recomputed keys and values lived at once (the compiled
    text8_large step at full span ran out of 80 GiB on an H200)."""
    fused_kernels_on_cpu(monkeypatch)
    import re

    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(compiling, "TORCH_TRAIN_BACKEND", "inductor")
    model = make_model(3, True, num_layers=3, hidden_dim=32, remat="layer")
    tokens = rng.integers(0, V, (B, M + 1)).astype("int32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, codes = run_and_get_code(fit_losses, model, tokens)
    assert not [w for w in caught if "eagerly" in str(w.message)]
    calls = re.findall(
        r"torch\.ops\.keras_allattn\.(triton_all_attention(?:_backward)?)\.default\(",
        "\n".join(codes),
    )
    forward, backward = "triton_all_attention", "triton_all_attention_backward"
    assert calls == [forward] * 3 + [forward, backward] * 3, calls


def test_a_failed_compiled_step_warns_with_its_first_error(monkeypatch, rng):
    """When the compiled step fails while running (here the fused backward
    runs out of memory, simulated), the warning names that error, not the
    one dynamo raised while handling it ("Attempt to trace generator" hid
    an out-of-memory error on an H200), and the step runs eagerly."""
    fused_kernels_on_cpu(monkeypatch)
    from keras_allattn.ops import triton_attention

    position_inputs = triton_attention._position_inputs
    fail = []

    def failing(*args, **kwargs):
        if fail:
            fail.clear()
            raise MemoryError("simulated: out of memory in the backward")
        return position_inputs(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "_position_inputs", failing)
    model = make_model(4, True, hidden_dim=32, remat="layer")
    tokens = rng.integers(0, V, (2 * B, M + 1)).astype("int32")
    fit_losses(model, tokens[:B])  # compiled, built
    fail.append(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = fit_losses(model, tokens[B:])
    messages = [str(w.message) for w in caught if "eagerly" in str(w.message)]
    assert len(messages) == 1, messages
    assert "MemoryError: simulated: out of memory in the backward" in messages[0]
    assert np.isfinite(losses).all()


def test_layer_remat_on_cuda_trains_eagerly_with_a_warning(monkeypatch, rng):
    """On a CUDA device a step with remat="layer" runs eagerly, with a
    warning that says why: compiled, it needed more memory than the plan
    counts (text8_large at full span ran out of 80 GiB on an H200, where
    the eager step uses 48). The CPU keeps the compiled step."""
    import torch

    monkeypatch.setenv("KERAS_ALLATTN_MEMORY_GIB", "16")
    tokens = rng.integers(0, V, (B, M + 1)).astype("int32")
    on_cpu = make_model(5, True, remat="layer")
    fit_losses(on_cpu, tokens)
    assert on_cpu.__dict__.get("_torch_train_steps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = make_model(5, True, remat="layer")
    with pytest.warns(UserWarning, match="runs eagerly, not compiled: remat='layer'"):
        losses = fit_losses(model, tokens)
    assert not model.__dict__.get("_torch_train_steps")
    eager = make_model(5, False, remat="layer")
    np.testing.assert_allclose(losses, fit_losses(eager, tokens), rtol=1e-5)


def test_cuda_graphs_follow_the_device_and_the_switch(monkeypatch):
    """CUDA graphs only for CUDA tensors compiled by inductor, switched off
    by `KERAS_ALLATTN_TORCH_CUDA_GRAPHS=0`; a bad value is an error that
    names the variable and the value."""
    import torch

    class OnCuda:
        is_cuda = True

    base = compiling.TORCH_TRAIN_OPTIONS
    monkeypatch.setattr(compiling, "TORCH_TRAIN_BACKEND", "inductor")
    assert compiling._train_options([torch.zeros(2)]) == base
    assert compiling._train_options([OnCuda(), torch.zeros(2)]) == base
    assert compiling._train_options([OnCuda()]) == {
        **base, "triton.cudagraphs": True
    }
    monkeypatch.setenv("KERAS_ALLATTN_TORCH_CUDA_GRAPHS", "off")
    assert compiling._train_options([OnCuda()]) == base
    monkeypatch.setenv("KERAS_ALLATTN_TORCH_CUDA_GRAPHS", "maybe")
    with pytest.raises(ValueError, match="KERAS_ALLATTN_TORCH_CUDA_GRAPHS='maybe'"):
        compiling._train_options([OnCuda()])
    monkeypatch.setenv("KERAS_ALLATTN_TORCH_CUDA_GRAPHS", "1")
    monkeypatch.setattr(compiling, "TORCH_TRAIN_BACKEND", "aot_eager")
    assert compiling._train_options([OnCuda()]) == base


def test_cuda_graph_step_matches_eager(monkeypatch, rng):
    """On CUDA the inductor-compiled step replays as a CUDA graph (no skip;
    only the batch is copied into the graph's buffers, the variables are
    its static inputs) and trains as the eager step does, memory and
    weights included, over steps and a second `fit`."""
    import torch
    from torch._dynamo.utils import counters

    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA device")
    monkeypatch.setattr(compiling, "TORCH_TRAIN_BACKEND", "inductor")
    monkeypatch.delenv("KERAS_ALLATTN_TORCH_CUDA_GRAPHS", raising=False)
    compiled, eager, _ = compiled_and_eager(7, rng, dropout=0.2)
    tokens = rng.integers(0, V, (6 * B, M + 1)).astype("int32")
    skips = counters["inductor"]["cudagraph_skips"]
    copied = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    losses = fit_losses(compiled, tokens)
    recorded = dict(counters["inductor"])
    assert recorded.get("cudagraph_skips", 0) == skips, recorded
    # Only the batch is copied into the graph's buffers (a few tensors per
    # recording), not the variables.
    copied = recorded.get("cudagraph_recorded_non_static_inputs", 0) - copied
    assert 0 < copied < len(compiled.variables) // 2, (copied, recorded)
    np.testing.assert_allclose(losses, fit_losses(eager, tokens), rtol=1e-4)
    # Inductor's fused kernels round differently from eager PyTorch, and
    # Adam (learning rate 0.05) turns a rounding difference in a gradient
    # near zero into one in the weights (H200 runs: up to 1.7e-5).
    for got, expected in zip(compiled.get_weights() + compiled.get_memory(),
                             eager.get_weights() + eager.get_memory()):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    more = rng.integers(0, V, (3 * B, M + 1)).astype("int32")
    np.testing.assert_allclose(
        fit_losses(compiled, more), fit_losses(eager, more), rtol=1e-4
    )
