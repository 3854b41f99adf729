"""Tests of the fused Pallas all-attention kernels (JAX backend).

The kernels run through the Pallas interpreter (`interpret=True`) on the CPU,
on small shapes with tiles of 16/32 and A, M not multiples of the tiles.
Forward outputs and the gradients of every input are compared with an
independent float64 JAX implementation of SPEC §1 (keys gathered per
distance, log-space span mask, autodiff) and with `portable_all_attention`.
A last test checks that the kernels lower to Triton IR for the CUDA
platform (no GPU needed; the PTX compilation itself is not exercised here).
"""

import functools
import math
import os

import numpy as np
import pytest

if os.environ.get("KERAS_BACKEND") != "jax":
    pytest.skip(
        "the Pallas kernels are for the JAX backend: run with KERAS_BACKEND=jax",
        allow_module_level=True,
    )

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402

if keras.backend.backend() != "jax":  # pragma: no cover
    pytest.skip("Keras is not on the jax backend", allow_module_level=True)

from keras_allattn.ops.attention import portable_all_attention  # noqa: E402
from keras_allattn.ops.pallas_attention import pallas_all_attention  # noqa: E402

TOL = 1e-4
MAX_SPAN = 120
RAMP = 8
# Head 0: m > 0 up to r = 34 (ramp 27..34), so most key tiles are skipped;
# head 1: up to r = 75 (ramp 68..75); head 2: every distance of A = 100.
SPAN_RATIOS = (0.2137, 0.5521, 0.97)
NAMES = ("query", "key", "value", "position_keys", "persistent_keys",
         "persistent_values", "span_ratio")

# name: (B, M, A, H, D, N, span, integration, kernel options)
CONFIGS = {
    # Everything on, 16x16 tiles (backward: dK/dV 32x16, dQ 32x16 with 3
    # stages, bands over 3 P blocks), several query tiles per program.
    "joint_span_persistent": (
        2, 37, 100, 3, 16, 20, True, "joint",
        dict(block_q=16, block_k=16, num_programs=12,
             backward_blocks=((32, 16), (32, 16, 4, 3))),
    ),
    # Separate softmaxes; block_q > block_k (bands over 3 P blocks); one
    # program per (head, batch row) looping over all tiles; no pipelining.
    "separate_span_persistent": (
        2, 37, 100, 3, 16, 20, True, "separate",
        dict(block_q=32, block_k=16, num_programs=1, num_stages=1),
    ),
    # A + M even: the context tiles' dropout columns pair up (one hash for
    # two keys); the other configurations hash one key at a time.
    "even_keys_span_persistent": (
        2, 36, 100, 3, 16, 20, True, "joint",
        dict(block_q=16, block_k=16, num_programs=12,
             backward_blocks=((32, 16), (32, 16, 4, 3))),
    ),
    # Context only, no span; block_k > block_q; head width 32.
    "context_only": (
        2, 45, 70, 2, 32, 0, False, "joint",
        dict(block_q=16, block_k=32, num_stages=3),
    ),
}


def reference_all_attention(q, k, v, pos, mk, mv, z, integration):
    """SPEC §1, gathering the keys of each distance; float64."""
    _, m, _, d = q.shape
    a = pos.shape[1]
    i = jnp.arange(m)[:, None]
    r = jnp.arange(1, a + 1)[None, :]
    j = a + i - r  # (M, A): key row at distance r
    kg, vg = k[:, j], v[:, j]  # (B, M, A, H, D)
    p_r = pos[:, a - jnp.arange(1, a + 1)]  # (D, A): key of distance r
    s = jnp.einsum("bihd,biahd->bhia", q, kg)
    s = (s + jnp.einsum("bihd,da->bhia", q, p_r)) / math.sqrt(d)
    if z is not None:
        m_r = jnp.clip((RAMP + z[:, None] * MAX_SPAN - r + 1.0) / RAMP, 0, 1)
        safe = jnp.where(m_r > 0, m_r, 1.0)
        s = s + jnp.where(m_r > 0, jnp.log(safe), -jnp.inf)[None, :, None, :]
    if mk is None:
        return jnp.einsum("bhia,biahd->bihd", jax.nn.softmax(s, -1), vg)
    u = jnp.einsum("bihd,hnd->bhin", q, mk) / math.sqrt(d)
    if integration == "joint":
        w = jax.nn.softmax(jnp.concatenate([s, u], -1), -1)
        w_c, w_p = w[..., :a], w[..., a:]
    else:
        w_c, w_p = jax.nn.softmax(s, -1), jax.nn.softmax(u, -1)
    out = jnp.einsum("bhia,biahd->bihd", w_c, vg)
    return out + jnp.einsum("bhin,hnd->bihd", w_p, mv)


