"""Tests of the fused Triton all-attention kernel (PyTorch backend).

Run on CPU through Triton's interpreter (`TRITON_INTERPRET=1`, set here
before the kernels are built), on small shapes with tiles of 16, against an
independent float64 torch implementation of SPEC §1 in log-space form and
against `portable_all_attention`; with attention dropout, against both with
the mask of the NumPy transcription in tests/reference.py. With
`TRITON_INTERPRET=0` on a CUDA machine the compiled kernels are tested on
the GPU instead.
"""

import math
import os

import pytest

if os.environ.get("KERAS_BACKEND") != "torch":
    pytest.skip(
        "the Triton kernel is for the PyTorch backend: run with KERAS_BACKEND=torch",
        allow_module_level=True,
    )

# Triton's CPU interpreter, unless the caller asks for compiled kernels with
# TRITON_INTERPRET=0 (on a CUDA machine). It must be set before the kernels
# are built on first use (the module's kernels avoid triton's standard-library
# jit functions, so triton itself may have been imported earlier, e.g. by
# Keras's torch backend).
os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ["TRITON_INTERPRET"] not in ("0", "")

torch = pytest.importorskip("torch")
try:
    import triton  # noqa: F401
except Exception as error:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton cannot be imported: {error}", allow_module_level=True)

import keras  # noqa: E402

if keras.backend.backend() != "torch":  # pragma: no cover
    pytest.skip("Keras is not on the torch backend", allow_module_level=True)

from keras_allattn.ops import triton_attention  # noqa: E402
from keras_allattn.ops.attention import all_attention  # noqa: E402
from keras_allattn.ops.attention import portable_all_attention  # noqa: E402
from keras_allattn.ops.random import attention_dropout_keys  # noqa: E402
from keras_allattn.ops.triton_attention import register_operators  # noqa: E402
from keras_allattn.ops.triton_attention import triton_all_attention  # noqa: E402
from keras_allattn.ops.triton_attention import triton_available  # noqa: E402
from tests import reference  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
TOL = 1e-4
MAX_SPAN = 120
RAMP = 8
# Head 0: m > 0 up to r = 34 (ramp 27..34), so most key tiles are skipped;
# head 1: up to r = 75 (ramp 68..75); head 2: every distance of A = 100.
SPAN_RATIOS = (0.2137, 0.5521, 0.97)


def reference_all_attention(
    q, k, v, pos, mk, mv, z, max_span, ramp, integration, dropout=None
):
    """SPEC §1 by gathering keys per distance, log-space span mask.

    `dropout`: None or (rate, seed), the mask of tests/reference.py applied
    to the normalised weights (query i's context column `r - 1` has id
    `M - 1 - i + r`, persistent vector `n` the id `-1 - n`).
    """
    drop_ctx = drop_pers = None
    if dropout is not None:
        rate, seed = dropout
        b, m, h, _ = q.shape
        keys = reference.dropout_keys(seed, b, h, m)[..., None]

        def factors(columns):
            f = reference.dropout_factors(keys, columns, rate)
            return torch.as_tensor(f, dtype=q.dtype, device=q.device)

        drop_ctx = factors(reference.context_column_ids(m, pos.shape[1]))
        if mk is not None:
            drop_pers = factors([-1 - n for n in range(mk.shape[1])])
    _, m, _, d = q.shape
    a = pos.shape[1]
    i = torch.arange(m, device=q.device)[:, None]
    r = torch.arange(1, a + 1, device=q.device)[None, :]
    j = a + i - r  # (M, A): key row at distance r of query i
    k_r = k[:, j]  # (B, M, A, H, D)
    v_r = v[:, j]
    p_r = pos[:, a - r[0]]  # (D, A): column for distance r
    s = torch.einsum("bmhd,bmahd->bhma", q, k_r)
    s = (s + torch.einsum("bmhd,da->bhma", q, p_r)) / math.sqrt(d)
    if z is not None:
        mask = (ramp + z[:, None] * max_span - r.to(q.dtype) + 1.0) / ramp
        mask = mask.clamp(0.0, 1.0)  # (H, A)
        log_mask = torch.where(
            mask > 0, torch.log(mask.clamp_min(1e-300)), float("-inf")
        )
        s = s + log_mask[None, :, None, :]
    if mk is None:
        weights = torch.softmax(s, -1)
        if drop_ctx is not None:
            weights = weights * drop_ctx
        return torch.einsum("bhma,bmahd->bmhd", weights, v_r)
    u = torch.einsum("bmhd,hnd->bhmn", q, mk) / math.sqrt(d)
    if integration == "joint":
        joint = torch.softmax(torch.cat([s, u], -1), -1)
        weights, weights_p = joint[..., :a], joint[..., a:]
    else:
        weights, weights_p = torch.softmax(s, -1), torch.softmax(u, -1)
    if drop_ctx is not None:
        weights, weights_p = weights * drop_ctx, weights_p * drop_pers
    out = torch.einsum("bhma,bmahd->bmhd", weights, v_r)
    return out + torch.einsum("bhmn,hnd->bmhd", weights_p, mv)


