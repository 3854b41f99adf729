"""Fused all-attention for the PyTorch backend, written in Triton.

`triton_all_attention` computes exactly the function of
`keras_allattn.ops.attention.portable_all_attention` (SPEC §1, attention
dropout included) on torch tensors, forward and backward, without
materialising any (B, H, M, A) tensor in device memory:

* forward: one program per (query tile, batch, head); an online (flash
  attention) softmax in float32 over the context key tiles, then over the
  persistent tiles ("joint": the same running softmax; "separate": a second
  one). The adaptive-span mask enters in log space (`log m(r)` added to the
  logits), and key tiles wholly beyond a head's span are never visited: the
  span ratio `z` is read inside the kernel, so the cost follows the learned
  span.
* relative positions: for a query tile `[i0, i0+BQ)` and key tile
  `[j0, j0+BK)` the distances form a band (`c = A - r = j - i`). Two
  designs, chosen by the `position` argument (the same function):
  - "in_kernel": the kernel keeps `Q @ P[:, chunk]` for two consecutive
    chunks of `BK` position columns; the tile's position scores are read
    out of them with `tl.gather` (the skew), so walking the key tiles costs
    one `Q @ P` product of the size of `Q @ K^T` per tile.
  - "matmul" (the default: the compiled enwik8_small recipe step, one
    H200, bf16, dropout 0.3, ran 16% faster at fixed span 2048 and 11% at
    adaptive ~1024 and fixed 1024, benchmarks/RESULTS.md): outside the
    kernels one PyTorch matmul per pass computes the position scores
    `QP = Q P` (B, M, H, A) in the inputs' dtype (float32 accumulation);
    the forward and dK/dV kernels read a tile's band with one masked load
    `QP[b, i, h, j - i]` (contiguous along the keys), no position matmul or
    skew in the kernels. The backward recomputes QP rather than keeping it.
    QP and dS are transients of `B M H A` elements each (1 GiB each in
    bfloat16 at B = 64, M = 512, H = 8, A = 2048) while a layer's pass
    runs; where they would exceed `kernel_settings.position_bytes()`
    (1 GiB) each pass runs its kernels and matmuls over batch chunks, one
    after the other, so the transients do not grow with the span.
* backward: the flash-attention backward, recomputing the probabilities from
  the saved log-sum-exp. The persistent keys/values kernel (split over the
  batch, partial sums added outside) and the dK/dV kernel (one program a key
  tile) always run; the dK/dV kernel also writes the span-ratio gradient of
  its edge tiles as per-program partials, summed outside. The query gradient
  and the position-key gradient `sum_{b,h,i} dS(i, r) q_i` depend on the
  design:
  - "in_kernel": a dQ kernel (one program a query tile) computes dQ and
    accumulates the position-key gradient with float32 `tl.atomic_add` into
    a few replicated buffers (summed outside; not bitwise deterministic:
    concurrent programs add in varying order).
  - "matmul" (default mode): no dQ kernel. The dK/dV kernel, which
    recomputes every context tile anyway, adds that tile's share of dQ (`dS
    K`) into a float32 dQ with atomics and writes `dS` times the logits'
    scale (the gradient of QP) into a (B, M, H, A) buffer in QP's skewed
    layout, zeros at the distances the span skips (every entry written once:
    the buffer is not cleared); the persistent kernel adds the persistent
    vectors' share of dQ with atomics. Two PyTorch matmuls then give the
    position share of dQ, `dS P^T`, and the gradient of position_keys, `Q^T
    dS` summed over batch rows, heads and queries. One pass over the context
    tiles instead of two; not bitwise deterministic (the atomics).
* deterministic mode (`keras_allattn.ops.attention.set_deterministic`, read
  at each forward call): a dQ kernel computes dQ, one program a query tile
  (in the "matmul" design it writes dS; dK/dV adds no dQ and the persistent
  kernel no dQ share), so every output is written by one program or one
  matmul. In the "in_kernel" design every dQ program also gets a
  position-gradient buffer of its own: a program adds each distance column
  at most once (each chunk is completed once), so every element receives one
  addition onto zero, and the fixed-order sum outside makes the gradient
  bitwise reproducible. The cost is `ceil(M / block_q) * B * H` float32 (A,
  D) buffers: 2 GiB for B = 64, H = 8, M = 512, A = 2048, D = 64 and
  64-query dQ tiles (4 MiB otherwise); in the "matmul" design, the second
  pass over the context tiles (about 12% of a layer's kernels on an H200,
  RESULTS.md).
* span-ratio gradient: `dz = (L/R) sum_r exp(s(r) - lse) (dP(r) - Delta)`
  over the distances whose unclipped mask `(R + z L - r + 1) / R` lies in
  [0, 1], boundaries included. Inside the ramp this is the log-space
  derivative `dS(r) (L/R) / m(r)`; at the ends it reproduces the gradient of
  the reference's multiply-and-renormalise form under torch's clamp (which
  passes the gradient at `m = 0` and `m = 1` exactly). That matters at
  `z = 0`, the recipe's initial value, where both ends fall on integer
  distances: the pure log-space derivative differs there in sign and size.
  Only key tiles whose distances reach the ramp compute these terms, and
  tiles wholly inside it (`m = 1`) skip the mask's logarithm.
* attention dropout: the counter-based mask of `keras_allattn.ops.random`.
  Every kernel hashes the row keys of its query rows (an int32 (B, H, M)
  input computed from the call's seed) with the column ids (a context
  key's place from the last key, `A + M - 1 - j`; `-1 - n` for persistent
  vector `n`) in uint32 arithmetic, so the backward kernels regenerate the
  forward's mask and nothing of size (B, H, M, A) is stored. Two adjacent
  keys (ids 2p + 1, 2p) share one hash, its two 16-bit halves: with A + M
  even (`PAIRS`) the key loops start at even keys and a (rows, BK) tile
  needs BK / 2 hashes a row (one hash a key otherwise); persistent tiles
  always pair. The softmax normaliser (the
  saved log-sum-exp) sums the weights before dropout, the outputs use the
  dropped weights; in the backward `dV += (P f)^T dO`, `dP = f (dO V^T)`
  and `dS = P (dP - Delta)` with `Delta = rowsum(dO O)` of the dropped
  output (the span-ratio term uses the same `dP - Delta`). Without dropout
  the `HAS_DROPOUT` constexpr removes all of it from the compiled kernels.
* PyTorch operators: the kernels are launched from two custom operators,
  `torch.ops.keras_allattn.triton_all_attention` (output, log-sum-exp rows
  and, with "separate", the two float32 partial outputs) and
  `triton_all_attention_backward` (every gradient), each with a fake
  implementation (shapes only) and the forward's autograd formula calling
  the backward. `make_fx` and `torch.compile` therefore trace the kernels
  as graph nodes, forward and backward (the compiled PyTorch training step
  of `keras_allattn.compiling` keeps them); the settings (tiles,
  integration, span, dropout rate, position design, deterministic mode...)
  are arguments of the operators, fixed in a traced graph.

Triton is imported lazily: importing this module never needs triton (nor
torch); the kernels are built on first use. Set `TRITON_INTERPRET=1`
before the first call to run the kernels on CPU tensors with Triton's
interpreter.
"""

from __future__ import annotations

import math
import threading

from keras_allattn.ops import random as dropout_hash
from keras_allattn.ops.kernel_settings import INTEGRATIONS
from keras_allattn.ops.kernel_settings import position_bytes
from keras_allattn.ops.kernel_settings import resolve_deterministic
from keras_allattn.ops.kernel_settings import TRITON_POSITIONS
from keras_allattn.ops.kernel_settings import triton_position

tl = None  # triton.language, bound by `_build`
libdevice = None  # triton's libdevice, bound by `_build` when compiling
_mask_log2 = None  # `_mask_log2_fast` or `_mask_log2_exact`, bound by `_build`
_BUILD_LOCK = threading.Lock()
_BUILT = None

# Names of the functions below that `_build` wraps with `triton.jit`.
_JIT_NAMES = (
    "_max_combine",
    "_sum_combine",
    "_span_setup",
    "_span_mask",
    "_band",
    "_mask_log2_exact",
    "_mask_log2_fast",
    "_band_mask",
    "_context_logits",
    "_inside_tiles",
    "_mix32",
    "_dropout_factor",
    "_dropout_pairs",
    "_context_keep",
    "_load_row_keys",
    "_online",
    "_load_rows",
    "_load_cols",
    "_add_position_grad",
    "_load_band",
    "_store_band",
    "_fwd_kernel",
    "_bwd_dq_kernel",
    "_bwd_dkdv_kernel",
    "_bwd_persistent_kernel",
)


# Attention dropout inside the kernels (the counter-based mask of
# `keras_allattn.ops.random`).
HAS_DROPOUT = True
# The designs of the relative-position term (`position` argument of
# `triton_all_attention`; the module docstring describes both).
POSITION_DESIGNS = TRITON_POSITIONS


def triton_available():
    """Whether triton (and torch) can be imported."""
    try:
        import torch  # noqa: F401
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------------
# Triton device functions. They are plain functions here and become
# `triton.jit` functions in `_build` (annotations are strings thanks to
# `from __future__ import annotations`, so `tl` is not needed at import).
# ---------------------------------------------------------------------------


# The kernels use only builtins of `triton.language` plus their own jit
# functions (`tl.full` for `tl.zeros`, `tl.reduce` for `tl.max`/`tl.sum`):
# the standard-library jit functions are interpreter-aware only when
# `TRITON_INTERPRET=1` was set before triton was first imported, while these
# run in the interpreter whenever it is set before the first call here (Keras's
# torch backend imports triton early). `_build` swaps in triton's own combine
# functions where it has them.