def rel_err(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def make_inputs(name, batch=None):
    b, m, a, h, d, n, span, _, _ = CONFIGS[name]
    b = batch or b
    rng = np.random.default_rng(sum(map(ord, name)))
    inputs = [
        rng.normal(size=(b, m, h, d)),
        rng.normal(size=(b, a + m, h, d)),
        rng.normal(size=(b, a + m, h, d)),
        rng.normal(size=(d, a)),
        rng.normal(size=(h, n, d)) if n else None,
        rng.normal(size=(h, n, d)) if n else None,
        np.asarray(SPAN_RATIOS[:h]) if span else None,
    ]
    cotangent = rng.normal(size=(b, m, h, d))
    return inputs, cotangent


def _vjp(fn, inputs, cotangent, dtype):
    present = [i for i, x in enumerate(inputs) if x is not None]
    arrays = [None if x is None else jnp.asarray(x, dtype) for x in inputs]

    def call(*xs):
        full = list(arrays)
        for i, x in zip(present, xs):
            full[i] = x
        return fn(*full)

    @jax.jit
    def run(xs, ct):
        out, pullback = jax.vjp(call, *xs)
        return out, pullback(ct)

    out, grads = run([arrays[i] for i in present], jnp.asarray(cotangent, dtype))
    return np.asarray(out), {NAMES[i]: np.asarray(g) for i, g in zip(present, grads)}


def _kernel(name):
    """The interpreted kernel with the options of configuration `name`."""
    _, _, _, _, _, _, span, integration, options = CONFIGS[name]
    span_args = dict(max_span=MAX_SPAN if span else None, span_ramp=RAMP)

    def kernel(q, k, v, pos, mk, mv, z):
        return pallas_all_attention(
            q, k, v, pos, mk, mv, z, integration=integration,
            interpret=True, **span_args, **options,
        )

    return kernel


@functools.lru_cache(maxsize=None)
def results(name):
    """(kernel, float64 reference, portable) outputs and gradients."""
    _, _, _, _, _, _, span, integration, _ = CONFIGS[name]
    inputs, cotangent = make_inputs(name)
    span_args = dict(max_span=MAX_SPAN if span else None, span_ramp=RAMP)
    kernel = _kernel(name)

    def portable(q, k, v, pos, mk, mv, z):
        return portable_all_attention(
            q, k, v, pos, mk, mv, z, integration=integration, **span_args
        )

    with jax.enable_x64(True):
        reference = _vjp(
            lambda *x: reference_all_attention(*x, integration),
            inputs, cotangent, jnp.float64,
        )
    return (
        _vjp(kernel, inputs, cotangent, jnp.float32),
        reference,
        _vjp(portable, inputs, cotangent, jnp.float32),
    )


def _compare(got, want):
    out, grads = got
    out_ref, grads_ref = want
    errors = {"output": rel_err(out, out_ref)}
    assert set(grads) == set(grads_ref)
    for key in grads:
        assert grads[key].shape == grads_ref[key].shape, key
        errors[key] = rel_err(grads[key], grads_ref[key])
    bad = {k: e for k, e in errors.items() if not e < TOL}
    assert not bad, f"relative errors above {TOL}: {bad} (all: {errors})"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_float64_reference(name):
    kernel, reference, _ = results(name)
    assert kernel[0].dtype == np.float32
    _compare(kernel, reference)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_portable_path(name):
    kernel, _, portable = results(name)
    _compare(kernel, portable)


def test_span_masks_some_distances():
    # The span configuration covers masked distances, the ramp and m = 1.
    a = CONFIGS["joint_span_persistent"][2]
    r = np.arange(1, a + 1)
    m = np.clip((RAMP + np.asarray(SPAN_RATIOS)[:, None] * MAX_SPAN - r + 1) / RAMP, 0, 1)
    assert (m == 0).any() and ((m > 0) & (m < 1)).any() and (m == 1).any()
    assert (m[2] > 0).all()


def test_rejects_bad_arguments():
    q = jnp.ones((1, 4, 1, 16))
    k = jnp.ones((1, 9, 1, 16))
    pos = jnp.ones((16, 5))
    with pytest.raises(ValueError):
        pallas_all_attention(q, k, k, pos, integration="other")
    with pytest.raises(ValueError):
        pallas_all_attention(q, k, k, pos, span_ratio=jnp.ones((1,)))
    with pytest.raises(ValueError):
        pallas_all_attention(q, k[:, :8], k[:, :8], pos)
    with pytest.raises(ValueError):
        pallas_all_attention(q, k, k, pos, block_q=24)
    with pytest.raises(ValueError):
        pallas_all_attention(q, k, k, pos, backward_blocks=((16, 16),))


@pytest.mark.parametrize("integration", ["joint", "separate"])
def test_span_gradient_at_the_clip_ends_matches_portable(integration):
    """At z = 0 (the recipes' start) both clip ends fall on whole distances;
    the reference (torch.clamp) passes the gradient there, and so must the
    kernel, like the portable path."""
    rng = np.random.default_rng(7)
    b, m, a, h, d, n = 2, 21, 40, 2, 16, 8
    q = jnp.asarray(rng.normal(size=(b, m, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, a + m, h, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, a + m, h, d)), jnp.float32)
    pos = jnp.asarray(rng.normal(size=(d, a)), jnp.float32)
    mk = jnp.asarray(rng.normal(size=(h, n, d)), jnp.float32)
    mv = jnp.asarray(rng.normal(size=(h, n, d)), jnp.float32)
    z = jnp.asarray([0.0, 0.25], jnp.float32)  # z * L = 0 and 10: integers
    w = jnp.asarray(rng.normal(size=(b, m, h, d)), jnp.float32)

    def loss(fn, z):
        out = fn(q, k, v, pos, mk, mv, span_ratio=z, max_span=a, span_ramp=4,
                 integration=integration)
        return jnp.sum(out * w)

    kernel = functools.partial(pallas_all_attention, interpret=True,
                               block_q=16, block_k=16, num_programs=4)
    got = jax.grad(lambda z: loss(kernel, z))(z)
    want = jax.grad(lambda z: loss(portable_all_attention, z))(z)
    assert rel_err(np.asarray(got), np.asarray(want)) < TOL


def test_deterministic_mode(monkeypatch):
    """The kernels use no atomics: deterministic mode needs nothing of its
    own (same static config, hence the same kernels, no extra memory); a
    bad mode value is refused."""
    from keras_allattn.ops import kernel_settings as attention
    from keras_allattn.ops import pallas_attention

    name = "joint_span_persistent"
    _, _, _, _, _, _, _, integration, options = CONFIGS[name]
    inputs, _ = make_inputs(name)
    arrays = [None if x is None else jnp.asarray(x, jnp.float32) for x in inputs]
    monkeypatch.setattr(attention, "_deterministic", None)
    attention.set_deterministic(True)

    def config(deterministic):
        kwargs = dict(block_q=64, block_k=64, block_n=None, num_warps=4,
                      num_stages=2, precision=None, num_programs=1024,
                      backward_blocks=None)
        kwargs.update(options)
        cfg, _ = pallas_attention._prepare(
            *arrays, max_span=MAX_SPAN, span_ramp=RAMP,
            integration=integration, interpret=True,
            deterministic=deterministic, **kwargs,
        )
        return cfg

    # One static config whatever the mode: the same traced kernels, so the
    # same gradients bit for bit (the kernels have no atomics).
    assert config(None) == config(False) == config(True)
    with pytest.raises(ValueError, match="deterministic"):
        config("yes")


@pytest.mark.parametrize("name", ["joint_span_persistent", "separate_span_persistent"])
def test_batch_chunks_match_portable_path(monkeypatch, name):
    """Where the position scores of the batch exceed the cap, the passes run
    over batch chunks (here three of one row each, with dropout): the same
    function and gradients, the chunks' partial sums (position keys,
    persistent vectors, span ratios) added up, both integrations (the
    separate one's forward has five outputs)."""
    from keras_allattn.ops import pallas_attention
    from keras_allattn.ops.random import attention_dropout_keys

    _, m, a, h, _, _, _, integration, options = CONFIGS[name]
    b = 3
    monkeypatch.setenv("KERAS_ALLATTN_POSITION_BYTES", str(h * m * a * 4))
    inputs, cotangent = make_inputs(name, batch=b)
    seed = jnp.asarray([7, 8], jnp.uint32)
    keys = attention_dropout_keys(seed, b, h, m)
    span_args = dict(max_span=MAX_SPAN, span_ramp=RAMP, integration=integration)

    def kernel(q, k, v, pos, mk, mv, z):
        cfg, _ = pallas_attention._prepare(
            q, k, v, pos, mk, mv, z, MAX_SPAN, RAMP, integration, True,
            options["block_q"], options["block_k"], None, 4,
            options.get("num_stages", 2), None,
            options.get("num_programs", pallas_attention._DEFAULT_PROGRAMS),
            options.get("backward_blocks"),
        )
        assert pallas_attention._batch_chunks(cfg, 4) == b
        return pallas_all_attention(
            q, k, v, pos, mk, mv, z, interpret=True, dropout_rate=0.2,
            dropout_keys=keys, **span_args, **options,
        )

    def portable(q, k, v, pos, mk, mv, z):
        return portable_all_attention(
            q, k, v, pos, mk, mv, z, dropout_rate=0.2, dropout_seed=seed,
            **span_args,
        )

    got = _vjp(kernel, inputs, cotangent, jnp.float32)
    want = _vjp(portable, inputs, cotangent, jnp.float32)
    _compare(got, want)


def test_batch_chunks_fill_no_key_sized_buffer(monkeypatch):
    """The chunked passes create no key-sized buffer filled with a constant
    (as `lax.map`'s stacked outputs were): XLA moved those fills of every
    layer to the start of the backward, so every layer's dK and dV buffers
    were alive at once (on an H200, enwik8_large: 1.1 GiB a layer). dK and
    dV take the buffers of k and v; the merged outputs start from the
    first chunk's results."""
    import re

    from keras_allattn.ops import pallas_attention

    name = "joint_span_persistent"
    _, m, a, h, d, _, _, integration, options = CONFIGS[name]
    b = 3
    monkeypatch.setenv("KERAS_ALLATTN_POSITION_BYTES", str(h * m * a * 4))
    inputs, _ = make_inputs(name, batch=b)
    q, k, v, pos, mk, mv, z = (jnp.asarray(x, jnp.float32) for x in inputs)

    def loss(q, k, v):
        out = pallas_all_attention(
            q, k, v, pos, mk, mv, z, interpret=True, max_span=MAX_SPAN,
            span_ramp=RAMP, integration=integration, **options,
        )
        return jnp.sum(out**2)

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
    fills = re.findall(
        r"broadcast_in_dim %\S+, dims = \[\] : \(tensor<\w+>\) -> tensor<([\dx]+)x\w+>",
        text,
    )
    assert fills, "no constant fills found at all: the pattern is stale"
    key_size = b * (a + m) * h * d
    large = [f for f in fills if math.prod(map(int, f.split("x"))) >= key_size]
    assert not large, f"constant-filled buffers of the keys' size: {large}"


# (The joint configuration with dropout runs in
# test_batch_chunks_match_portable_path.)
@pytest.mark.parametrize(
    "name", ["context_only", "separate_span_persistent", "even_keys_span_persistent"]
)
def test_dropout_matches_portable_path_exactly(name):
    """With attention dropout the kernels draw the portable path's mask
    (same seed, same counter-based function): outputs and every gradient
    agree, so the backward kernels regenerate the forward's mask."""
    from keras_allattn.ops.random import attention_dropout_keys

    b, m, _, h, _, _, span, integration, options = CONFIGS[name]
    inputs, cotangent = make_inputs(name)
    span_args = dict(max_span=MAX_SPAN if span else None, span_ramp=RAMP)
    seed = jnp.asarray([123456789, 42], jnp.uint32)
    rate = 0.3

    def kernel(q, k, v, pos, mk, mv, z):
        return pallas_all_attention(
            q, k, v, pos, mk, mv, z, integration=integration, interpret=True,
            dropout_rate=rate,
            dropout_keys=attention_dropout_keys(seed, b, h, m),
            **span_args, **options,
        )

    def portable(q, k, v, pos, mk, mv, z, rate=rate):
        return portable_all_attention(
            q, k, v, pos, mk, mv, z, integration=integration,
            dropout_rate=rate, dropout_seed=seed, **span_args,
        )

    got = _vjp(kernel, inputs, cotangent, jnp.float32)
    want = _vjp(portable, inputs, cotangent, jnp.float32)
    _compare(got, want)
    # Dropout changed the function (and every gradient but the span's).
    plain = _vjp(functools.partial(portable, rate=0.0), inputs, cotangent,
                 jnp.float32)
    assert rel_err(want[0], plain[0]) > 0.05
    for key in ("query", "key", "value"):
        assert rel_err(want[1][key], plain[1][key]) > 0.05, key


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lowers_to_triton_for_cuda(dropout):
    """Forward and backward lower to Triton IR for the CUDA platform, with
    the dropout hashing (uint32 products, logical shifts) too."""
    from keras_allattn.ops.random import attention_dropout_keys

    b, m, a, h, d, n = 2, 40, 72, 2, 16, 24
    sds = jax.ShapeDtypeStruct
    shapes = [
        sds((b, m, h, d), jnp.bfloat16),
        sds((b, a + m, h, d), jnp.bfloat16),
        sds((b, a + m, h, d), jnp.bfloat16),
        sds((d, a), jnp.float32),
        sds((h, n, d), jnp.float32),
        sds((h, n, d), jnp.float32),
        sds((h,), jnp.float32),
        sds((2,), jnp.uint32),
    ]

    def loss(*args):
        *arrays, seed = args
        keys = attention_dropout_keys(seed, b, h, m) if dropout else None
        out = pallas_all_attention(
            *arrays, max_span=96, span_ramp=RAMP, block_q=32, block_k=16,
            dropout_rate=dropout, dropout_keys=keys,
        )
        return jnp.sum(out.astype(jnp.float32))

    fn = jax.jit(jax.grad(loss, argnums=tuple(range(7))))
    try:
        lowered = fn.trace(*shapes).lower(lowering_platforms=("cuda",))
    except Exception as error:  # pragma: no cover - depends on jaxlib build
        if "cuda" in str(error).lower() and "platform" in str(error).lower():
            pytest.skip(f"no CUDA lowering in this jaxlib: {error}")
        raise
    # Forward (saved for the VJP), dK/dV, dQ and persistent kernels.
    assert lowered.as_text().count("__gpu$xla.gpu.triton") >= 4