def make_inputs(b, m, h, d, a, n, seed, with_span=True):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    inputs = {
        "query": rnd(b, m, h, d),
        "key": rnd(b, a + m, h, d),
        "value": rnd(b, a + m, h, d),
        "position_keys": rnd(d, a),
        "persistent_keys": rnd(h, n, d),
        "persistent_values": rnd(h, n, d),
        "span_ratio": torch.tensor(SPAN_RATIOS[:h], dtype=torch.float64),
    }
    if not with_span:
        del inputs["span_ratio"]
    grad = rnd(b, m, h, d)
    return inputs, grad


def rel_err(x, ref):
    x = x.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    return ((x - ref).norm() / ref.norm()).item()


def run(fn, inputs, grad, dtype, **kwargs):
    """Output and gradients of `sum(fn(...) * grad)` for every input."""
    leaves = {
        name: t.detach().to(device=DEVICE, dtype=dtype).clone().requires_grad_()
        for name, t in inputs.items()
    }
    out = fn(**leaves, **kwargs)
    out.backward(grad.to(device=DEVICE, dtype=out.dtype))
    return out, {name: t.grad for name, t in leaves.items()}


def check(out, grads, ref_out, ref_grads, tol):
    errors = {"output": rel_err(out, ref_out)}
    for name, ref in ref_grads.items():
        assert grads[name] is not None, f"no gradient for {name}"
        errors[name] = rel_err(grads[name], ref)
    bad = {name: e for name, e in errors.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


def reference_run(inputs, grad, persistent, span, integration, dropout=None):
    args = dict(inputs)
    if not persistent:
        args.pop("persistent_keys")
        args.pop("persistent_values")
    if not span:
        args.pop("span_ratio", None)

    def fn(
        query, key, value, position_keys, persistent_keys=None,
        persistent_values=None, span_ratio=None,
    ):
        return reference_all_attention(
            query, key, value, position_keys, persistent_keys,
            persistent_values, span_ratio, MAX_SPAN, RAMP, integration,
            dropout,
        )

    return args, run(fn, args, grad, torch.float64)


# The two designs of the position term (module docstring of
# triton_attention): every exactness test runs on both, the default
# ("matmul") on every case, the other ("in_kernel") where the matrices below
# say (the cases that exercise most of it).
POSITIONS = ["in_kernel", "matmul"]
DEFAULT, OTHER = "matmul", "in_kernel"


@pytest.fixture(autouse=True)
def nan_filled_ds(monkeypatch):
    """The matmul design's dS buffer starts as NaN (not uninitialised
    memory, which is often zero on CPU): an entry the dQ kernel fails to
    write spoils the gradients. Returns the list of buffers made."""
    made = []

    def nan_buffer(qp):
        made.append(qp.shape)
        return torch.full_like(qp, float("nan"))

    monkeypatch.setattr(triton_attention, "_DS_BUFFER", nan_buffer)
    return made


def expect_design(position, ds_buffers, calls=1):
    """The backward ran the design asked for (the matmul design makes one
    dS buffer per backward call, the in-kernel design none)."""
    assert len(ds_buffers) == (calls if position == "matmul" else 0)


def test_triton_available():
    assert triton_available()


REFERENCE_CASES = {
    # id: (span, persistent, integration)
    f"{name}-{span_id}": (span, persistent, integration)
    for span, span_id in ((False, "no_span"), (True, "span"))
    for name, persistent, integration in (
        ("context_only", False, "joint"),
        ("joint", True, "joint"),
        ("separate", True, "separate"),
    )
}
# The other design on the case that exercises most of it (persistent
# vectors, "separate", the span); test_matches_portable covers the rest.
REFERENCE_MATRIX = [
    pytest.param(*case, position, id=f"{name}-{position}")
    for name, case in REFERENCE_CASES.items()
    for position in POSITIONS
    if position == DEFAULT or name == "separate-span"
]


@pytest.mark.parametrize("span,persistent,integration,position", REFERENCE_MATRIX)
def test_matches_float64_reference(span, persistent, integration, position,
                                   nan_filled_ds):
    # A = 100 and M = 37 are not multiples of the tile (16).
    inputs, grad = make_inputs(2, 37, 3, 16, 100, 20, seed=1)
    args, (ref_out, ref_grads) = reference_run(
        inputs, grad, persistent, span, integration
    )
    out, grads = run(
        triton_all_attention, args, grad, torch.float32,
        max_span=MAX_SPAN, span_ramp=RAMP, integration=integration,
        block_q=16, block_k=16, position=position,
    )
    assert out.shape == (2, 37, 3, 16) and out.dtype == torch.float32
    check(out, grads, ref_out, ref_grads, TOL)
    expect_design(position, nan_filled_ds)


# block_q < block_k, other tiles for each backward kernel, D = 20 (padded
# to 32), N = 37 persistent vectors (not a multiple of the tile), A <
# max_span, two position-gradient replicas.
UNEVEN_SHAPE = (1, 45, 2, 20, 70, 37)
UNEVEN_TILES = dict(
    block_q=16, block_k=32,
    backward={"dq": (16, 16), "dkdv": (16, 32), "persistent": (32, 16)},
    position_grad_replicas=2, persistent_split=1,
)


@pytest.mark.parametrize("position", POSITIONS)
def test_uneven_tiles_and_head_dim(position, nan_filled_ds):
    inputs, grad = make_inputs(*UNEVEN_SHAPE, seed=2)
    args, (ref_out, ref_grads) = reference_run(inputs, grad, True, True, "joint")
    out, grads = run(
        triton_all_attention, args, grad, torch.float32,
        max_span=MAX_SPAN, span_ramp=RAMP, integration="joint", **UNEVEN_TILES,
        position=position,
    )
    check(out, grads, ref_out, ref_grads, TOL)
    expect_design(position, nan_filled_ds)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("dkdv", [(32, 16), (64, 32)])
def test_dkdv_edge_tiles_of_half_height(position, dkdv, nan_filled_ds):
    """Under a span the dK/dV kernel runs its edge tiles (span mask, span
    gradient) at half its tiles' query rows: the loop bounds, the rows the
    zero dS tiles start from, and the position band of the in-kernel
    design at either height, against the float64 reference."""
    inputs, grad = make_inputs(2, 45, 3, 16, 70, 12, seed=8)
    args, (ref_out, ref_grads) = reference_run(inputs, grad, True, True, "joint")
    out, grads = run(
        triton_all_attention, args, grad, torch.float32,
        max_span=MAX_SPAN, span_ramp=RAMP, integration="joint",
        block_q=16, block_k=16, backward={"dkdv": dkdv}, position=position,
    )
    check(out, grads, ref_out, ref_grads, TOL)
    expect_design(position, nan_filled_ds)


@pytest.mark.parametrize("span", [False, True], ids=["no_span", "span"])
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("a", [47, 48, 49])
def test_tiles_on_the_band_edges(a, position, span, nan_filled_ds):
    """Tiles on the band's edges: with 16 x 16 tiles and A = 47, 48, 49 the
    dK/dV loop's tiles (largest distances multiples of 16 once their first
    row is past 0) end one past, on and one short of A in rows below M = 70,
    and the forward's smallest distances fall on 1; against the float64
    reference. Under a span the forward skips the band's mask in tiles
    wholly inside it (every distance in 1..A); head 0's span (26) ends
    inside the band, head 1's (66) past it."""
    inputs, grad = make_inputs(2, 70, 2, 16, a, 8, seed=a)
    args, (ref_out, ref_grads) = reference_run(inputs, grad, True, span, "joint")
    out, grads = run(
        triton_all_attention, args, grad, torch.float32,
        max_span=MAX_SPAN if span else None, span_ramp=RAMP, integration="joint",
        block_q=16, block_k=16, position=position,
    )
    check(out, grads, ref_out, ref_grads, TOL)
    expect_design(position, nan_filled_ds)


PORTABLE_CASES = {
    # id: (persistent, span, integration)
    "context_only": (False, False, "joint"),
    "span_joint": (True, True, "joint"),
    "span_separate": (True, True, "separate"),
    "span_context_only": (False, True, "joint"),
    "span_boundaries": (True, "boundaries", "joint"),
}


def portable_case_inputs(span):
    inputs, grad = make_inputs(2, 21, 3, 16, 50, 12, seed=3)
    if span == "boundaries":
        # z = 0 (the recipe's initial value) and z L = 30 make the unclipped
        # mask exactly 1 at r = 1 (r = 31) and exactly 0 at r = 9 (r = 39):
        # the reference's clip passes the gradient at both ends.
        inputs["span_ratio"] = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    elif span:
        inputs["span_ratio"] = torch.tensor([0.1137, 0.27, 0.43], dtype=torch.float64)
    # max_span 120 with A = 50: head 0 masks distances > 22 (ramp 15..22),
    # head 1 has its ramp at 33..40, head 2 keeps every distance.
    return inputs, grad


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize(
    "persistent,span,integration",
    list(PORTABLE_CASES.values()),
    ids=list(PORTABLE_CASES),
)
def test_matches_portable(persistent, span, integration, position, nan_filled_ds):
    inputs, grad = portable_case_inputs(span)
    args, _ = reference_run(inputs, grad, persistent, bool(span), integration)
    options = dict(max_span=MAX_SPAN, span_ramp=RAMP, integration=integration)
    ref_out, ref_grads = run(
        portable_all_attention, args, grad, torch.float32, **options
    )
    out, grads = run(
        triton_all_attention, args, grad, torch.float32,
        block_q=16, block_k=16, position=position, **options,
    )
    check(out, grads, ref_out, ref_grads, TOL)
    expect_design(position, nan_filled_ds)


def test_zero_scores_past_the_span_in_every_row(nan_filled_ds):
    """The matmul design's dS buffer holds zeros at the distances past a
    head's span, the first `A - r_bound` columns of every row of its skewed
    layout; the dK/dV kernel's programs write them in stripes of query
    rows. Here 300 queries, dK/dV tiles of 16 queries by 128 keys (4 key
    tiles: each program writes 4 or 5 stripes) and spans of 8 and 14 of
    A = 200 distances (the computed tiles, 143 distances wide, leave most
    of those columns to the stripes): an entry the stripes missed keeps
    the buffer's NaN."""
    inputs, grad = make_inputs(1, 300, 2, 16, 200, 8, seed=7)
    inputs["span_ratio"] = torch.tensor([0.0, 0.05], dtype=torch.float64)
    args, _ = reference_run(inputs, grad, True, True, "joint")
    options = dict(max_span=MAX_SPAN, span_ramp=RAMP, integration="joint")
    ref_out, ref_grads = run(
        portable_all_attention, args, grad, torch.float32, **options
    )
    out, grads = run(
        triton_all_attention, args, grad, torch.float32,
        block_q=16, block_k=16, backward={"dkdv": (16, 128)}, position="matmul",
        **options,
    )
    check(out, grads, ref_out, ref_grads, TOL)
    expect_design("matmul", nan_filled_ds)


DROPOUT_RATE = 0.3
DROPOUT_SEED = (123456789, 42)


def dropout_seed():
    return torch.tensor(DROPOUT_SEED, dtype=torch.int32, device=DEVICE)


DROPOUT_CASES = [
    pytest.param(case, position, id=f"{case}-{position}")
    for case in [*PORTABLE_CASES, "uneven_tiles"]
    for position in POSITIONS
    # The other design where it differs most: persistent vectors, both
    # integrations, the span's boundaries, uneven tiles.
    if position == DEFAULT or case not in ("context_only", "span_context_only")
]


def check_dropout_against_portable(args, grad, options, tiles, position, nan_filled_ds):
    """The kernels at `tiles` with dropout (keys from a fresh seed) against
    the portable path drawing the same mask, both with attention `options`.
    Returns the portable path's and the kernels' (output, gradients)."""
    b, m, h, _ = args["query"].shape
    seed = dropout_seed()
    keys = attention_dropout_keys(seed, b, h, m).to(DEVICE)
    want = run(
        portable_all_attention, args, grad, torch.float32,
        dropout_rate=DROPOUT_RATE, dropout_seed=seed, **options,
    )
    got = run(
        triton_all_attention, args, grad, torch.float32,
        dropout_rate=DROPOUT_RATE, dropout_keys=keys, position=position,
        **tiles, **options,
    )
    check(*got, *want, TOL)
    expect_design(position, nan_filled_ds)
    return want, got


@pytest.mark.parametrize("case,position", DROPOUT_CASES)
def test_dropout_matches_portable_path_and_reference(case, position, nan_filled_ds):
    """With attention dropout the kernels draw the portable path's mask
    (same seed, same counter-based function): outputs and every gradient
    agree with it and with the float64 reference under the NumPy mask, so
    each backward kernel regenerates the forward's mask."""
    if case == "uneven_tiles":
        inputs, grad = make_inputs(*UNEVEN_SHAPE, seed=2)
        persistent, span, integration = True, True, "joint"
        tiles = UNEVEN_TILES
    else:
        persistent, span, integration = PORTABLE_CASES[case]
        inputs, grad = portable_case_inputs(span)
        tiles = dict(block_q=16, block_k=16)
    args, (ref_out, ref_grads) = reference_run(
        inputs, grad, persistent, bool(span), integration,
        dropout=(DROPOUT_RATE, DROPOUT_SEED),
    )
    options = dict(max_span=MAX_SPAN, span_ramp=RAMP, integration=integration)
    want, (out, grads) = check_dropout_against_portable(
        args, grad, options, tiles, position, nan_filled_ds
    )
    if span == "boundaries":
        # The log-space reference has no gradient at m = 0 and the one-sided
        # one at m = 1 (the module docstring of triton_attention says why):
        # the portable path above is the reference for d span_ratio there.
        ref_grads.pop("span_ratio")
    check(out, grads, ref_out, ref_grads, TOL)
    # Dropout changed the function and every gradient.
    plain_out, plain_grads = run(
        portable_all_attention, args, grad, torch.float32, **options
    )
    assert rel_err(want[0], plain_out) > 0.05
    for name, value in want[1].items():
        assert rel_err(value, plain_grads[name]) > 0.05, name


def check_dropout_tiles(span, seed, **tiles):
    """The kernels at `tiles` against the portable path, dropout included,
    at shapes several 64-row tiles wide (M = A = 100, three heads)."""
    b, m, h, a = 1, 100, 3, 100
    inputs, grad = make_inputs(b, m, h, 16, a, 12, seed=seed, with_span=span)
    seed = dropout_seed()
    keys = attention_dropout_keys(seed, b, h, m).to(DEVICE)
    options = dict(span_ramp=RAMP, integration="joint")
    if span:
        options["max_span"] = MAX_SPAN
    want = run(
        portable_all_attention, inputs, grad, torch.float32,
        dropout_rate=DROPOUT_RATE, dropout_seed=seed, **options,
    )
    got = run(
        triton_all_attention, inputs, grad, torch.float32,
        dropout_rate=DROPOUT_RATE, dropout_keys=keys, **tiles, **options,
    )
    check(*got, *want, TOL)


@pytest.mark.parametrize("span", [False, True], ids=["no_span", "span"])
def test_default_tiles_match_portable(span):
    """Without tile arguments each kernel runs its entry of `DEFAULT_TILES`
    (64-row forward tiles, 32-row dQ tiles under a span, 3 stages where
    measured faster): the kernels agree with the portable path."""
    check_dropout_tiles(span, seed=11)


@pytest.mark.parametrize("span", [False, True], ids=["no_span", "span"])
def test_query_tiles_taller_than_key_tiles_in_the_matmul_design(span):
    """The matmul position design reads the band from the position scores,
    so its forward and dQ kernels take query tiles taller than their key
    tiles (the in-kernel design's skew cannot): they match the portable
    path."""
    check_dropout_tiles(
        span, seed=13, position="matmul", block_q=64, block_k=16,
        backward={"dq": (32, 16), "dkdv": (16, 32)},
    )


def test_tiles_fill_in_per_kernel(monkeypatch):
    """Tiles reach the operator as `DEFAULT_TILES` says: every kernel its
    own entry (with or without a span) when no tile is named; a named
    forward tile fills in from the table's forward entry and becomes the
    backward kernels' default; a `backward` entry fills in from the
    kernel's default."""
    calls = []

    def operator(*args):
        calls.append([tuple(t) for t in args[12:16]])
        return args[0], None, None

    monkeypatch.setattr(triton_attention, "_build", lambda: operator)
    inputs, _ = make_inputs(1, 8, 3, 16, 8, 4, seed=5)
    t = {k: v.float() for k, v in inputs.items()}
    names = ("forward", "dq", "dkdv", "persistent")
    for span, table in ((True, "span"), (False, "fixed")):
        extra = dict(span_ratio=t["span_ratio"], max_span=MAX_SPAN) if span else {}

        def tiles(**options):
            triton_all_attention(t["query"], t["key"], t["value"],
                                 t["position_keys"], **extra, **options)
            return dict(zip(names, calls.pop()))

        default = triton_attention.DEFAULT_TILES[table]
        assert tiles() == {name: default[name] for name in names}
        forward = (*default["forward"][:2], 8, default["forward"][3])
        assert tiles(num_warps=8) == {name: forward for name in names}
        got = tiles(backward={"dq": (16, 16)})
        assert got["dq"] == (16, 16, *default["dq"][2:])
        assert got["dkdv"] == default["dkdv"]


def test_dispatcher_picks_the_kernel_with_dropout():
    from keras_allattn.ops import attention

    class CudaTensor:  # the dispatcher reads only the tensor's device here
        is_cuda = True

    fused, reason = attention._fused_kernel(CudaTensor(), dropout_rate=DROPOUT_RATE)
    assert fused is not None, reason


@pytest.mark.skipif(DEVICE != "cuda", reason="the dispatcher fuses CUDA tensors only")
def test_fused_dispatch_with_dropout_matches_portable():
    inputs, grad = portable_case_inputs(True)
    args, _ = reference_run(inputs, grad, True, True, "joint")
    seed = dropout_seed()
    options = dict(max_span=MAX_SPAN, span_ramp=RAMP, integration="joint",
                   dropout_rate=DROPOUT_RATE, dropout_seed=seed)
    want = run(portable_all_attention, args, grad, torch.float32, **options)
    got = run(all_attention, args, grad, torch.float32,
              implementation="fused", **options)
    check(*got, *want, TOL)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs(dtype, position):
    if dtype == "bfloat16" and INTERPRET:
        pytest.skip(
            "Triton's CPU interpreter multiplies the raw bit patterns of "
            "bfloat16 tl.dot operands (triton 3.9); float16 covers the "
            "half-precision code path there"
        )
    dtype = getattr(torch, dtype)
    inputs, grad = make_inputs(1, 37, 2, 16, 60, 16, seed=4)
    inputs = {name: t / 2 for name, t in inputs.items()}  # logits ~ N(0, 1/2)
    args, (ref_out, ref_grads) = reference_run(inputs, grad, True, True, "joint")
    out, grads = run(
        triton_all_attention, args, grad, dtype,
        max_span=MAX_SPAN, span_ramp=RAMP, integration="joint",
        block_q=16, block_k=16, position=position,
    )
    assert out.dtype == dtype
    assert grads["query"].dtype == dtype
    # Measured in the interpreter: about 5e-4 (float16).
    check(out, grads, ref_out, ref_grads, 5e-3 if dtype == torch.float16 else 3e-2)


def test_rejects_bad_arguments():
    inputs, _ = make_inputs(1, 8, 1, 16, 8, 4, seed=5)
    t = {k: v.float() for k, v in inputs.items()}
    with pytest.raises(ValueError, match="integration"):
        triton_all_attention(
            t["query"], t["key"], t["value"], t["position_keys"],
            integration="bogus",
        )
    with pytest.raises(ValueError, match="max_span"):
        triton_all_attention(
            t["query"], t["key"], t["value"], t["position_keys"],
            span_ratio=t["span_ratio"],
        )
    with pytest.raises(ValueError, match="block_q <= block_k in the in-kernel"):
        triton_all_attention(
            t["query"], t["key"], t["value"], t["position_keys"],
            block_q=32, block_k=16, position="in_kernel",
        )
    with pytest.raises(ValueError, match=r"`dropout_rate` must be in \[0, 1\). Received: dropout_rate=1.0"):
        triton_all_attention(
            t["query"], t["key"], t["value"], t["position_keys"], dropout_rate=1.0,
        )
    with pytest.raises(ValueError, match="Received: dropout_keys=None"):
        triton_all_attention(
            t["query"], t["key"], t["value"], t["position_keys"], dropout_rate=0.3,
        )
    with pytest.raises(ValueError, match=r"shape \(1, 1, 7\), dtype torch.int32"):
        triton_all_attention(
            t["query"], t["key"], t["value"], t["position_keys"], dropout_rate=0.3,
            dropout_keys=torch.zeros((1, 1, 7), dtype=torch.int32),
        )
    with pytest.raises(
        ValueError,
        match=r"`position` must be one of \('in_kernel', 'matmul'\). "
        r"Received: position='xla'",
    ):
        triton_all_attention(
            t["query"], t["key"], t["value"], t["position_keys"], position="xla",
        )
    with pytest.raises(ValueError, match="dtype torch.int64"):
        triton_all_attention(
            t["query"], t["key"], t["value"], t["position_keys"], dropout_rate=0.3,
            dropout_keys=torch.zeros((1, 1, 8), dtype=torch.int64),
        )



@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_dropout_key_pairs(position, deterministic, monkeypatch, nan_filled_ds):
    """With A + M even the kernels hash once for two adjacent keys (and two
    adjacent persistent vectors): the portable path's mask, in the forward,
    dK/dV, the persistent kernel and (deterministic mode, or the in-kernel
    design) the dQ kernel, whose key loops then start at an even key. The
    spans put the loops' first keys at odd and even rows."""
    from keras_allattn.ops import kernel_settings

    monkeypatch.setattr(kernel_settings, "_deterministic", None)
    kernel_settings.set_deterministic(deterministic)
    b, m, h, a = 2, 22, 3, 50  # A + M = 72
    inputs, grad = make_inputs(b, m, h, 16, a, 12, seed=4)
    inputs["span_ratio"] = torch.tensor([0.1137, 0.27, 0.43], dtype=torch.float64)
    args, _ = reference_run(inputs, grad, True, True, "joint")
    check_dropout_against_portable(
        args, grad, dict(max_span=MAX_SPAN, span_ramp=RAMP, integration="joint"),
        dict(block_q=16, block_k=16), position, nan_filled_ds,
    )


def test_deterministic_mode(monkeypatch):
    """The in-kernel design's deterministic mode: one position-gradient
    buffer per dQ program, the same function (as the other tests check the
    default mode), bitwise repeatable."""
    from keras_allattn.ops import kernel_settings as attention

    # M = 37 in 16-query tiles: 3 programs per (batch row, head), each with
    # its own buffer; the switch reaches the kernel without an argument.
    b, m, h, a = 2, 37, 2, 50
    inputs, grad = make_inputs(b, m, h, 16, a, 8, seed=6)
    options = dict(max_span=MAX_SPAN, span_ramp=RAMP, integration="joint")
    ref_out, ref_grads = run(
        portable_all_attention, inputs, grad, torch.float32, **options
    )
    buffers = []
    zeros = torch.zeros

    def recording_zeros(*shape, **kwargs):  # keeps the (copies, A, D) buffer
        tensor = zeros(*shape, **kwargs)
        if tensor.ndim == 3 and tuple(tensor.shape[1:]) == (a, 16):
            buffers.append(tensor)
        return tensor

    monkeypatch.setattr(attention, "_deterministic", None)
    attention.set_deterministic(True)
    monkeypatch.setattr(torch, "zeros", recording_zeros)
    runs = [
        run(triton_all_attention, inputs, grad, torch.float32,
            block_q=16, block_k=16, position="in_kernel", **options)
        for _ in range(2)
    ]
    # Every program filled its own copy.
    assert [len(x) for x in buffers] == [3 * b * h] * 2
    assert (buffers[0].flatten(1).abs().amax(1) > 0).all()
    (out, grads), (again_out, again_grads) = runs
    check(out, grads, ref_out, ref_grads, TOL)
    assert torch.equal(out, again_out)
    for name, value in grads.items():
        assert torch.equal(value, again_grads[name]), name
    with pytest.raises(ValueError, match="deterministic"):
        triton_all_attention(
            *(inputs[n].float() for n in ("query", "key", "value", "position_keys")),
            deterministic="yes",
        )


def test_matmul_position_design_is_reproducible_in_every_mode(
    monkeypatch, nan_filled_ds
):
    """The matmul design needs no position-gradient buffers in either mode
    and computes the portable path's function; in deterministic mode (no
    atomics: dQ in its own kernel) its gradients are bitwise the same run
    after run. The default mode adds the context share of dQ with atomics
    (`FUSED_DQ`): the same function, in another order of summation."""
    from keras_allattn.ops import kernel_settings

    b, m, h, a = 2, 37, 2, 50
    inputs, grad = make_inputs(b, m, h, 16, a, 8, seed=6)
    options = dict(max_span=MAX_SPAN, span_ramp=RAMP, integration="joint",
                   block_q=16, block_k=16, position="matmul")
    buffers = []
    zeros = torch.zeros

    def recording_zeros(*shape, **kwargs):  # the in-kernel design's (copies, A, D)
        tensor = zeros(*shape, **kwargs)
        if tensor.ndim == 3 and tuple(tensor.shape[1:]) == (a, 16):
            buffers.append(tensor)
        return tensor

    monkeypatch.setattr(kernel_settings, "_deterministic", None)
    monkeypatch.setattr(torch, "zeros", recording_zeros)
    runs = []
    for deterministic in (False, True, True):
        kernel_settings.set_deterministic(deterministic)
        runs.append(run(triton_all_attention, inputs, grad, torch.float32, **options))
    assert buffers == []
    expect_design("matmul", nan_filled_ds, calls=3)
    monkeypatch.setattr(torch, "zeros", zeros)
    options.pop("block_q"), options.pop("block_k"), options.pop("position")
    ref_out, ref_grads = run(
        portable_all_attention, inputs, grad, torch.float32, **options
    )
    for each in runs:
        check(*each, ref_out, ref_grads, TOL)
    out, grads = runs[1]
    for again_out, again_grads in runs[2:]:
        assert torch.equal(out, again_out)
        for name, value in grads.items():
            assert torch.equal(value, again_grads[name]), name


def test_matmul_position_design_in_batch_chunks(monkeypatch, nan_filled_ds):
    """Where QP of the whole batch would pass the cap (`position_bytes`), the matmul
    design runs the batch in chunks (here one row each): the same function
    and gradients, dropout mask included ("separate": every per-row input
    and output of the kernels is sliced)."""
    persistent, span, integration = PORTABLE_CASES["span_separate"]
    inputs, grad = portable_case_inputs(span)
    b, m, h, _ = inputs["query"].shape
    a = inputs["position_keys"].shape[1]
    args, _ = reference_run(inputs, grad, persistent, bool(span), integration)
    seed = dropout_seed()
    keys = attention_dropout_keys(seed, b, h, m).to(DEVICE)
    options = dict(max_span=MAX_SPAN, span_ramp=RAMP, integration=integration,
                   dropout_rate=DROPOUT_RATE)
    want = run(portable_all_attention, args, grad, torch.float32,
               dropout_seed=seed, **options)
    # float32 scores of one batch row: m * h * a * 4 bytes.
    monkeypatch.setenv("KERAS_ALLATTN_POSITION_BYTES", str(m * h * a * 4))
    got = run(triton_all_attention, args, grad, torch.float32, dropout_keys=keys,
              block_q=16, block_k=16, position="matmul", **options)
    check(*got, *want, TOL)
    assert nan_filled_ds == [(1, m, h, a)] * b  # one dS buffer per chunk


# The kernels as PyTorch custom operators: traced by make_fx and
# torch.compile (the compiled training step keeps them).

OPERATOR_CASES = {
    # id: (persistent, span, dropout, integration)
    "context_only": (False, False, False, "joint"),
    "joint_span_dropout": (True, True, True, "joint"),
    "separate_dropout": (True, False, True, "separate"),
    "separate_span": (True, True, False, "separate"),
    "span_dropout_no_persistent": (False, True, True, "joint"),
}
# B, M, H, D, A, N: one 16-query tile; 36 key rows, three 16-key tiles.
OPERATOR_SHAPE = (1, 16, 2, 16, 20, 8)


def operator_inputs(persistent, span, dropout):
    """The tensors of `triton_all_attention` (float32, requiring gradients
    where differentiable) and its dropout arguments."""
    b, m, h, d, a, n = OPERATOR_SHAPE
    inputs, grad = make_inputs(b, m, h, d, a, n, seed=7, with_span=span)
    if not persistent:
        inputs.pop("persistent_keys")
        inputs.pop("persistent_values")
    tensors = {
        name: t.to(device=DEVICE, dtype=torch.float32).requires_grad_()
        for name, t in inputs.items()
    }
    drop = {}
    if dropout:
        keys = attention_dropout_keys(dropout_seed(), b, h, m).to(DEVICE)
        drop = dict(dropout_rate=DROPOUT_RATE, dropout_keys=keys)
    return tensors, drop, grad.to(device=DEVICE, dtype=torch.float32)


def operator_args(tensors, drop, integration, deterministic=False,
                  position=DEFAULT):
    """The forward operator's arguments, as `triton_all_attention` passes
    them for tiles of 16 (the schema is the operator's public contract)."""
    tiles = [16, 16, 8, 2]
    return (
        tensors["query"], tensors["key"], tensors["value"],
        tensors["position_keys"], tensors.get("persistent_keys"),
        tensors.get("persistent_values"), tensors.get("span_ratio"),
        drop.get("dropout_keys"), integration, float(MAX_SPAN), float(RAMP),
        drop.get("dropout_rate", 0.0), tiles, tiles, tiles, tiles, None, None,
        "ieee", position, deterministic,
    )


@pytest.mark.parametrize(
    "case,position",
    [(case, DEFAULT) for case in OPERATOR_CASES]
    + [("joint_span_dropout", OTHER)],
)
def test_operators_pass_opcheck(case, position):
    """Schema, fake implementations (against the kernels' outputs),
    autograd registration and AOT dispatch of both operators, as
    `torch.library.opcheck` checks them; the backward's placeholders for
    gradients not asked for."""
    persistent, span, dropout, integration = OPERATOR_CASES[case]
    tensors, drop, grad = operator_inputs(persistent, span, dropout)
    args = operator_args(tensors, drop, integration, position=position)
    forward, backward = register_operators()
    torch.library.opcheck(forward, args)

    output, lse, parts = forward(*args)
    b, m, h, d, _, _ = OPERATOR_SHAPE
    separate = persistent and integration == "separate"
    assert lse.shape == ((2 if separate else 1), b * h, m)
    assert parts.shape == ((2, b, m, h, d) if separate else (0,))
    # The gradients of all seven inputs, then with the optional ones left out.
    saved = [t.detach() for t in (output, lse, parts)]
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    for position, persistent_grads, span_grad in ((True, True, True),
                                                  (False, False, False)):
        backward_args = (grad, *detached[:8], *saved, *detached[8:],
                         position, persistent_grads, span_grad)
        torch.library.opcheck(backward, backward_args)
        grads = backward(*backward_args)
        needed = (True, True, True, position, persistent_grads,
                  persistent_grads, span_grad)
        assert len(grads) == 7
        for tensor, gradient, needed in zip(detached[:7], grads, needed):
            if tensor is None or not needed:
                assert gradient.shape == (0,)
            else:
                assert gradient.shape == tensor.shape
                assert gradient.dtype == tensor.dtype


def _portable_targets():
    """Aten operators the portable path's graph holds and the kernels' not."""
    aten = torch.ops.aten
    return {aten._softmax.default, aten.bmm.default, aten.mm.default}


@pytest.mark.parametrize(
    "case,position",
    [("joint_span_dropout", DEFAULT), ("separate_dropout", DEFAULT),
     ("context_only", DEFAULT), ("joint_span_dropout", OTHER)],
)
def test_traced_and_compiled_step_equals_eager(case, position):
    """A function computing the attention and every gradient, traced by
    `make_fx` on fake tensors and compiled by `torch.compile`, holds the
    two operators (not the portable path's softmax and matmuls) and gives
    eager's output and gradients bitwise, dropout mask included (drawn in
    the graph from the same seed)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    persistent, span, dropout, integration = OPERATOR_CASES[case]
    tensors, drop, grad = operator_inputs(persistent, span, dropout)
    names = list(tensors)
    b, m, h, _, _, _ = OPERATOR_SHAPE
    options = dict(max_span=MAX_SPAN, span_ramp=RAMP, integration=integration,
                   block_q=16, block_k=16, position=position)

    def step(seed, cotangent, *values):
        leaves = [v.detach().requires_grad_() for v in values]
        extra = {}
        if dropout:
            keys = attention_dropout_keys(seed, b, h, m)
            extra = dict(dropout_rate=DROPOUT_RATE, dropout_keys=keys)
        out = triton_all_attention(**dict(zip(names, leaves)), **options, **extra)
        gradients = torch.autograd.grad((out * cotangent).sum(), leaves)
        return (out.detach(), *gradients)

    values = [tensors[name].detach() for name in names]
    seed = dropout_seed()
    with torch.enable_grad():
        graph = make_fx(step, tracing_mode="fake")(seed, grad, *values)
    targets = {node.target for node in graph.graph.nodes}
    assert set(register_operators()) <= targets
    assert not targets & _portable_targets()

    compiled = torch.compile(graph, backend="eager", dynamic=False, fullgraph=True)
    got = compiled(seed, grad, *values)
    with torch.enable_grad():
        want = step(seed, grad, *values)
    assert len(got) == len(want) == 1 + len(names)
    for label, x, y in zip(["output", *names], got, want):
        assert torch.equal(x, y), label
    # The dropout mask is the seed's: another seed gives another output.
    if dropout:
        other = compiled(seed + 1, grad, *values)
        assert not torch.equal(other[0], want[0])


def test_position_design_from_the_environment(monkeypatch, nan_filled_ds):
    """Without `position=`, the design is KERAS_ALLATTN_TRITON_POSITION's
    (how the dispatcher's calls, and so a whole training step, choose)."""
    inputs, grad = make_inputs(1, 20, 1, 16, 24, 8, seed=8)
    options = dict(max_span=MAX_SPAN, span_ramp=RAMP, block_q=16, block_k=16)
    monkeypatch.setenv("KERAS_ALLATTN_TRITON_POSITION", "in_kernel")
    out, grads = run(triton_all_attention, inputs, grad, torch.float32, **options)
    expect_design("in_kernel", nan_filled_ds)
    want_out, want_grads = run(triton_all_attention, inputs, grad, torch.float32,
                               position="in_kernel", **options)
    assert torch.equal(out, want_out)
    for name, value in grads.items():
        assert torch.equal(value, want_grads[name]), name
    # Unset: the default, the matmul design (one dS buffer per backward).
    monkeypatch.delenv("KERAS_ALLATTN_TRITON_POSITION")
    run(triton_all_attention, inputs, grad, torch.float32, **options)
    expect_design("matmul", nan_filled_ds, calls=1)
    monkeypatch.setenv("KERAS_ALLATTN_TRITON_POSITION", "xla")
    with pytest.raises(ValueError, match="KERAS_ALLATTN_TRITON_POSITION='xla'"):
        run(triton_all_attention, inputs, grad, torch.float32, **options)