def _max_combine(a, b):
    return tl.maximum(a, b)


def _sum_combine(a, b):
    return a + b


def _span_setup(Z, h, A, max_span, span_ramp, HAS_SPAN: tl.constexpr):
    """`top = R + z L` (so `m(r) = (top - r + 1) / R`) and a bound on `r`.

    Every distance `r >= r_bound + 1` has `m(r) = 0`.
    """
    if HAS_SPAN:
        z = tl.load(Z + h).to(tl.float32)
        top = span_ramp + z * max_span
        r_bound = tl.minimum(tl.floor(top).to(tl.int32) + 1, A)
    else:
        top = span_ramp * 0.0
        r_bound = A + 0 * h
    return top, r_bound


def _span_mask(i, j, A, top, span_ramp):
    """`m(r)` for the tile's distances `r = A + i - j`, float32 (BQ, BK)."""
    r = (A + i[:, None] - j[None, :]).to(tl.float32)
    mval = ((top - r) + 1.0) / span_ramp
    return tl.minimum(tl.maximum(mval, 0.0), 1.0)


def _band(qp_hi, qp_lo, cols, rows, BQ: tl.constexpr, BK: tl.constexpr, LO_W: tl.constexpr):
    """Skew: position scores of the (query, key) tile out of two chunks.

    `qp_hi[a, u]` holds `q_a . P[:, c0 + u]` (BQ, BK) and `qp_lo[a, u]` holds
    `q_a . P[:, c0 - LO_W + u]` (BQ, LO_W), with `c0 = j0 - i0`. The tile's
    entry (a, b) needs column `c0 + b - a`. Requires `LO_W >= BQ - 1`.
    `cols - rows` must be `b - a` (e.g. `j0 + b` and `j0 + a`): built from
    loop-varying values so that the index tensors are recomputed in each
    iteration instead of being hoisted and held in registers.
    """
    diff = cols[None, :] - rows[:, None]  # b - a
    hi = tl.gather(qp_hi, tl.maximum(diff, 0), 1)
    lo = tl.gather(qp_lo, tl.minimum(diff + LO_W, LO_W - 1), 1)
    return tl.where(diff >= 0, hi, lo)


def _mask_log2_exact(m):
    return tl.log2(m)


def _mask_log2_fast(m):
    return libdevice.fast_log2f(m)


def _band_mask(x, i, j, A, M):
    """`x` where the distance `A + i - j` lies in 1..A for rows below M,
    -inf elsewhere."""
    r = A + i[:, None] - j[None, :]
    return tl.where((r >= 1) & (r <= A) & (i[:, None] < M), x, float("-inf"))


def _context_logits(x, i, j, A, M, top, span_ramp, r_tile_lo, r_tile_hi,
                    HAS_SPAN: tl.constexpr, EDGE: tl.constexpr,
                    SKIP_INSIDE: tl.constexpr):
    """Masked logits in log2 units: `x` plus `log2 m(r)`, -inf off band.

    `r_tile_lo`, `r_tile_hi`: the tile's smallest and largest distance
    (`A + min i - max j`, `A + max i - min j`), scalars. With
    `SKIP_INSIDE` a tile inside the band (every distance in 1..A) skips the
    band's mask, most tiles of a long band: on sm_90 the forward's loop
    takes about 12% fewer instructions. The forward skips under a span only:
    on an H200 it took 4% off the forward under a span but added 3% without
    one (bfloat16, dropout 0.3). The backward kernels, at their register
    limit, spill where they branch, so they mask every tile. Rows
    past M need no mask: their queries and output gradients load as zeros
    and their results are not stored.

    The span's mask is 1 up to distance `z L + 1 = top + 1 - R`, so a tile
    wholly within it skips the mask (one logarithm per entry). `EDGE`: 0, the tile
    stays within `z L` (sorted by `_inside_tiles`; the dK/dV kernel's edge
    tiles apply the mask as a factor instead); 2, decide here, per tile,
    from `r_tile_hi` (a scalar, the tile's largest distance
    `A + max i - min j`; a reduction over `i` and `j` here cost a
    cross-warp exchange per tile)."""
    # The band's mask before the span's branch, so that nothing but `x` is
    # live across it (a boolean tile live across a branch is saved and
    # restored as predicate bits, about 220 instructions a tile on sm_90).
    if SKIP_INSIDE:
        if (r_tile_lo < 1) | (r_tile_hi > A):
            x = _band_mask(x, i, j, A, M)
    else:
        x = _band_mask(x, i, j, A, M)
    if HAS_SPAN:
        if EDGE == 2:
            if r_tile_hi * 1.0 > top + 1.0 - span_ramp:
                mval = _span_mask(i, j, A, top, span_ramp)
                x = tl.where(mval > 0.0, x + _mask_log2(tl.maximum(mval, 1e-30)), float("-inf"))
    return x


def _inside_tiles(lo, hi, r_first, top, span_ramp, TILE: tl.constexpr,
                  HAS_SPAN: tl.constexpr):
    """Where the inside tiles of a loop `range(lo, hi, TILE)` over query
    tiles end: the tile at `lo` reaches distances up to `r_first` and each
    next one TILE more; tiles before the returned end stay within `z L`
    (one token inside the mask's 1, a margin for float32 rounding). Without
    adaptive span, every tile is inside."""
    if HAS_SPAN:
        n = tl.math.floor(((top - span_ramp) - r_first) / TILE) + 1
        return tl.minimum(lo + tl.maximum(n.to(tl.int32), 0) * TILE, tl.maximum(hi, lo))
    return tl.maximum(hi, lo)


