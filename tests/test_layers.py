import contextlib
import re

import keras
import numpy as np
import pytest

from keras_allattn import AdaptiveSpan
from keras_allattn import FeedForward
from keras_allattn import PersistentMemoryAttention
from keras_allattn import RelativePosition
from keras_allattn import SegmentMemory
from tests import reference
from tests.conftest import randomize

B, M, D_MODEL, H, L = 2, 5, 16, 4, 12


def build_attention(rng, **kwargs):
    positions = RelativePosition(head_dim=D_MODEL // H, max_span=L)
    layer = PersistentMemoryAttention(num_heads=H, max_span=L, **kwargs)
    x = rng.normal(size=(B, M, D_MODEL)).astype("float32")
    table = positions(x)
    layer(x, memory=np.zeros((B, L, D_MODEL), "float32"), position_keys=table)
    randomize(layer, rng, 0.0, 0.8)
    return layer, positions


CASES = [
    dict(persistent_memory_size=0, adaptive_span=False),
    dict(persistent_memory_size=0, adaptive_span=True, span_ramp=4),
    dict(persistent_memory_size=6, adaptive_span=False),
    dict(persistent_memory_size=6, adaptive_span=True, span_ramp=4),
    dict(persistent_memory_size=6, integration="separate"),
    dict(
        persistent_memory_size=6,
        adaptive_span=True,
        span_ramp=4,
        integration="separate",
    ),
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda c: str(sorted(c.items())))
def test_attention_matches_numpy_over_two_segments(rng, kwargs):
    layer, positions = build_attention(rng, **kwargs)
    w = reference.attention_weights(layer, positions.table)
    memory = np.zeros((B, L, D_MODEL))
    for segment in range(2):
        x = rng.normal(size=(B, M, D_MODEL))
        expected = reference.attention(
            x, memory, w, H, L, layer.span_ramp, layer.integration
        )
        actual = layer(
            x.astype("float32"),
            memory=memory.astype("float32"),
            position_keys=positions(x),
        )
        assert reference.relative_error(actual, expected) < 1e-5, segment
        memory = np.concatenate([memory, x], axis=1)[:, -L:]


def test_attention_block_longer_than_span(rng):
    layer, positions = build_attention(rng, persistent_memory_size=3)
    w = reference.attention_weights(layer, positions.table)
    x = rng.normal(size=(B, 2 * L + 3, D_MODEL))
    memory = rng.normal(size=(B, L, D_MODEL))
    expected = reference.attention(x, memory, w, H, L)
    actual = layer(
        x.astype("float32"),
        memory=memory.astype("float32"),
        position_keys=positions(x),
    )
    assert reference.relative_error(actual, expected) < 1e-5


def test_trimmed_attention_is_exact(rng):
    layer, positions = build_attention(
        rng, persistent_memory_size=4, adaptive_span=True, span_ramp=2
    )
    layer.span.span_ratio.assign(np.array([0.1, 0.3, 0.0, 0.2]))
    assert layer.span.current_spans().max() == 6
    x = rng.normal(size=(B, M, D_MODEL)).astype("float32")
    memory = rng.normal(size=(B, L, D_MODEL)).astype("float32")
    table = positions(x)
    full = layer(x, memory=memory, position_keys=table)
    layer.set_attended_span(6)
    trimmed = layer(x, memory=memory, position_keys=table)
    assert reference.relative_error(trimmed, full) < 1e-6
    # The attended rows alone are enough (what the model passes); fewer
    # are an error that names the attended span.
    alone = layer(x, memory=memory[:, L - 6 :], position_keys=table)
    assert reference.relative_error(alone, full) < 1e-6
    with pytest.raises(ValueError, match=re.escape(
        "at least attended_span=6 rows. Received: memory.shape=(2, 5, 16)"
    )):
        layer(x, memory=memory[:, L - 5 :], position_keys=table)
    layer.set_attended_span(3)
    wrong = layer(x, memory=memory, position_keys=table)
    assert reference.relative_error(wrong, full) > 1e-3


def test_attention_with_an_unknown_batch_size(rng):
    """Traced for any batch size (a TensorFlow graph such as the SavedModel
    export's), the attention computes what the static-shape path does."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("only TensorFlow traces with an unknown batch size")
    import tensorflow as tf

    from keras_allattn.ops.attention import skew
    from keras_allattn.ops.attention import unskew

    layer, positions = build_attention(
        rng, persistent_memory_size=6, adaptive_span=True, span_ramp=4
    )
    x = rng.normal(size=(B, M, D_MODEL)).astype("float32")
    memory = rng.normal(size=(B, L, D_MODEL)).astype("float32")
    expected = layer(x, memory=memory, position_keys=positions(x))

    @tf.function(input_signature=[tf.TensorSpec([None, M, D_MODEL]),
                                  tf.TensorSpec([None, L, D_MODEL])])
    def attend(x, memory):
        return layer(x, memory=memory, position_keys=positions(x))

    assert reference.relative_error(attend(x, memory), expected) < 1e-6
    scores = rng.normal(size=(B, H, M, L + M)).astype("float32")
    static = skew(unskew(scores, L))
    for shape in ([None, H, M, L + M], [None, None, M, L + M]):
        both = tf.function(
            lambda s: skew(unskew(s, L)),
            input_signature=[tf.TensorSpec(shape)],
        )
        np.testing.assert_array_equal(both(scores), static)


def test_adaptive_span_layer(rng):
    layer = AdaptiveSpan(num_heads=3, max_span=40, span_ramp=8, span_loss_coeff=0.5)
    weights = rng.uniform(size=(2, 3, 4, 40)).astype("float32")
    layer.build()
    z = np.array([0.0, 0.25, 1.0])
    layer.span_ratio.assign(z)
    mask = reference.span_mask(z, 40, 8)[:, ::-1]  # columns: distance 40 .. 1
    out = layer(weights)
    masked = weights * mask[None, :, None, :]
    expected = masked / (masked.sum(-1, keepdims=True) + 1e-8)
    assert reference.relative_error(out, expected) < 1e-6
    out = layer(weights, normalize=False)
    assert reference.relative_error(out, masked) < 1e-6
    assert layer.current_spans().tolist() == [8, 18, 40]
    loss = keras.ops.convert_to_numpy(layer.span_loss())
    np.testing.assert_allclose(loss, 0.5 * 40 * z.mean(), rtol=1e-6)
    constraint = layer.span_ratio.constraint
    clipped = keras.ops.convert_to_numpy(constraint(np.array([-0.5, 0.5, 1.5])))
    np.testing.assert_allclose(clipped, [0.0, 0.5, 1.0])


def test_adaptive_span_adds_loss():
    layer = AdaptiveSpan(num_heads=2, max_span=10, span_init=0.5, span_loss_coeff=2.0)
    layer(np.ones((1, 2, 3, 10), "float32"))
    assert len(layer.losses) == 1
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer.losses[0]), 2.0 * 10 * 0.5, rtol=1e-6
    )


@pytest.fixture(params=["default", "torch_rotation"])
def memory_storage(request, monkeypatch):
    """The segment memory's storage: the backend's default (a ring buffer
    on JAX and PyTorch), and on PyTorch the rotating memory of
    `KERAS_ALLATTN_TORCH_RING=0` as well."""
    from keras_allattn.layers.segment_memory import TORCH_RING_ENV

    if request.param == "torch_rotation":
        if keras.backend.backend() != "torch":
            pytest.skip("KERAS_ALLATTN_TORCH_RING is PyTorch's switch")
        monkeypatch.setenv(TORCH_RING_ENV, "0")
    else:
        monkeypatch.delenv(TORCH_RING_ENV, raising=False)
    return request.param


def test_segment_memory_carries_state(rng, memory_storage):
    layer = SegmentMemory(batch_size=2, memory_length=4)
    a = rng.normal(size=(2, 3, 5)).astype("float32")
    b = rng.normal(size=(2, 3, 5)).astype("float32")
    first = keras.ops.convert_to_numpy(layer(a))
    np.testing.assert_array_equal(first, np.zeros((2, 4, 5)))
    assert layer.ring == (
        keras.backend.backend() in ("jax", "torch")
        and memory_storage != "torch_rotation"
    )
    second = keras.ops.convert_to_numpy(layer(b))
    np.testing.assert_allclose(second[:, 1:], a)
    np.testing.assert_allclose(
        layer.ordered(keras.ops.convert_to_numpy(layer.memory)),
        np.concatenate([a, b], 1)[:, -4:],
    )
    # State, not a weight: carried by the training loops, never saved.
    assert layer.weights == [] and layer.count_params() == 0
    state = [layer.memory] + ([layer.start] if layer.ring else [])
    assert [v.path for v in layer.variables] == [v.path for v in state]
    kept = layer.snapshot()
    layer(a)  # an update after the snapshot does not reach it
    layer.restore(kept)
    np.testing.assert_allclose(
        layer.ordered(keras.ops.convert_to_numpy(layer.memory)),
        np.concatenate([a, b], 1)[:, -4:],
    )
    layer.reset()
    assert not np.any(keras.ops.convert_to_numpy(layer.memory))
    with pytest.raises(ValueError, match="batch_size.*Received: a batch of size 3"):
        layer(rng.normal(size=(3, 3, 5)).astype("float32"))


@pytest.mark.parametrize(
    "layer",
    [
        RelativePosition(head_dim=4, max_span=9),
        AdaptiveSpan(num_heads=2, max_span=9, span_ramp=3, span_init=0.2,
                     span_loss_coeff=1e-3),
        PersistentMemoryAttention(num_heads=2, max_span=9, persistent_memory_size=3,
                                  adaptive_span=True, span_ramp=3, span_init=0.1,
                                  span_loss_coeff=1e-4, integration="separate",
                                  dropout=0.1),
        SegmentMemory(batch_size=3, memory_length=7),
        FeedForward(feedforward_dim=12, dropout=0.2),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_config_round_trip(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer)
    )
    assert type(restored) is type(layer)
    assert restored.get_config() == config


def test_attention_weights_and_training_step(rng):
    layer, positions = build_attention(
        rng, persistent_memory_size=3, adaptive_span=True, span_loss_coeff=1e-3
    )
    names = sorted(v.path.split("/")[-1] for v in layer.trainable_weights)
    assert names == sorted(["kernel"] * 4 + ["persistent_keys",
                                             "persistent_values", "span_ratio"])
    assert len(layer.losses) == 1


def test_feed_forward_matches_numpy(rng):
    layer = FeedForward(feedforward_dim=12)
    x = rng.normal(size=(2, 3, 8)).astype("float32")
    layer(x)
    randomize(layer, rng)
    w1, b1 = (reference._np(v) for v in (layer.inner_dense.kernel, layer.inner_dense.bias))
    w2, b2 = (reference._np(v) for v in (layer.outer_dense.kernel, layer.outer_dense.bias))
    expected = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    assert reference.relative_error(layer(x), expected) < 1e-5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_heads=0, max_span=4), "num_heads=0"),
        (dict(num_heads=2, max_span=0), "max_span=0"),
        (dict(num_heads=2, max_span=4, persistent_memory_size=-1),
         "persistent_memory_size=-1"),
        (dict(num_heads=2, max_span=4, span_ramp=0), "span_ramp=0"),
        (dict(num_heads=2, max_span=4, adaptive_span=True, span_init=1.5),
         "span_init=1.5"),
        (dict(num_heads=2, max_span=4, integration="concat"),
         "integration='concat'"),
        (dict(num_heads=2, max_span=4, dropout=1.0), "dropout=1.0"),
        (dict(num_heads=2, max_span=4, implementation="cuda"),
         "implementation='cuda'"),
    ],
)
def test_attention_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        PersistentMemoryAttention(**kwargs)


def test_attention_width_not_divisible(rng):
    layer = PersistentMemoryAttention(num_heads=3, max_span=4)
    positions = RelativePosition(head_dim=4, max_span=4)
    x = rng.normal(size=(1, 2, 8)).astype("float32")
    with pytest.raises(ValueError, match="width=8, num_heads=3"):
        layer(x, memory=np.zeros((1, 4, 8), "float32"), position_keys=positions(x))


def test_attention_memory_too_short(rng):
    layer, positions = build_attention(rng)
    x = rng.normal(size=(B, M, D_MODEL)).astype("float32")
    with pytest.raises(ValueError, match="max_span=12 rows"):
        layer(x, memory=np.zeros((B, 5, D_MODEL), "float32"),
              position_keys=positions(x))


def test_dispatch_uses_the_portable_path_where_no_kernel_applies(rng):
    from keras_allattn.ops import attention as attention_ops

    q = rng.normal(size=(2, 3, 2, 4)).astype("float32")
    k = rng.normal(size=(2, 8, 2, 4)).astype("float32")
    pos = rng.normal(size=(4, 5)).astype("float32")
    pk = rng.normal(size=(2, 3, 4)).astype("float32")
    args = (q, k, k, pos, pk, pk)
    auto = attention_ops.all_attention(*args, implementation="auto")
    portable = attention_ops.portable_all_attention(*args)
    assert reference.relative_error(auto, portable) == 0.0
    with pytest.raises(ValueError, match="No fused all-attention kernel applies"):
        attention_ops.all_attention(*args, implementation="fused")


def test_deterministic_switch(monkeypatch):
    from keras_allattn.ops import kernel_settings as attention_ops

    monkeypatch.setattr(attention_ops, "_deterministic", None)
    for value, expected in (("1", True), (" TRUE", True), ("0", False), ("", False)):
        monkeypatch.setenv("KERAS_ALLATTN_DETERMINISTIC", value)
        assert attention_ops.is_deterministic() is expected
    monkeypatch.setenv("KERAS_ALLATTN_DETERMINISTIC", "sometimes")
    with pytest.raises(ValueError, match="KERAS_ALLATTN_DETERMINISTIC='sometimes'"):
        attention_ops.is_deterministic()
    attention_ops.set_deterministic(True)  # overrides the environment
    assert attention_ops.is_deterministic() is True
    monkeypatch.delenv("KERAS_ALLATTN_DETERMINISTIC")
    attention_ops.set_deterministic(False)
    assert attention_ops.is_deterministic() is False
    for bad in (1, "true", None, np.bool_(True)):
        message = "`enabled` must be True or False.*" + re.escape(f"enabled={bad!r}")
        with pytest.raises(ValueError, match=message):
            attention_ops.set_deterministic(bad)
    assert attention_ops.is_deterministic() is False


def test_position_bytes_setting(monkeypatch):
    """The fused kernels' cap on the position scores of one pass: 1 GiB by
    default, the environment's positive byte count otherwise, and a clear
    error naming the variable for anything else."""
    from keras_allattn.ops import kernel_settings

    monkeypatch.delenv("KERAS_ALLATTN_POSITION_BYTES", raising=False)
    assert kernel_settings.position_bytes() == 2**30
    monkeypatch.setenv("KERAS_ALLATTN_POSITION_BYTES", " 4096 ")
    assert kernel_settings.position_bytes() == 4096
    for bad in ("0", "-5", "1.5", "1GiB"):
        monkeypatch.setenv("KERAS_ALLATTN_POSITION_BYTES", bad)
        with pytest.raises(ValueError, match=re.escape(
                f"KERAS_ALLATTN_POSITION_BYTES={bad!r}")):
            kernel_settings.position_bytes()


def test_span_mask_gradient_passes_at_the_clip_ends():
    """As torch.clamp in the reference: at z = 0 the ends are whole distances."""
    from keras_allattn.ops.attention import span_mask

    z = np.zeros((1,), "float32")
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        grad = jax.grad(lambda z: span_mask(z, 16, 4, 16).sum())(z)
    elif backend == "tensorflow":
        import tensorflow as tf

        zt = tf.Variable(z)
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(span_mask(zt, 16, 4, 16))
        grad = tape.gradient(total, zt)
    else:
        import torch

        zt = torch.tensor(z, requires_grad=True)
        span_mask(zt, 16, 4, 16).sum().backward()
        grad = zt.grad
    # m(r) = (4 - r + 1) / 4 for r = 1..5 (r = 1 and r = 5 are the ends),
    # each with dm/dz = L / R = 4.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(grad), [5 * 4.0])


def test_span_ratio_stays_float32_under_mixed_precision(rng, monkeypatch):
    """A bfloat16 span ratio would move the span by up to L / 512 tokens,
    and a recomputation (remat) outside the layer's autocast scope would
    read another dtype than the forward pass did."""
    from keras_allattn.layers import persistent_memory_attention as module

    seen = []
    original = module.all_attention

    def spy(**kwargs):
        seen.append(keras.backend.standardize_dtype(kwargs["span_ratio"].dtype))
        return original(**kwargs)

    monkeypatch.setattr(module, "all_attention", spy)
    layer, positions = build_attention(
        rng, adaptive_span=True, span_ramp=4, dtype="mixed_bfloat16"
    )
    x = rng.normal(size=(B, M, D_MODEL)).astype("float32")
    layer(x, memory=np.zeros((B, L, D_MODEL), "float32"),
          position_keys=positions(x))
    assert seen and set(seen) == {"float32"}


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("length", [6, 8])
def test_segment_memory_follows_the_streams_over_uneven_blocks(
    rng, length, grad, memory_storage
):
    """Over blocks of 1 to 11 rows (shorter and longer than the memory,
    dividing its length or not), every call returns the last `rows` rows
    before it, oldest first, and the stored rows (read oldest first by
    `ordered`, or from the model's side through `set_value`, `snapshot`
    and `restore`) are the last `length` rows of the whole stream, as a
    float64 NumPy stream says. On PyTorch, in training calls (grad mode,
    the ring written in place) and others alike."""
    if keras.backend.backend() != "torch" and not grad:
        pytest.skip("grad mode is PyTorch's")
    with contextlib.ExitStack() as stack:
        if not grad:
            import torch

            stack.enter_context(torch.no_grad())
        check_memory_stream(rng, length)


def check_memory_stream(rng, length):
    layer = SegmentMemory(batch_size=2, memory_length=length)
    stream = np.zeros((2, length, 3))
    for count, rows in [(3, None), (1, 2), (5, length), (11, 1), (2, 5),
                        (length, None), (4, 3), (7, length)]:
        block = rng.normal(size=(2, count, 3)).astype("float32")
        got = keras.ops.convert_to_numpy(layer(block, rows=rows))
        want = stream[:, stream.shape[1] - (rows or length):]
        np.testing.assert_array_equal(got, want.astype("float32"))
        stream = np.concatenate([stream, block], 1)
        stored = layer.ordered(keras.ops.convert_to_numpy(layer.memory))
        np.testing.assert_array_equal(stored, stream[:, -length:].astype("float32"))
    kept = layer.snapshot()
    replaced = rng.normal(size=(2, length, 3)).astype("float32")
    layer.set_value(replaced)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(layer(np.zeros((2, 1, 3), "float32"))), replaced
    )
    layer.restore(kept)
    block = rng.normal(size=(2, 3, 3)).astype("float32")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(layer(block)),
        stream[:, -length:].astype("float32"),
    )
    for rows in (0, length + 1, 2.0, True):
        with pytest.raises(ValueError, match=re.escape(f"Received: rows={rows!r}")):
            layer(block, rows=rows)


def test_segment_memory_ring_writes_only_the_new_rows():
    """On JAX a compiled call that updates the memory (its state donated,
    as in Keras's training step) writes the block's rows into the buffer
    in place: the only buffer-sized values of the optimised program are
    the parameter and one scatter into it (the rotation of `[memory;
    inputs]` rewrote every row; a read of the old rows before the write
    made XLA copy the buffer twice)."""
    if keras.backend.backend() != "jax":
        pytest.skip("the ring buffer is JAX's storage")
    import jax

    batch, length, count, width = 2, 64, 4, 32
    layer = SegmentMemory(batch_size=batch, memory_length=length)
    layer.build((batch, count, width))
    assert tuple(layer.memory.shape) == (batch, length + count, width)
    state = [v.value for v in layer.non_trainable_variables]

    def step(state, block):
        rows, state = layer.stateless_call([], state, block, rows=length)
        return rows, state

    text = jax.jit(step, donate_argnums=0).lower(
        state, jax.numpy.ones((batch, count, width))
    ).compile().as_text()
    entry = text[text.index("\nENTRY"):]
    shape = f"f32[{batch},{length + count},{width}]"
    sized = [line.split("=", 1)[1].strip() for line in entry.splitlines()
             if line.strip().startswith("%") and f"= {shape}" in line]
    assert len(sized) == 2, sized
    assert sized[0].startswith(f"{shape}{{2,1,0}} parameter(0)"), sized
    assert "scatter" in sized[1] and "fusion(%state_0" in sized[1], sized


def test_segment_memory_ring_compiles_to_an_in_place_write_on_torch(monkeypatch):
    """On PyTorch with `KERAS_ALLATTN_TORCH_RING=1`, a training call traced
    as the compiled training step traces it (`make_fx`, the variables as
    graph inputs) and compiled by inductor writes the block's rows into
    the buffer in place: the generated code allocates nothing buffer-sized
    (an indexed write into a buffer whose rows a matmul also reads made
    inductor copy the whole of it)."""
    if keras.backend.backend() != "torch":
        pytest.skip("the PyTorch ring operator")
    import torch
    from torch._inductor.utils import run_and_get_code
    from torch.fx.experimental.proxy_tensor import make_fx

    from keras_allattn.layers.segment_memory import TORCH_RING_ENV

    monkeypatch.setenv(TORCH_RING_ENV, "1")
    batch, length, count, width = 2, 64, 4, 32
    layer = SegmentMemory(batch_size=batch, memory_length=length)
    layer.build((batch, count, width))
    assert layer.ring and tuple(layer.memory.shape) == (batch, length + count, width)
    # Built: the switch no longer matters to this layer.
    monkeypatch.setenv(TORCH_RING_ENV, "0")
    assert layer.ring

    def step(buffer, start, block, weight):
        mapping = [(layer.memory, buffer), (layer.start, start)]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            rows = layer(block, rows=length)
            new = [scope.get_current_value(v) for v in (layer.memory, layer.start)]
        # The new values go into the inputs, as the training step does.
        for old, value in zip((buffer, start), new):
            if value is not old:
                old.copy_(value)
        # A matmul reads the rows (the keys' projection does).
        return torch.matmul(rows, weight)

    rng = np.random.default_rng(0)
    values = rng.normal(size=(batch, length + count, width)).astype("float32")
    buffer, start = torch.tensor(values), torch.tensor(5, dtype=torch.int32)
    block = torch.tensor(rng.normal(size=(batch, count, width)).astype("float32"))
    with torch.enable_grad():
        traced = make_fx(step, tracing_mode="fake")(
            buffer.clone(), start.clone(), block, torch.eye(width)
        )
    compiled = torch.compile(traced, backend="inductor", dynamic=False, fullgraph=True)
    rows, (code, *_) = run_and_get_code(
        compiled, buffer, start, block, torch.eye(width)
    )
    allocated = [line for line in code.splitlines()
                 if f"({batch}, {length + count}, {width})" in line
                 and "empty_strided" in line]
    assert not allocated, allocated
    # Oldest row at 5: the rows before the block end at row 4; the block
    # went to rows 5 to 8.
    positions = (5 - length + np.arange(length)) % (length + count)
    np.testing.assert_array_equal(rows.numpy(), values[:, positions])
    expected = values.copy()
    expected[:, 5:9] = block.numpy()
    np.testing.assert_array_equal(buffer.numpy(), expected)
    assert int(start) == 9


def test_torch_ring_switch_rejects_a_bad_value(monkeypatch):
    from keras_allattn.layers.segment_memory import ring_storage
    from keras_allattn.layers.segment_memory import TORCH_RING_ENV

    monkeypatch.setenv(TORCH_RING_ENV, "maybe")
    with pytest.raises(ValueError, match="KERAS_ALLATTN_TORCH_RING='maybe'"):
        ring_storage("torch")
    assert ring_storage("jax") and not ring_storage("tensorflow")
    monkeypatch.setenv(TORCH_RING_ENV, " Off ")
    assert not ring_storage("torch")
    monkeypatch.delenv(TORCH_RING_ENV)
    assert ring_storage("torch")