def _online(m_i, l_i, acc, s, v, keep, PREC: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """One step of the online softmax (log2 units); returns the new state.

    With dropout, `keep` holds the tile's factors: the normaliser sums the
    weights before dropout, the output accumulates the dropped ones.
    """
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
    if HAS_DROPOUT:
        p = p * keep
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


def _mix32(x):
    """`keras_allattn.ops.random.mix32` on uint32 values (products wrap,
    shifts are logical)."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


def _dropout_factor(rk, u, keep_threshold, drop_scale):
    """Dropout factors (0 or `drop_scale`) of the weights at row keys `rk`
    (uint32 (rows, 1)) and column ids `u` (int32, broadcastable), one hash
    a weight: the counter-based mask of `keras_allattn.ops.random`,
    float32."""
    uu = u.to(tl.uint32, bitcast=True)
    x = _mix32(rk ^ ((uu >> 1) * tl.full([], 0x85EBCA6B, tl.uint32)))
    bits = tl.where((uu & 1) == 1, x >> 16, x & 0xFFFF)
    return tl.where(bits.to(tl.int32) < keep_threshold, drop_scale, 0.0)


def _dropout_pairs(rk, u_first, BK: tl.constexpr, keep_threshold, drop_scale):
    """Dropout factors of a (rows, BK) tile whose column ids run down from
    the odd id `u_first` (column 2c has id `u_first - 2c`, column 2c + 1 the
    next lower one): the columns of a pair share the hash of `(u_first >>
    1) - c`, the first takes its high half, the second its low half. One
    hash for two weights; the halves are interleaved with `tl.join`."""
    first = tl.cast(u_first, tl.int32).to(tl.uint32, bitcast=True)
    pair = (first >> 1) - tl.arange(0, BK // 2).to(tl.uint32)
    x = _mix32(rk ^ (pair[None, :] * tl.full([], 0x85EBCA6B, tl.uint32)))
    high = tl.where((x >> 16).to(tl.int32) < keep_threshold, drop_scale, 0.0)
    low = tl.where((x & 0xFFFF).to(tl.int32) < keep_threshold, drop_scale, 0.0)
    return tl.reshape(tl.join(high, low), (rk.shape[0], BK))


def _context_keep(rk, j0, A, M, BK: tl.constexpr, keep_threshold, drop_scale,
                  PAIRS: tl.constexpr):
    """Dropout factors of a (rows, BK) context tile of keys `j0 + b`:
    column id = the key's place from the last key, `A + M - 1 - j`. With
    `PAIRS` (A + M even and j0 even: the first id is odd) adjacent keys
    share a hash."""
    if PAIRS:
        return _dropout_pairs(rk, A + M - 1 - j0, BK, keep_threshold, drop_scale)
    j = j0 + tl.arange(0, BK)
    return _dropout_factor(rk, (A + M - 1 - j)[None, :], keep_threshold, drop_scale)


def _load_row_keys(RK, bh, i, M):
    """The dropout row keys of rows `i` of (batch, head) `bh`, uint32 (rows, 1)."""
    rk = tl.load(RK + bh * M + i, mask=i < M, other=0)
    return rk.to(tl.uint32, bitcast=True)[:, None]


def _load_rows(base, rows, stride, n_rows, offs_d, D: tl.constexpr, BD: tl.constexpr):
    """A (rows, BD) tile of a row-major (n_rows, D) slab, zeros outside.

    The mask is constant along `d` unless `D` is padded, so the loads
    vectorise.
    """
    mask = (rows[:, None] < n_rows) & (rows[:, None] >= 0)
    if D != BD:
        mask = mask & (offs_d[None, :] < D)
    return tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)


def _load_cols(base, cols, stride, n_cols, offs_d, D: tl.constexpr, BD: tl.constexpr):
    """The transposed (BD, cols) tile of a row-major (n_cols, D) slab."""
    mask = (cols[None, :] >= 0) & (cols[None, :] < n_cols)
    if D != BD:
        mask = mask & (offs_d[:, None] < D)
    return tl.load(base + offs_d[:, None] + cols[None, :] * stride, mask=mask, other=0.0)


def _add_position_grad(DPOS, cols, offs_d, dpos, A, D: tl.constexpr, BD: tl.constexpr):
    """Atomically add a (BD, cols) tile into the (A, D) position gradient."""
    mask = (cols[None, :] >= 0) & (cols[None, :] < A)
    if D != BD:
        mask = mask & (offs_d[:, None] < D)
    tl.atomic_add(DPOS + cols[None, :] * D + offs_d[:, None], dpos, mask=mask, sem="relaxed")


def _load_band(QP, i, j, s_pm, A, M):
    """Position scores of the (rows `i`, keys `j`) tile from the position
    scores `QP` of one (batch row, head): `QP[i, j - i]`, float32, zeros
    off the band (the logits mask those entries). Along the keys the
    addresses are consecutive: one load, contiguous per row."""
    c = j[None, :] - i[:, None]
    mask = (c >= 0) & (c < A) & (i[:, None] < M)
    return tl.load(QP + i[:, None] * s_pm + c, mask=mask, other=0.0).to(tl.float32)


def _store_band(DS, i, j, s_pm, A, M, value):
    """Writes the (rows `i`, keys `j`) tile into the skewed layout of
    `_load_band` (`DS[i, j - i]`), inside the band only."""
    c = j[None, :] - i[:, None]
    mask = (c >= 0) & (c < A) & (i[:, None] < M)
    tl.store(DS + i[:, None] * s_pm + c, value.to(DS.dtype.element_ty), mask=mask)


def _fwd_kernel(
    Q, K, V, POS, QP, MK, MV, Z, RK, O, OC, OP, LSE_C, LSE_P,
    s_qb, s_qm, s_qh, s_kb, s_km, s_kh, s_vb, s_vm, s_vh, s_ob, s_om, s_oh,
    s_mkh, s_mkn, s_mvh, s_mvn, s_pb, s_pm, s_ph,
    H, M, A, N, max_span, span_ramp, scale_log2, keep_threshold, drop_scale,
    HAS_SPAN: tl.constexpr, HAS_PERS: tl.constexpr, SEPARATE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, POS_MATMUL: tl.constexpr,
    D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    PREC: tl.constexpr, PAIRS: tl.constexpr,
):
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    i0 = pid_q * BQ
    offs_a = tl.arange(0, BQ)
    offs_b = tl.arange(0, BK)
    offs_d = tl.arange(0, BD)
    i = i0 + offs_a
    total = A + M

    q = _load_rows(Q + b * s_qb + h * s_qh, i, s_qm, M, offs_d, D, BD)
    if HAS_DROPOUT:
        rk = _load_row_keys(RK, bh, i, M)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    top, r_bound = _span_setup(Z, h, A, max_span, span_ramp, HAS_SPAN)
    # Keys seen by some query of the tile: j >= i0 and r = A + i - j <= r_bound
    # (from an even key with PAIRS: the dropout hashes key pairs (2t, 2t+1);
    # the extra key is past the span, its weight 0).
    j_lo = tl.maximum(i0, A + i0 - r_bound)
    if PAIRS:
        j_lo -= j_lo % 2
    j_hi = tl.minimum(A + i0 + BQ - 1, total - 1)

    if POS_MATMUL:
        qp_base = QP + b.to(tl.int64) * s_pb + h * s_ph
    else:
        p_prev = _load_cols(POS, j_lo - i0 - BK + offs_b, D, A, offs_d, D, BD).to(q.dtype)
        qp_prev = tl.dot(q, p_prev, input_precision=PREC)
    m_i = tl.full([BQ], -1.0e30, tl.float32)
    l_i = tl.full([BQ], 0.0, tl.float32)
    acc = tl.full([BQ, BD], 0.0, tl.float32)
    for j0 in range(j_lo, j_hi, BK):
        j = j0 + offs_b
        kt = _load_cols(k_base, j, s_km, total, offs_d, D, BD)
        if POS_MATMUL:
            band = _load_band(qp_base, i, j, s_pm, A, M)
        else:
            p_cur = _load_cols(POS, j0 - i0 + offs_b, D, A, offs_d, D, BD).to(q.dtype)
            qp_cur = tl.dot(q, p_cur, input_precision=PREC)
            band = _band(qp_cur, qp_prev, j, j0 + offs_a, BQ, BK, BK)
            qp_prev = qp_cur
        x = tl.dot(q, kt, input_precision=PREC) + band
        s = _context_logits(x * scale_log2, i, j, A, M, top, span_ramp,
                            A + i0 - j0 - (BK - 1), A + i0 + BQ - 1 - j0, HAS_SPAN, 2, HAS_SPAN)
        v = _load_rows(v_base, j, s_vm, total, offs_d, D, BD)
        keep = s
        if HAS_DROPOUT:  # column id: the distance
            keep = _context_keep(rk, j0, A, M, BK, keep_threshold, drop_scale, PAIRS)
        m_i, l_i, acc = _online(m_i, l_i, acc, s, v, keep, PREC, HAS_DROPOUT)

    m2 = tl.full([BQ], -1.0e30, tl.float32)
    l2 = tl.full([BQ], 0.0, tl.float32)
    acc2 = tl.full([BQ, BD], 0.0, tl.float32)
    if HAS_PERS:
        for n0 in range(0, N, BK):
            n = n0 + offs_b
            mkt = _load_cols(MK + h * s_mkh, n, s_mkn, N, offs_d, D, BD).to(q.dtype)
            s = tl.dot(q, mkt, input_precision=PREC) * scale_log2
            s = tl.where(n[None, :] < N, s, float("-inf"))
            mv = _load_rows(MV + h * s_mvh, n, s_mvn, N, offs_d, D, BD).to(V.dtype.element_ty)
            keep = s
            if HAS_DROPOUT:  # column id: -1 - n
                keep = _dropout_pairs(rk, -1 - n0, BK, keep_threshold, drop_scale)
            if SEPARATE:
                m2, l2, acc2 = _online(m2, l2, acc2, s, mv, keep, PREC, HAS_DROPOUT)
            else:
                m_i, l_i, acc = _online(m_i, l_i, acc, s, mv, keep, PREC, HAS_DROPOUT)

    row_ok = i < M
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    tl.store(LSE_C + bh * M + i, m_i + tl.log2(l_safe), mask=row_ok)
    out = acc / l_safe[:, None]
    o_off = b * s_ob + h * s_oh + i[:, None] * s_om + offs_d[None, :]
    o_mask = row_ok[:, None] & (offs_d[None, :] < D)
    if HAS_PERS:
        if SEPARATE:
            l2_safe = tl.where(l2 > 0.0, l2, 1.0)
            tl.store(LSE_P + bh * M + i, m2 + tl.log2(l2_safe), mask=row_ok)
            out2 = acc2 / l2_safe[:, None]
            tl.store(OC + o_off, out, mask=o_mask)
            tl.store(OP + o_off, out2, mask=o_mask)
            out = out + out2
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=o_mask)


def _bwd_dq_kernel(
    Q, K, V, POS, QP, MK, MV, Z, RK, DO, LSE_C, LSE_P, DEL_C, DEL_P, DQ, DPOS, DS,
    s_qb, s_qm, s_qh, s_kb, s_km, s_kh, s_vb, s_vm, s_vh, s_ob, s_om, s_oh,
    s_mkh, s_mkn, s_mvh, s_mvn, s_pb, s_pm, s_ph,
    H, M, A, N, max_span, span_ramp, scale_log2, scale, REPLICAS,
    keep_threshold, drop_scale,
    HAS_SPAN: tl.constexpr, HAS_PERS: tl.constexpr, NEED_DPOS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, POS_MATMUL: tl.constexpr,
    D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    PREC: tl.constexpr, PAIRS: tl.constexpr,
):
    """dQ of a query tile, the context keys' share and the persistent
    vectors' (the in-kernel design and deterministic mode; otherwise the
    dK/dV and persistent kernels add them, `FUSED_DQ`)."""
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    i0 = pid_q * BQ
    offs_a = tl.arange(0, BQ)
    offs_b = tl.arange(0, BK)
    offs_d = tl.arange(0, BD)
    i = i0 + offs_a
    total = A + M
    row_ok = i < M

    q = _load_rows(Q + b * s_qb + h * s_qh, i, s_qm, M, offs_d, D, BD)
    op_dtype = q.dtype
    if not POS_MATMUL:
        # Programs spread their position-gradient atomics over REPLICAS
        # copies (summed outside) so that concurrent programs contend less.
        # In deterministic mode REPLICAS is the number of programs: one each.
        slot = (pid_q * tl.num_programs(1) + bh) % REPLICAS
        DPOS += slot.to(tl.int64) * A * D
    do = _load_rows(DO + b * s_ob + h * s_oh, i, s_om, M, offs_d, D, BD)
    lse_c = tl.load(LSE_C + bh * M + i, mask=row_ok, other=0.0)
    del_c = tl.load(DEL_C + bh * M + i, mask=row_ok, other=0.0)
    if HAS_DROPOUT:
        rk = _load_row_keys(RK, bh, i, M)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    top, r_bound = _span_setup(Z, h, A, max_span, span_ramp, HAS_SPAN)
    j_lo = tl.maximum(i0, A + i0 - r_bound)
    if PAIRS:  # from an even key, as in the forward
        j_lo -= j_lo % 2
    j_hi = tl.minimum(A + i0 + BQ - 1, total - 1)

    dq = tl.full([BQ, BD], 0.0, tl.float32)
    if POS_MATMUL:
        qp_base = QP + b.to(tl.int64) * s_pb + h * s_ph
        ds_base = DS + b.to(tl.int64) * s_pb + h * s_ph
        # dS is zero at the distances beyond the span (keys before j_lo):
        # write those entries of the band too, so that every entry of the
        # (M, A) layout is written once (the buffer is not cleared).
        for t in range(0, (j_lo - i0 + BK - 1) // BK):
            jz = j_lo - (t + 1) * BK + offs_b
            _store_band(ds_base, i, jz, s_pm, A, M, tl.full([BQ, BK], 0.0, tl.float32))
    else:
        # (a, u) -> key column b = a + u of the tile for distance chunk
        # c0 + u ("cur") and b = a + u - BK for chunk c0 - BK + u ("prev").
        c_prev = j_lo - i0 - BK
        p_prev = _load_cols(POS, c_prev + offs_b, D, A, offs_d, D, BD).to(q.dtype)
        qp_prev = tl.dot(q, p_prev, input_precision=PREC)
        # The two parts of a chunk have disjoint supports, so the pending
        # part can be kept in the operand dtype without rounding anything
        # twice.
        g_pend = tl.full([BQ, BK], 0.0, op_dtype)
    for j0 in range(j_lo, j_hi, BK):
        j = j0 + offs_b
        c0 = j0 - i0
        kt = _load_cols(k_base, j, s_km, total, offs_d, D, BD)
        if POS_MATMUL:
            band = _load_band(qp_base, i, j, s_pm, A, M)
        else:
            p_cur = _load_cols(POS, c0 + offs_b, D, A, offs_d, D, BD).to(q.dtype)
            qp_cur = tl.dot(q, p_cur, input_precision=PREC)
            band = _band(qp_cur, qp_prev, j, j0 + offs_a, BQ, BK, BK)
        x = tl.dot(q, kt, input_precision=PREC) + band
        s_raw = x * scale_log2
        s = _context_logits(s_raw, i, j, A, M, top, span_ramp,
                            A + i0 - j0 - (BK - 1), A + i0 + BQ - 1 - j0, HAS_SPAN, 2, False)
        prob = tl.math.exp2(s - lse_c[:, None])
        vt = _load_cols(v_base, j, s_vm, total, offs_d, D, BD)
        dp = tl.dot(do.to(vt.dtype), vt, input_precision=PREC)
        if HAS_DROPOUT:  # d loss / d weight before dropout
            dp = dp * _context_keep(rk, j0, A, M, BK, keep_threshold, drop_scale, PAIRS)
        ds = prob * (dp - del_c[:, None])  # d loss / d logit (natural units)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
        if POS_MATMUL:
            # d loss / d QP: the position scores enter the logits times
            # `scale`, as q . k does.
            _store_band(ds_base, i, j, s_pm, A, M, ds * scale)
        else:
            # Unskew dS into distance chunks; the "prev" chunk is now complete.
            ds_low = ds.to(op_dtype)
            a_plus_u = j[None, :] + offs_a[:, None] - j0  # loop-varying on purpose
            g_cur = tl.where(
                a_plus_u < BK, tl.gather(ds_low, tl.minimum(a_plus_u, BK - 1), 1), 0.0
            )
            g_low = tl.where(
                a_plus_u >= BK, tl.gather(ds_low, tl.maximum(a_plus_u - BK, 0), 1), g_pend
            )
            dq += tl.dot(g_low, tl.trans(p_prev), input_precision=PREC)
            if NEED_DPOS:
                dpos = tl.dot(tl.trans(q), g_low, input_precision=PREC) * scale
                _add_position_grad(DPOS, c_prev + offs_b, offs_d, dpos, A, D, BD)
            g_pend = g_cur.to(op_dtype)
            p_prev = p_cur
            qp_prev = qp_cur
            c_prev = c0
    if not POS_MATMUL:
        # Flush the last chunk.
        g_low = g_pend
        dq += tl.dot(g_low, tl.trans(p_prev), input_precision=PREC)
        if NEED_DPOS:
            dpos = tl.dot(tl.trans(q), g_low, input_precision=PREC) * scale
            _add_position_grad(DPOS, c_prev + offs_b, offs_d, dpos, A, D, BD)

    if HAS_PERS:
        lse_p = tl.load(LSE_P + bh * M + i, mask=row_ok, other=0.0)
        del_p = tl.load(DEL_P + bh * M + i, mask=row_ok, other=0.0)
        for n0 in range(0, N, BK):
            n = n0 + tl.arange(0, BK)
            mkt = _load_cols(MK + h * s_mkh, n, s_mkn, N, offs_d, D, BD).to(q.dtype)
            s = tl.dot(q, mkt, input_precision=PREC) * scale_log2
            s = tl.where((n[None, :] < N) & row_ok[:, None], s, float("-inf"))
            prob = tl.math.exp2(s - lse_p[:, None])
            mvt = _load_cols(MV + h * s_mvh, n, s_mvn, N, offs_d, D, BD).to(V.dtype.element_ty)
            dp = tl.dot(do.to(mvt.dtype), mvt, input_precision=PREC)
            if HAS_DROPOUT:
                dp = dp * _dropout_pairs(rk, -1 - n0, BK, keep_threshold, drop_scale)
            ds = prob * (dp - del_p[:, None])
            dq += tl.dot(ds.to(q.dtype), tl.trans(mkt), input_precision=PREC)

    dq_off = b * s_qb + h * s_qh + i[:, None] * s_qm + offs_d[None, :]
    tl.store(DQ + dq_off, (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


def _bwd_dkdv_kernel(
    Q, K, V, POS, QP, Z, RK, DO, LSE_C, DEL_C, DK, DV, DZP, DQ, DS,
    s_qb, s_qm, s_qh, s_kb, s_km, s_kh, s_vb, s_vm, s_vh, s_ob, s_om, s_oh,
    s_pb, s_pm, s_ph,
    H, M, A, max_span, span_ramp, scale_log2, scale, dz_coef,
    keep_threshold, drop_scale,
    HAS_SPAN: tl.constexpr, NEED_DZ: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, POS_MATMUL: tl.constexpr, FUSED_DQ: tl.constexpr,
    D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    PREC: tl.constexpr, BQE: tl.constexpr, PAIRS: tl.constexpr,
):
    """dK, dV of a key tile (and the span gradient of its edge tiles, in
    query tiles of BQE rows: fewer live registers where the mask and the
    span gradient add theirs). With
    `FUSED_DQ` (matmul position design only) also the context keys' share
    of dQ, added into the float32 `DQ` with atomics, and dS into the band
    layout `DS`: the dQ kernel then recomputes no context tile."""
    pid_k = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    j0 = pid_k * BK
    offs_a = tl.arange(0, BQ)
    offs_e = tl.arange(0, BQE)
    offs_b = tl.arange(0, BK)
    offs_d = tl.arange(0, BD)
    j = j0 + offs_b
    total = A + M

    k = _load_rows(K + b * s_kb + h * s_kh, j, s_km, total, offs_d, D, BD)
    v = _load_rows(V + b * s_vb + h * s_vh, j, s_vm, total, offs_d, D, BD)
    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_ob + h * s_oh
    top, r_bound = _span_setup(Z, h, A, max_span, span_ramp, HAS_SPAN)
    # Queries that see a key of the tile: r = A + i - j in [1, min(A, r_bound)].
    i_lo = tl.maximum(0, j0 - A + 1)
    i_hi = tl.minimum(tl.minimum(M, j0 + BK), j0 + BK - A + r_bound)

    if POS_MATMUL:
        qp_base = QP + b.to(tl.int64) * s_pb + h * s_ph
    if FUSED_DQ:
        ds_base = DS + b.to(tl.int64) * s_pb + h * s_ph
        dq_base = DQ + b * s_qb + h * s_qh
    dk = tl.full([BK, BD], 0.0, tl.float32)
    dv = tl.full([BK, BD], 0.0, tl.float32)
    dz_acc = tl.full([BK], 0.0, tl.float32)
    # Two loops, the query tiles within the span first, then the edge tiles
    # (the span mask, and the span gradient): neither branches in its body.
    i_mid = _inside_tiles(i_lo, i_hi, A + i_lo + BQ - 1 - j0, top, span_ramp, BQ, HAS_SPAN)
    for part in tl.static_range(2):
        TQ = BQ if part == 0 else BQE
        offs_p = offs_a if part == 0 else offs_e
        for i0 in range(i_lo + part * (i_mid - i_lo), i_mid + part * (i_hi - i_mid), TQ):
            i = i0 + offs_p
            row_ok = i < M
            q = _load_rows(q_base, i, s_qm, M, offs_d, D, BD)
            do = _load_rows(do_base, i, s_om, M, offs_d, D, BD)
            lse = tl.load(LSE_C + bh * M + i, mask=row_ok, other=0.0)
            dl = tl.load(DEL_C + bh * M + i, mask=row_ok, other=0.0)
            if POS_MATMUL:
                band = _load_band(qp_base, i, j, s_pm, A, M)
            else:
                c0 = j0 - i0
                p_hi = _load_cols(POS, c0 + offs_b, D, A, offs_d, D, BD).to(q.dtype)
                p_lo = _load_cols(POS, c0 - TQ + offs_p, D, A, offs_d, D, BD).to(q.dtype)
                band = _band(
                    tl.dot(q, p_hi, input_precision=PREC),
                    tl.dot(q, p_lo, input_precision=PREC),
                    i0 + offs_b, i, TQ, BK, TQ,
                )
            x = tl.dot(q, tl.trans(k), input_precision=PREC) + band
            s_raw = x * scale_log2
            if HAS_SPAN and part == 1:
                # Edge tiles: the mask as a factor. `p_raw = exp2(s - lse)`
                # is the weight the key would have at m = 1, which the span
                # gradient needs too: one exponential, no logarithm.
                r_f = (A + i[:, None] - j[None, :]).to(tl.float32)
                x_mask = ((top - r_f) + 1.0) / span_ramp  # m = clip(x_mask, 0, 1)
                live = (x_mask >= 0.0) & (r_f >= 1.0) & (r_f <= A) & row_ok[:, None]
                p_raw = tl.math.exp2(tl.where(live, s_raw - lse[:, None], float("-inf")))
                # (where m = 0, p_raw may overflow: the factor's zero must
                # not meet an infinity)
                prob = tl.where(x_mask > 0.0, p_raw * tl.minimum(x_mask, 1.0), 0.0)
            else:
                s = _context_logits(s_raw, i, j, A, M, top, span_ramp,
                                    A + i0 - j0 - (BK - 1), A + i0 + TQ - 1 - j0,
                                    HAS_SPAN, 0, False)
                prob = tl.math.exp2(s - lse[:, None])
            dropped = prob
            if HAS_DROPOUT:
                keep = _context_keep(
                    _load_row_keys(RK, bh, i, M), j0, A, M, BK,
                    keep_threshold, drop_scale, PAIRS,
                )
                dropped = prob * keep
            dv += tl.dot(tl.trans(dropped.to(v.dtype)), do.to(v.dtype), input_precision=PREC)
            dp = tl.dot(do.to(v.dtype), tl.trans(v), input_precision=PREC)
            if HAS_DROPOUT:
                dp = dp * keep
            ds = prob * (dp - dl[:, None])
            if HAS_SPAN:
                if NEED_DZ:
                    if part == 1:
                        # d loss / d z = (L / R) sum_r dL/dm(r) over the
                        # distances whose unclipped mask x(r) = (R + z L -
                        # r + 1) / R lies in [0, 1] (the clip passes the
                        # gradient there, boundaries included, as torch's
                        # clamp does), with dL/dm(r) = exp(s(r) - lse)
                        # (dP(r) - Delta) = p_raw (dP - Delta): the weight
                        # the key would have at m = 1 (a / m inside the
                        # ramp; also defined where m = 0 exactly, which
                        # log m cannot express). Only edge tiles reach the
                        # ramp: the tiles inside `z L` end below x = 1.
                        ramp = live & (x_mask <= 1.0)
                        dz_acc += tl.reduce(
                            tl.where(ramp, p_raw * (dp - dl[:, None]), 0.0), 0, _sum_combine
                        )
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
            if FUSED_DQ:
                # d loss / d QP: the position scores enter the logits times
                # `scale`, as q . k does.
                _store_band(ds_base, i, j, s_pm, A, M, ds * scale)
                dq_part = tl.dot(ds.to(k.dtype), k, input_precision=PREC) * scale
                tl.atomic_add(dq_base + i[:, None] * s_qm + offs_d[None, :], dq_part,
                              mask=row_ok[:, None] & (offs_d[None, :] < D), sem="relaxed")
    if FUSED_DQ:
        # dS is zero where the span masks every key of the tile (queries
        # past i_hi that still hold the keys in their band): write those
        # entries too, so that every entry of the (M, A) layout is written.
        # (the last tile computed ends at i_end)
        i_end = tl.where(
            i_mid < i_hi,
            i_mid + (i_hi - i_mid + BQE - 1) // BQE * BQE,
            i_lo + (tl.maximum(i_hi - i_lo, 0) + BQ - 1) // BQ * BQ,
        )
        for i0 in range(i_end, tl.minimum(M, j0 + BK), BQ):
            _store_band(ds_base, i0 + offs_a, j, s_pm, A, M,
                        tl.full([BQ, BK], 0.0, tl.float32))

    kv_mask = (j[:, None] < total) & (offs_d[None, :] < D)
    tl.store(DK + b * s_kb + h * s_kh + j[:, None] * s_km + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * s_vb + h * s_vh + j[:, None] * s_vm + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)
    if HAS_SPAN:
        if NEED_DZ:
            tl.store(DZP + bh * tl.num_programs(0) + pid_k,
                     tl.reduce(dz_acc, 0, _sum_combine) * dz_coef)


def _bwd_persistent_kernel(
    Q, MK, MV, RK, DO, LSE_P, DEL_P, DMK, DMV, DQ,
    s_qb, s_qm, s_qh, s_ob, s_om, s_oh, s_mkh, s_mkn, s_mvh, s_mvn,
    B, H, M, N, scale_log2, scale, SPLIT, keep_threshold, drop_scale,
    V_DTYPE_REF,
    HAS_DROPOUT: tl.constexpr, FUSED_DQ: tl.constexpr,
    D: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    PREC: tl.constexpr,
):
    """d persistent keys and values per (persistent tile, head, batch
    split); with `FUSED_DQ` also the persistent vectors' share of dQ,
    added into the float32 `DQ` with atomics (no dQ kernel then)."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    offs_a = tl.arange(0, BQ)
    offs_d = tl.arange(0, BD)
    n = pid_n * BN + tl.arange(0, BN)
    mk = _load_rows(MK + h * s_mkh, n, s_mkn, N, offs_d, D, BD).to(Q.dtype.element_ty)
    mv = _load_rows(MV + h * s_mvh, n, s_mvn, N, offs_d, D, BD).to(V_DTYPE_REF.dtype.element_ty)
    dmk = tl.full([BN, BD], 0.0, tl.float32)
    dmv = tl.full([BN, BD], 0.0, tl.float32)
    for b in range(sp, B, SPLIT):
        bh = b * H + h
        for i0 in range(0, M, BQ):
            i = i0 + offs_a
            row_ok = i < M
            q = _load_rows(Q + b * s_qb + h * s_qh, i, s_qm, M, offs_d, D, BD)
            do = _load_rows(DO + b * s_ob + h * s_oh, i, s_om, M, offs_d, D, BD)
            lse = tl.load(LSE_P + bh * M + i, mask=row_ok, other=0.0)
            dl = tl.load(DEL_P + bh * M + i, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(mk), input_precision=PREC) * scale_log2
            s = tl.where(row_ok[:, None] & (n[None, :] < N), s, float("-inf"))
            prob = tl.math.exp2(s - lse[:, None])
            dropped = prob
            if HAS_DROPOUT:  # column ids -1 - n: adjacent vectors share a hash
                keep = _dropout_pairs(
                    _load_row_keys(RK, bh, i, M), -1 - pid_n * BN, BN, keep_threshold, drop_scale
                )
                dropped = prob * keep
            dmv += tl.dot(tl.trans(dropped.to(mv.dtype)), do.to(mv.dtype), input_precision=PREC)
            dp = tl.dot(do.to(mv.dtype), tl.trans(mv), input_precision=PREC)
            if HAS_DROPOUT:
                dp = dp * keep
            ds = prob * (dp - dl[:, None])
            dmk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
            if FUSED_DQ:
                dq_part = tl.dot(ds.to(mk.dtype), mk, input_precision=PREC) * scale
                tl.atomic_add(
                    DQ + b * s_qb + h * s_qh + i[:, None] * s_qm + offs_d[None, :],
                    dq_part, mask=row_ok[:, None] & (offs_d[None, :] < D), sem="relaxed",
                )
    off = (sp * H + h) * N * D + n[:, None] * D + offs_d[None, :]
    mask = (n[:, None] < N) & (offs_d[None, :] < D)
    tl.store(DMK + off, dmk * scale, mask=mask)
    tl.store(DMV + off, dmv, mask=mask)


# ---------------------------------------------------------------------------
# Building the kernels and the PyTorch operators.
# ---------------------------------------------------------------------------

# The kernels run inside two PyTorch custom operators (`torch.library`), so
# that `make_fx` and `torch.compile` record them as graph nodes (with the
# shapes of `register_fake`) instead of leaving the attention out of the
# graph. Their arguments: the tensors of `triton_all_attention`, then its
# settings as checked and normalised there (tiles as
# [block_q, block_k, num_warps, num_stages]). `deterministic` stays the last
# argument.
FORWARD_OP = "keras_allattn::triton_all_attention"
BACKWARD_OP = "keras_allattn::triton_all_attention_backward"
_TENSORS_SCHEMA = (
    "Tensor query, Tensor key, Tensor value, Tensor position_keys, "
    "Tensor? persistent_keys, Tensor? persistent_values, Tensor? span_ratio, "
    "Tensor? dropout_keys"
)
_SETTINGS_SCHEMA = (
    "str integration, float max_span, float span_ramp, float dropout_rate, "
    "int[] forward_tiles, int[] dq_tiles, int[] dkdv_tiles, "
    "int[] persistent_tiles, int? persistent_split, "
    "int? position_grad_replicas, str fp32_precision, str position, "
    "bool deterministic"
)
_NUM_TENSORS = 8
# Output, log-sum-exp rows (S, B * H, M) and the float32 context and
# persistent outputs (2, B, M, H, D) of "separate" (S = 2; else S = 1 and
# no parts: an empty tensor).
FORWARD_SCHEMA = (
    f"({_TENSORS_SCHEMA}, {_SETTINGS_SCHEMA}) -> (Tensor, Tensor, Tensor)"
)
# The gradients of the seven differentiable inputs; those not asked for (and
# those of absent inputs) are empty tensors.
BACKWARD_SCHEMA = (
    f"(Tensor grad_output, {_TENSORS_SCHEMA}, Tensor output, Tensor lse, "
    f"Tensor parts, {_SETTINGS_SCHEMA}, bool need_position_grad, "
    "bool need_persistent_grad, bool need_span_grad) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _build():
    """Import triton, jit the kernels and register the PyTorch operators.

    Returns the forward operator.
    """
    global _BUILT, tl
    with _BUILD_LOCK:
        if _BUILT is not None:
            return _BUILT
        import torch
        import triton
        import triton.language as language

        tl = language
        module_globals = globals()
        for name in _JIT_NAMES:
            module_globals[name] = triton.jit(module_globals[name])
        # log2 of the span mask in the edge tiles: the hardware's
        # approximation when compiled (`lg2.approx`, relative error below
        # 2^-22; the precise `log2` is a polynomial, 0.06 ms of the
        # forward's 1.25 a layer at spans 1024 on an H200), the exact one
        # in the interpreter, which has no libdevice.
        compiled = isinstance(module_globals["_fwd_kernel"], triton.runtime.JITFunction)
        if compiled:
            from triton.language.extra import libdevice

            module_globals["libdevice"] = libdevice
        module_globals["_mask_log2"] = module_globals[
            "_mask_log2_fast" if compiled else "_mask_log2_exact"
        ]
        # The combine functions of `tl.max` / `tl.sum` themselves: the same
        # code when compiled, and the interpreter recognises them (numpy fast
        # path instead of an element-by-element Python loop).
        standard = getattr(language, "standard", None)
        for name, std_name in (
            ("_max_combine", "_elementwise_max"),
            ("_sum_combine", "_sum_combine"),
        ):
            if standard is not None and hasattr(standard, std_name):
                module_globals[name] = getattr(standard, std_name)
        _BUILT = _register_operators(torch, triton)
        return _BUILT


def register_operators():
    """Registers the kernels' PyTorch operators (once) and returns them.

    `triton_all_attention` registers them on first use; code that reaches
    `torch.ops.keras_allattn` first (e.g. a graph holding them loaded in a
    new process) calls this before.

    Returns:
        `(forward, backward)`: the operators `FORWARD_OP` and `BACKWARD_OP`
        (`torch.ops.keras_allattn.triton_all_attention.default` and
        `torch.ops.keras_allattn.triton_all_attention_backward.default`).
    """
    import torch

    _build()
    kernels = torch.ops.keras_allattn
    return (
        kernels.triton_all_attention.default,
        kernels.triton_all_attention_backward.default,
    )


def _next_pow2(x):
    return 1 << max(0, int(x) - 1).bit_length()


def _config(integration, max_span, span_ramp, dropout_rate, forward_tiles,
            dq_tiles, dkdv_tiles, persistent_tiles, persistent_split,
            position_grad_replicas, fp32_precision, position, deterministic):
    """The kernels' settings from the operators' setting arguments."""
    return {
        "pos_matmul": position == "matmul",
        "integration": integration,
        "max_span": max_span,
        "span_ramp": span_ramp,
        "forward": forward_tiles,
        "dq": dq_tiles,
        "dkdv": dkdv_tiles,
        "persistent": persistent_tiles,
        "persistent_split": persistent_split,
        "replicas": position_grad_replicas,
        "prec": _precision(fp32_precision),
        "deterministic": deterministic,
        "dropout": dropout_rate,
        # `bits < keep_threshold` keeps a weight (keras_allattn.ops.random).
        "keep_threshold": dropout_hash.keep_threshold(dropout_rate),
        "drop_scale": 1.0 / (1.0 - dropout_rate),
    }


def _forward_shapes(query, persistent_keys, integration):
    """Shapes of the forward operator's outputs: output, lse, parts."""
    B, M, H, D = query.shape
    separate = persistent_keys is not None and integration == "separate"
    lse = (2 if separate else 1, B * H, M)
    parts = (2, B, M, H, D) if separate else (0,)
    return (B, M, H, D), lse, parts


def _position_inputs(q, position_keys, pos_matmul):
    """The position operands of the kernels: `(pos, qp)`.

    In-kernel design: `pos` is the table as (A, D) rows (column c of
    position_keys is row c, so that position tiles load like key tiles,
    contiguous along D) and `qp` an unused placeholder. Matmul design: `qp`
    holds the position scores `QP = Q P` (B, M, H, A) in the dtype of `q`
    (one matmul, float32 accumulation) and `pos` is the placeholder.
    """
    import torch

    if pos_matmul:
        return q, torch.matmul(q, position_keys.to(q.dtype))
    return position_keys.t().contiguous(), q


def _batch_chunks(q, length, pos_matmul):
    """Batch-row slices of the passes: one slice in the in-kernel design;
    in the matmul design as few as keep QP (and dS) of one slice within
    `kernel_settings.position_bytes()`, at least one row each."""
    batch, queries, heads, _ = q.shape
    rows = batch
    if pos_matmul:
        per_row = queries * heads * length * q.element_size()
        rows = max(1, min(batch, position_bytes() // per_row))
    return [slice(b0, min(batch, b0 + rows)) for b0 in range(0, batch, rows)]


def _new_ds_buffer(qp):
    """The dS buffer of the matmul design: uninitialised (the dQ kernel
    writes every entry; tests swap in a NaN-filled one to check that)."""
    import torch

    return torch.empty_like(qp)


_DS_BUFFER = _new_ds_buffer


def _register_operators(torch, triton):
    """Define `FORWARD_OP` and `BACKWARD_OP`; returns the forward operator.

    Each has a fake implementation (shapes and dtypes only) for tracing on
    fake tensors; the forward's autograd formula calls the backward
    operator, so a traced backward holds the kernels too.
    """

    def launch_options(tiles):
        return {"num_warps": tiles[2], "num_stages": tiles[3]}

    @torch.library.custom_op(FORWARD_OP, mutates_args=(), schema=FORWARD_SCHEMA)
    def forward(query, key, value, position_keys, pkeys, pvalues, span_ratio,
                dropout_keys, *settings):
        cfg = _config(*settings)
        q = query.contiguous()
        k = key.contiguous()
        v = value.contiguous()
        B, M, H, D = q.shape
        A = position_keys.shape[1]
        has_pers = pkeys is not None
        has_span = span_ratio is not None
        separate = has_pers and cfg["integration"] == "separate"
        mk = pkeys.contiguous() if has_pers else q
        mv = pvalues.contiguous() if has_pers else q
        N = mk.shape[1] if has_pers else 0
        z = span_ratio.contiguous() if has_span else q
        has_dropout = cfg["dropout"] > 0.0
        rk = dropout_keys.contiguous() if has_dropout else q
        tiles = cfg["forward"]
        bd = max(16, _next_pow2(D))
        scale = 1.0 / math.sqrt(D)
        dev = q.device

        _, lse_shape, parts_shape = _forward_shapes(q, pkeys, cfg["integration"])
        out = torch.empty_like(q)
        lse = torch.empty(lse_shape, device=dev, dtype=torch.float32)
        parts = torch.empty(parts_shape, device=dev, dtype=torch.float32)
        lse_c = lse[0]
        lse_p = lse[1] if separate else lse_c
        oc, op = (parts[0], parts[1]) if separate else (out, out)
        # The matmul design runs over batch chunks (one after the other) so
        # that QP stays near `kernel_settings.position_bytes()`; one chunk
        # otherwise.
        for rows in _batch_chunks(q, A, cfg["pos_matmul"]):
            bh = slice(rows.start * H, rows.stop * H)  # rows of lse
            pos, qp = _position_inputs(q[rows], position_keys, cfg["pos_matmul"])
            grid = (triton.cdiv(M, tiles[0]), (rows.stop - rows.start) * H)
            _fwd_kernel[grid](
                q[rows], k[rows], v[rows], pos, qp, mk, mv, z, rk[rows],
                out[rows], oc[rows], op[rows], lse_c[bh], lse_p[bh],
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                out.stride(0), out.stride(1), out.stride(2),
                mk.stride(0), mk.stride(1), mv.stride(0), mv.stride(1),
                qp.stride(0), qp.stride(1), qp.stride(2),
                H, M, A, N, cfg["max_span"], cfg["span_ramp"],
                scale * math.log2(math.e), cfg["keep_threshold"], cfg["drop_scale"],
                HAS_SPAN=has_span, HAS_PERS=has_pers, SEPARATE=separate,
                HAS_DROPOUT=has_dropout, POS_MATMUL=cfg["pos_matmul"],
                D=D, BQ=tiles[0], BK=tiles[1], BD=bd, PREC=cfg["prec"](q.dtype),
                PAIRS=(A + M) % 2 == 0,
                **launch_options(tiles),
            )
            del qp
        return out, lse, parts

    @forward.register_fake
    def _(query, key, value, position_keys, pkeys, pvalues, span_ratio,
          dropout_keys, integration, *settings):
        out, lse, parts = _forward_shapes(query, pkeys, integration)
        return (
            query.new_empty(out),
            query.new_empty(lse, dtype=torch.float32),
            query.new_empty(parts, dtype=torch.float32),
        )

    @torch.library.custom_op(BACKWARD_OP, mutates_args=(), schema=BACKWARD_SCHEMA)
    def backward(grad_output, query, key, value, position_keys, pkeys, pvalues,
                 span_ratio, dropout_keys, out, lse, parts, *rest):
        *settings, need_dpos, need_pers, need_dz = rest
        cfg = _config(*settings)
        q = query.contiguous()
        k = key.contiguous()
        v = value.contiguous()
        pos_matmul = cfg["pos_matmul"]
        has_pers = pkeys is not None
        has_span = span_ratio is not None
        has_dropout = cfg["dropout"] > 0.0
        separate = has_pers and cfg["integration"] == "separate"
        mk = pkeys.contiguous() if has_pers else None
        mv = pvalues.contiguous() if has_pers else None
        z = span_ratio.contiguous() if has_span else None
        rk = dropout_keys.contiguous() if has_dropout else None
        B, M, H, D = q.shape
        A = position_keys.shape[1]
        N = mk.shape[1] if has_pers else 0
        bd = max(16, _next_pow2(D))
        scale = 1.0 / math.sqrt(D)
        scale_log2 = scale * math.log2(math.e)
        prec = cfg["prec"](q.dtype)
        dev = q.device
        do = grad_output.contiguous()
        if do.dtype != out.dtype:
            do = do.to(out.dtype)
        do32 = do.float()

        def delta(o):  # (B, M, H, D) -> (B*H, M) float32
            d = (do32 * o.float()).sum(-1)
            return d.permute(0, 2, 1).contiguous().view(B * H, M)

        lse_c = lse[0]
        if separate:
            lse_p = lse[1]
            del_c, del_p = delta(parts[0]), delta(parts[1])
        else:
            del_c = delta(out)
            del_p, lse_p = del_c, lse_c
        need_dz = has_span and need_dz
        mk_arg = mk if has_pers else q
        mv_arg = mv if has_pers else q
        z_arg = z if has_span else q
        rk_arg = rk if has_dropout else q
        max_span, ramp = cfg["max_span"], cfg["span_ramp"]
        drop = (cfg["keep_threshold"], cfg["drop_scale"])

        tiles = cfg["dq"]
        nq = triton.cdiv(M, tiles[0])
        if pos_matmul:
            replicas = 1  # no position-gradient buffer in the kernel
        elif cfg["deterministic"]:
            replicas = nq * B * H
        else:
            replicas = cfg["replicas"]
            if replicas is None:
                replicas = 8 if dev.type == "cuda" else 1
            replicas = max(1, min(int(replicas), B * H))
        dkdv_tiles = cfg["dkdv"]
        nk = triton.cdiv(A + M, dkdv_tiles[1])
        dzp = torch.zeros((B * H * nk,), device=dev, dtype=torch.float32)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        dpos_out = q.new_empty((0,))
        # The context keys' share of dQ in the dK/dV kernel and the
        # persistent vectors' in theirs (atomics into float32), no dQ
        # kernel: matmul design, not in deterministic mode.
        fused = pos_matmul and not cfg["deterministic"]
        if pos_matmul:
            # The kernels' share of dQ in float32 (the position share is
            # added outside). Fused, every share is added into it: the
            # context keys' by the dK/dV kernel, the persistent vectors' by
            # theirs (atomics), the position term's by a matmul; no dQ
            # kernel.
            dq = (torch.zeros if fused else torch.empty)(
                q.shape, device=dev, dtype=torch.float32
            )
            dpos = q.new_empty((0,))
            p = position_keys.to(q.dtype)
            dpos_acc = None
        else:
            dq = torch.empty_like(q)
            dpos = torch.zeros((replicas if need_dpos else 1, A, D), device=dev,
                               dtype=torch.float32)
        # Batch chunks as in the forward (one chunk in the in-kernel design).
        for rows in _batch_chunks(q, A, pos_matmul):
            bh = slice(rows.start * H, rows.stop * H)  # rows of lse, delta
            nbh = (rows.stop - rows.start) * H
            pos, qp = _position_inputs(q[rows], position_keys, pos_matmul)
            # dS = d loss / d QP in QP's layout, every entry written by the
            # kernel (matmul design; a placeholder otherwise).
            ds = _DS_BUFFER(qp) if pos_matmul else q.new_empty((0,))
            if not fused:
                _bwd_dq_kernel[(nq, nbh)](
                    q[rows], k[rows], v[rows], pos, qp, mk_arg, mv_arg, z_arg, rk_arg[rows],
                    do[rows], lse_c[bh], lse_p[bh], del_c[bh], del_p[bh], dq[rows], dpos, ds,
                    q.stride(0), q.stride(1), q.stride(2),
                    k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2),
                    do.stride(0), do.stride(1), do.stride(2),
                    mk_arg.stride(0), mk_arg.stride(1), mv_arg.stride(0), mv_arg.stride(1),
                    qp.stride(0), qp.stride(1), qp.stride(2),
                    H, M, A, N, max_span, ramp, scale_log2, scale, replicas, *drop,
                    HAS_SPAN=has_span, HAS_PERS=has_pers,
                    NEED_DPOS=need_dpos, HAS_DROPOUT=has_dropout,
                    POS_MATMUL=pos_matmul,
                    D=D, BQ=tiles[0], BK=tiles[1], BD=bd, PREC=prec,
                    PAIRS=(A + M) % 2 == 0,
                    **launch_options(tiles),
                )
            _bwd_dkdv_kernel[(nk, nbh)](
                q[rows], k[rows], v[rows], pos, qp, z_arg, rk_arg[rows], do[rows],
                lse_c[bh], del_c[bh], dk[rows], dv[rows],
                dzp[rows.start * H * nk:rows.stop * H * nk], dq[rows], ds,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                do.stride(0), do.stride(1), do.stride(2),
                qp.stride(0), qp.stride(1), qp.stride(2),
                H, M, A, max_span, ramp, scale_log2, scale,
                (max_span / ramp) if has_span else 0.0, *drop,
                HAS_SPAN=has_span, NEED_DZ=need_dz,
                HAS_DROPOUT=has_dropout, POS_MATMUL=pos_matmul, FUSED_DQ=fused,
                D=D, BQ=dkdv_tiles[0], BK=dkdv_tiles[1], BD=bd, PREC=prec,
                BQE=_edge_rows(dkdv_tiles[0], has_span), PAIRS=(A + M) % 2 == 0,
                **launch_options(dkdv_tiles),
            )
            del qp
            if pos_matmul:
                # The position term's share of dQ, `dS P^T`, and d
                # position_keys `Q^T dS` summed over batch rows, queries and
                # heads: two matmuls per chunk.
                dq[rows] += torch.matmul(ds, p.t()).float()
                if need_dpos:
                    part = torch.matmul(q[rows].reshape(-1, D).t(), ds.reshape(-1, A))
                    dpos_acc = part.float() if dpos_acc is None else dpos_acc + part.float()
            del ds
        # Outputs must not alias each other: one empty tensor each.
        dmk, dmv, dz = (q.new_empty((0,)) for _ in range(3))
        if has_pers and (need_pers or fused):
            tiles = cfg["persistent"]
            n_tiles = triton.cdiv(N, tiles[1])
            split = cfg["persistent_split"]
            if split is None:
                split = triton.cdiv(4 * _sm_count(dev), n_tiles * H)
            split = max(1, min(int(split), B))
            part_k = torch.empty((split, H, N, D), device=dev, dtype=torch.float32)
            part_v = torch.empty_like(part_k)
            _bwd_persistent_kernel[(n_tiles, H, split)](
                q, mk, mv, rk_arg, do, lse_p, del_p, part_k, part_v, dq,
                q.stride(0), q.stride(1), q.stride(2),
                do.stride(0), do.stride(1), do.stride(2),
                mk.stride(0), mk.stride(1), mv.stride(0), mv.stride(1),
                B, H, M, N, scale_log2, scale, split, *drop,
                v,
                HAS_DROPOUT=has_dropout, FUSED_DQ=fused,
                D=D, BQ=tiles[0], BN=tiles[1], BD=bd, PREC=prec,
                **launch_options(tiles),
            )
            if need_pers:
                dmk = part_k.sum(0).to(mk.dtype)
                dmv = part_v.sum(0).to(mv.dtype)
        if pos_matmul:
            dq = dq.to(q.dtype)
            if need_dpos:
                dpos_out = dpos_acc.to(position_keys.dtype)
        elif need_dpos:
            dpos_out = dpos.sum(0).t().to(position_keys.dtype).contiguous()

        if need_dz:
            dz = dzp.view(B, H, nk).sum((0, 2)).to(z.dtype)
        return dq, dk, dv, dpos_out, dmk, dmv, dz

    @backward.register_fake
    def _(grad_output, query, key, value, position_keys, pkeys, pvalues,
          span_ratio, dropout_keys, out, lse, parts, *rest):
        *_, need_dpos, need_pers, need_dz = rest

        def like(tensor, needed):
            if tensor is None or not needed:
                return query.new_empty((0,))
            return tensor.new_empty(tensor.shape)

        return (
            like(query, True), like(key, True), like(value, True),
            like(position_keys, need_dpos), like(pkeys, need_pers),
            like(pvalues, need_pers), like(span_ratio, need_dz),
        )

    def setup_context(ctx, inputs, output):
        out, lse, parts = output
        ctx.mark_non_differentiable(lse, parts)
        ctx.settings = inputs[_NUM_TENSORS:]
        ctx.save_for_backward(*inputs[:_NUM_TENSORS], out, lse, parts)

    def differentiate(ctx, grad_output, grad_lse, grad_parts):
        needs = ctx.needs_input_grad
        grads = backward(
            grad_output, *ctx.saved_tensors, *ctx.settings,
            needs[3], needs[4] or needs[5], needs[6],
        )
        # The dropout row keys are integers and the settings no tensors:
        # no gradient.
        return tuple(
            grad if need else None for grad, need in zip(grads, needs)
        ) + (None,) * (len(needs) - len(grads))

    forward.register_autograd(differentiate, setup_context=setup_context)
    return forward


def _edge_rows(block_q, has_span):
    """Query rows of the dK/dV kernel's edge tiles: half its tiles' under a
    span (at least 16), where the mask and the span gradient hold registers
    of their own."""
    return max(16, block_q // 2) if has_span else block_q


def _sm_count(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _precision(fp32_precision):
    def prec(dtype):
        import torch

        return fp32_precision if dtype == torch.float32 else "tf32"

    return prec


# The kernels' tiles (block_q, block_k, num_warps, num_stages) where the
# caller names none, with a span (adaptive) and without. Chosen on an H200
# (torch 2.11, triton 3.6) at the enwik8_small layer shapes, bf16, dropout
# 0.3, D 64 (`benchmarks/triton_kernel_check.py --profile`, RESULTS.md): 4
# warps took a layer's forward+backward at fixed 2048 from 14.5 ms (8 warps)
# to 8.4; dQ under a span runs fastest at 32 query rows (2.26 ms against
# 2.47 at trimmed spans), dQ without a span and the persistent kernel at 3
# stages. In the default mode of the matmul design the dK/dV kernel also
# adds the context share of dQ (no dQ kernel): under a span (it holds the
# span gradient too) at 32 query rows, 5.48 ms a layer's forward+backward
# at trimmed spans against 5.59 at 64 (fixed 1024: 64 rows, 4.38 ms against
# 4.61 at 32; `benchmarks/triton_ab.py --baseline-tiles`).
DEFAULT_TILES = {
    "fixed": {
        "forward": (64, 64, 4, 2), "dq": (64, 64, 4, 3),
        "dkdv": (64, 64, 4, 2), "persistent": (64, 64, 4, 3),
    },
    "span": {
        "forward": (64, 64, 4, 3), "dq": (32, 64, 4, 2),
        "dkdv": (64, 64, 4, 2), "persistent": (64, 64, 4, 3),
    },
}


def _tiles(name, value, defaults):
    """Normalise a (block_q, block_k[, num_warps[, num_stages]]) tuple."""
    value = tuple(int(x) for x in value)
    if not 2 <= len(value) <= 4:
        raise ValueError(
            f"`{name}` tiles must be (block_q, block_k[, num_warps[, num_stages]]); "
            f"got {value}."
        )
    value = value + tuple(defaults[len(value):])
    for label, size in zip(("block_q", "block_k"), value[:2]):
        if size < 16 or size & (size - 1):
            raise ValueError(f"`{name}` {label} must be a power of two >= 16; got {size}.")
    return value


def triton_all_attention(
    query,
    key,
    value,
    position_keys,
    persistent_keys=None,
    persistent_values=None,
    span_ratio=None,
    max_span=None,
    span_ramp=32,
    integration="joint",
    block_q=None,
    block_k=None,
    num_warps=None,
    num_stages=None,
    backward=None,
    persistent_split=None,
    position_grad_replicas=None,
    fp32_precision="ieee",
    deterministic=None,
    dropout_rate=0.0,
    dropout_keys=None,
    position=None,
):
    """Fused all-attention (SPEC §1) on torch tensors, dropout included.

    Same layouts and function as `portable_all_attention`:

    Args:
        query: (B, M, H, D).
        key, value: (B, A + M, H, D): the `A` memory rows, then the block.
        position_keys: (D, A); column `c` is the key of distance `A - c`.
        persistent_keys, persistent_values: None or (H, N, D), as used.
        span_ratio: None or (H,) ratios `z` in [0, 1] (adaptive span).
        max_span: int `L` (needed with `span_ratio`).
        span_ramp: int `R`.
        integration: "joint" or "separate".
        block_q, block_k: query and key tiles of the forward kernel (powers
            of two, >= 16; `block_q <= block_k` in the in-kernel position
            design, whose skew reads one key tile back); `block_k` also tiles the
            persistent vectors.
        num_warps, num_stages: Triton launch options of the forward kernel.
            With none of these four given, every kernel takes its entry of
            `DEFAULT_TILES` (measured on an H200, with and without a
            span); any given one fills in from that table's forward entry
            and the backward kernels default to the forward's tiles.
        backward: None or a dict overriding the backward kernels' tiles:
            keys "dq", "dkdv", "persistent", values
            `(block_q, block_k[, num_warps[, num_stages]])`; missing
            entries fill in as said above. The dQ kernel runs in the
            in-kernel design and in deterministic mode only (otherwise
            dK/dV and the persistent kernel add dQ); "dq" needs
            `block_q <= block_k` in the in-kernel design, where the dK/dV
            kernel's position band costs `(block_q + block_k) / block_k`
            times a `Q K^T` tile.
        persistent_split: batch split of the persistent-gradient kernel
            (default: about 4 programs per multiprocessor).
        position_grad_replicas: copies of the position-gradient buffer the
            dQ programs spread their atomics over (default 8 on CUDA;
            ignored in deterministic mode: one per program).
        fp32_precision: `tl.dot` input precision for float32 inputs
            ("ieee" for exact float32, "tf32" for speed). bf16/fp16 inputs
            use their tensor-core path with float32 accumulation.
        deterministic: bitwise reproducible gradients at the cost
            described in the module docstring (a separate dQ pass; in the
            "in_kernel" design, memory); None: the mode of
            `keras_allattn.ops.attention.is_deterministic()` at this call.
        dropout_rate: float in [0, 1), the attention dropout rate.
        dropout_keys: int32 (B, H, M) row keys of the dropout mask
            (`keras_allattn.ops.random.attention_dropout_keys` of the
            call's seed), moved to the device of `query`; needed when
            `dropout_rate > 0`, ignored otherwise.
        position: how the relative-position term is computed (module
            docstring): "in_kernel" (`Q P` per key tile in the kernels,
            position-key gradient by atomics) or "matmul" (`Q P` and the
            position gradients by PyTorch matmuls, the kernels read and
            write the band). The same function either way. None: the
            environment variable `KERAS_ALLATTN_TRITON_POSITION` (default
            "matmul"; `keras_allattn.ops.kernel_settings.triton_position`),
            which is how the dispatcher's calls choose.

    Returns:
        (B, M, H, D) in the dtype of `query`. Differentiable in `query`,
        `key`, `value`, `position_keys`, the persistent vectors and
        `span_ratio`.
    """
    if integration not in INTEGRATIONS:
        raise ValueError(
            f"`integration` must be one of {INTEGRATIONS}. "
            f"Received: integration={integration!r}"
        )
    if (persistent_keys is None) != (persistent_values is None):
        raise ValueError("Pass both `persistent_keys` and `persistent_values`, or neither.")
    if span_ratio is not None and max_span is None:
        raise ValueError("`max_span` is needed with `span_ratio`.")
    B, M, H, D = query.shape
    A = position_keys.shape[-1]
    if A < 1:
        raise ValueError("At least one attended distance is needed (A >= 1).")
    if tuple(key.shape) != (B, A + M, H, D) or tuple(value.shape) != (B, A + M, H, D):
        raise ValueError(
            f"`key` and `value` must have shape {(B, A + M, H, D)}; got "
            f"{tuple(key.shape)} and {tuple(value.shape)}."
        )
    if tuple(position_keys.shape) != (D, A):
        raise ValueError(f"`position_keys` must have shape {(D, A)}.")
    if persistent_keys is not None:
        if (
            persistent_keys.ndim != 3
            or (persistent_keys.shape[0], persistent_keys.shape[2]) != (H, D)
            or tuple(persistent_values.shape) != tuple(persistent_keys.shape)
        ):
            raise ValueError("Persistent keys/values must have shape (H, N, D).")
    if span_ratio is not None and tuple(span_ratio.shape) != (H,):
        raise ValueError(f"`span_ratio` must have shape {(H,)}.")
    dropout_rate = float(dropout_rate)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(
            f"`dropout_rate` must be in [0, 1). Received: dropout_rate={dropout_rate}"
        )
    if dropout_rate > 0.0:
        _check_dropout_keys(dropout_keys, (B, H, M))
        dropout_keys = dropout_keys.to(query.device)
    else:
        dropout_keys = None
    if position is None:
        position = triton_position()
    if position not in POSITION_DESIGNS:
        raise ValueError(
            f"`position` must be one of {POSITION_DESIGNS}. "
            f"Received: position={position!r}"
        )
    deterministic = resolve_deterministic(deterministic)
    table = DEFAULT_TILES["span" if span_ratio is not None else "fixed"]
    given = (block_q, block_k, num_warps, num_stages)
    forward = _tiles("forward", tuple(
        table["forward"][i] if x is None else x for i, x in enumerate(given)
    ), ())
    backward = dict(backward or {})
    unknown = set(backward) - {"dq", "dkdv", "persistent"}
    if unknown:
        raise ValueError(f"Unknown `backward` keys: {sorted(unknown)}.")
    tiles = {"forward": forward}
    tuned = all(x is None for x in given)
    for name in ("dq", "dkdv", "persistent"):
        default = table[name] if tuned else forward
        tiles[name] = _tiles(name, backward.get(name, default), default)
    for name in ("forward", "dq"):
        if position == "in_kernel" and tiles[name][0] > tiles[name][1]:
            raise ValueError(
                f"The {name} kernel needs block_q <= block_k in the in-kernel "
                f"position design; got {tiles[name][:2]}."
            )
    operator = _build()
    output, _, _ = operator(
        query, key, value, position_keys,
        persistent_keys, persistent_values, span_ratio, dropout_keys,
        integration,
        float(max_span) if max_span is not None else 0.0,
        float(span_ramp),
        dropout_rate,
        *(list(tiles[name]) for name in ("forward", "dq", "dkdv", "persistent")),
        None if persistent_split is None else int(persistent_split),
        None if position_grad_replicas is None else int(position_grad_replicas),
        fp32_precision,
        position,
        deterministic,
    )
    return output


def _check_dropout_keys(keys, shape):
    import torch

    if keys is None:
        raise ValueError(
            f"`dropout_keys` (int32 {shape}) is needed when `dropout_rate` > 0. "
            "Received: dropout_keys=None"
        )
    if tuple(keys.shape) != shape or keys.dtype != torch.int32:
        raise ValueError(
            f"`dropout_keys` must be an int32 tensor of shape (B, H, M) = {shape}. "
            f"Received: dropout_keys with shape {tuple(keys.shape)}, dtype {keys.dtype}"
        )
