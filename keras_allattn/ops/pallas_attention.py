"""Fused all-attention for the JAX backend (Pallas, Triton GPU lowering).

`pallas_all_attention` computes exactly the function of
`keras_allattn.ops.attention.portable_all_attention` (SPEC §1), attention
dropout included, with a hand-written backward pass (`jax.custom_vjp`). Layouts are
the portable path's: query (B, M, H, D); key/value (B, A + M, H, D), the `A`
memory rows followed by the `M` block rows; position_keys (D, A), column `c`
holding the key of distance `A - c`; persistent keys/values (H, N, D) as
used; span_ratio (H,).

Per batch row `b`, head `h` and query `i` (0-based in the block), the query
attends to key rows `j = i .. i + A - 1`, i.e. distances `r = A + i - j` in
`1 .. A`, with logits

    s(i, r) = (q_i . k_j + q_i . p_r) / sqrt(D) [+ log m(r)]
    u(i, n) = q_i . mk_n / sqrt(D)

where `m(r) = clip((R + z_h L - r + 1) / R, 0, 1)` is the adaptive-span mask
(log-space form: `m = 0` excludes the key; this equals the reference's
multiply-and-renormalise up to its 1e-8), then one softmax over context and
persistent logits ("joint") or one softmax each, outputs summed
("separate").

Kernels (float32 online softmax and accumulation, in base 2: the logits
times `log2 e`, `exp2`, base-2 log-sum-exps; nothing of size
(B, H, M, A) is kept between the forward and the backward pass). All
pallas_calls pass Triton `CompilerParams`, which selects the Triton lowering
(without them recent jax picks Mosaic GPU).

The relative-position term. Entry (i, j) of the context scores needs
`q_i . P[:, j - i]` (column `c = j - i` of position_keys holds the key of
distance `A - c`). Outside the kernels, one XLA matmul per call computes
the position scores `QP = Q P` (B, M, H, A) in the inputs' dtype (float32
accumulation); a kernel reads the band of a (query tile, key tile) pair from
it with one gather load, `QP[i, j - i]`, contiguous along the keys (the rows
of the band are consecutive columns of QP). In the backward, the dQ kernel
writes the score gradients `dS` (B, M, H, A) back in the same skewed layout
with one masked scatter store per tile (zeros for the distances the span
skips), and two XLA matmuls give the position term's share of dQ (`dS P^T`)
and the gradient of position_keys (`Q^T dS`, summed over batch, heads and
queries). The forward's QP is recomputed in the backward rather than kept.
QP and dS are transients of 2 B H M A bytes each in bfloat16 (1 GiB at
B = 64, H = 8, M = 512, A = 2048) while one layer runs; where they would
exceed `kernel_settings.position_bytes()` (1 GiB) each pass runs over
batch chunks, one after the other (`_over_chunks`), so the transients do
not grow with the span.

* forward: one program per (query-tile group, head, batch row); it loops over
  its query tiles, and for each over the key tiles inside the head's span
  (loop bounds computed in the kernel from `z_h`, so the cost follows the
  learned span), then over the persistent tiles. The mask acts only in
  the key tiles whose distances pass its flat part (`r > z L`); tiles
  wholly inside it skip its arithmetic. The forward adds `log2 m` to those
  tiles' logits (its running maximum must see them); the backward kernels,
  which know the log-sum-exp, multiply the recomputed weights by `m`
  instead (no logarithm).
* backward, flash-attention style recomputation from the saved log-sum-exp
  (and `delta = rowsum(dO * O)`): a dK/dV kernel (key-tile programs looping
  over the query tiles that see them), a dQ kernel (query-tile programs
  looping over key tiles) that also writes dS and d span_ratio
  (per-program partials: sum of dS (L/R)/m over the ramp, computed only in
  the key tiles whose distances reach the ramp), and a kernel for
  the persistent keys/values (persistent-tile programs looping over batch
  rows and query tiles; per-group partials summed outside). Each backward
  kernel has its own tile shape (`backward_blocks`).

Determinism. Every output of a kernel is written by one program, partials
are summed outside in a fixed order, and no kernel uses atomics: the
gradients are bitwise reproducible on the same device and shapes in every
mode (the `deterministic` argument is accepted for the dispatcher's sake
and changes nothing here).

Attention dropout. The mask is the counter-based one of
`keras_allattn.ops.random`: each kernel hashes the row keys of its query
tile (an int32 (B, H, M) input computed from the call's seed) with the
column ids (the distance of a context key, `-1 - n` for a persistent
vector), so the backward kernels regenerate the forward's mask and nothing
of size (B, H, M, A) is stored. The softmax normaliser (the saved
log-sum-exp) sums the weights before dropout, the outputs use the dropped
weights; in the backward, `dP` is multiplied by the factors before
`dS = P (dP - delta)`, and `delta = rowsum(dO * O)` already holds the
dropped output.

The span gradient is that of the log-space form: where `z L` is an integer,
a distance enters the span with `m = 0+` and the derivative in `z` jumps
(one-sided derivatives differ); float32 rounding then decides the side, for
this kernel and for the portable path alike.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from keras_allattn.ops import random as dropout_hash
from keras_allattn.ops.kernel_settings import INTEGRATIONS
from keras_allattn.ops.kernel_settings import position_bytes
from keras_allattn.ops.kernel_settings import is_power_of_two as _is_pow2
from keras_allattn.ops.kernel_settings import resolve_deterministic

_LOG2_E = 1.4426950408889634  # log2(e)
# Initial running maximum: finite, so that a row whose logits in a tile are
# all -inf gives exp(-inf - _M_INIT) = 0 and never NaN.
_M_INIT = -1e30
# Number of programs a kernel grid aims at. At B 64, H 8 (enwik8_small) 4096
# gives each program one forward query tile and about one backward tile: on
# an H200 the step's kernels ran 5 to 10% faster than at 1024 (four tiles a
# program), and 32768 gave nothing more (benchmarks/RESULTS.md).
_DEFAULT_PROGRAMS = 4096
# Profiling switches (read when kernels are traced; benchmarks only, the
# results are then wrong): the dQ kernel skips its dS store, its stores of
# the zero dS tiles beyond the span, or its span-gradient sum, to time each
# one's share.
_DEBUG = {"skip_ds_store": False, "skip_zero_tiles": False, "skip_ramp_sum": False}


@dataclasses.dataclass(frozen=True)
class _Config:
    batch: int
    queries: int  # M
    length: int  # A
    heads: int
    head_dim: int
    persistent: int  # N (0: no persistent vectors)
    has_span: bool
    max_span: float
    span_ramp: float
    joint: bool
    block_q: int
    block_k: int
    block_n: int
    num_warps: int
    num_stages: int
    interpret: bool
    highest: bool
    programs: int
    # Backward tiles (block_q, block_k, num_warps, num_stages) of the dK/dV
    # and dQ kernels.
    dkdv_blocks: tuple = (None, None, None, None)
    dq_blocks: tuple = (None, None, None, None)
    # Attention dropout rate (0: none); the row keys are a kernel input.
    dropout: float = 0.0

    # Derived sizes ------------------------------------------------------
    @property
    def total(self):  # A + M key rows
        return self.length + self.queries

    def with_blocks(self, blocks):
        block_q, block_k, num_warps, num_stages = blocks
        return dataclasses.replace(
            self, block_q=block_q, block_k=block_k, num_warps=num_warps,
            num_stages=num_stages,
        )

    @property
    def dkdv(self):  # the config of the dK/dV kernel
        return self.with_blocks(self.dkdv_blocks)

    @property
    def dq(self):  # the config of the dQ kernel
        return self.with_blocks(self.dq_blocks)

    @property
    def nq(self):
        return -(-self.queries // self.block_q)

    @property
    def nk(self):
        return -(-self.total // self.block_k)

    @property
    def nn(self):
        return -(-self.persistent // self.block_n) if self.persistent else 0

    @property
    def scale(self):
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def scale_log2(self):
        """The logits' scale in base-2 units: the kernels' exponentials
        are `exp2` (`__nv_exp2f`, one `ex2.approx`; `exp` lowers to
        `__nv_expf`, a range reduction around it) and their log-sum-exps
        base-2 logarithms."""
        return self.scale * _LOG2_E

    @property
    def separate_persistent(self):
        return self.persistent > 0 and not self.joint

    @property
    def has_dropout(self):
        return self.dropout > 0.0

    @property
    def keep_threshold(self):
        return dropout_hash.keep_threshold(self.dropout)

    @property
    def precision(self):
        return lax.Precision.HIGHEST if self.highest else None

    def groups(self, tiles):
        """Tile groups per (head, batch row): programs stride over tiles."""
        per = self.heads * self.batch
        return int(min(tiles, max(1, -(-self.programs // per))))

    def compiler_params(self):
        return plt.CompilerParams(
            num_warps=self.num_warps, num_stages=self.num_stages
        )


# ---------------------------------------------------------------------------
# In-kernel helpers
# ---------------------------------------------------------------------------


def _dot_nt(a, b, cfg):  # a (m, k), b (n, k) -> (m, n) float32
    return lax.dot_general(
        a,
        b,
        (((1,), (1,)), ((), ())),
        precision=cfg.precision,
        preferred_element_type=jnp.float32,
    )


def _dot_nn(a, b, cfg):  # a (m, k), b (k, n) -> (m, n) float32
    return lax.dot_general(
        a,
        b,
        (((1,), (0,)), ((), ())),
        precision=cfg.precision,
        preferred_element_type=jnp.float32,
    )


def _dot_tn(a, b, cfg):  # a (k, m), b (k, n) -> (m, n) float32
    return lax.dot_general(
        a,
        b,
        (((0,), (0,)), ((), ())),
        precision=cfg.precision,
        preferred_element_type=jnp.float32,
    )


def _idiv(x, d):  # floor division of non-negative int32 values
    return lax.div(x, jnp.int32(d))


def _span_limit(z, cfg):
    """Largest distance with a non-zero span mask (conservative by one)."""
    if not cfg.has_span:
        return jnp.int32(cfg.length)
    lim = cfg.span_ramp + jnp.ceil(z * cfg.max_span) + 1.0
    lim = jnp.clip(lim, 1.0, float(cfg.length))
    return lim.astype(jnp.int32)


def _span_raw(z, r, cfg):
    """The unclipped span mask `(R + z L - r + 1) / R` at distances r."""
    raw = cfg.span_ramp + z * cfg.max_span - r.astype(jnp.float32) + 1.0
    return raw / cfg.span_ramp


def _tile_distances(i0, j0, shape, cfg):
    """Distances `r = A + i - j` of the (BQ, BK) tile of queries `i0 + a`
    and keys `j0 + b`, and `valid`: the band's scores of real queries."""
    i = i0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    j = j0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    r = cfg.length + i - j
    return r, (r >= 1) & (r <= cfg.length) & (i < cfg.queries)


def _context_logits(s, i0, j0, z, cfg, edge):
    """The forward's base-2 logits of the (BQ, BK) tile of queries `i0 + a`
    and keys `j0 + b`, -inf outside the band, for rows past the block and
    where the span mask is 0.

    `edge` (static): whether the tile may reach past distance `z L`, where
    the span mask acts (`log2 m` added: the running maximum must see the
    masked logits). The mask is 1 up to distance `z L + 1`, so the other
    tiles skip its arithmetic and logarithm (a second transcendental per
    score next to the softmax's exponential); `_edge_split` sorts the
    tiles."""
    r, valid = _tile_distances(i0, j0, s.shape, cfg)
    t = s * cfg.scale_log2
    if cfg.has_span and edge:
        raw = _span_raw(z, r, cfg)
        t = jnp.where(raw > 0.0, t + jnp.log2(jnp.clip(raw, 1e-30, 1.0)), -jnp.inf)
    return jnp.where(valid, t, -jnp.inf)


def _tile_probs(s, i0, j0, z, lse, cfg, edge):
    """The backward's probabilities of the (BQ, BK) tile of queries
    `i0 + a` and keys `j0 + b` from the saved base-2 log-sum-exps `lse`.

    Returns (p, valid, free, raw): `valid` as `_tile_distances`'s; in the
    tiles that may reach the span's edge the mask is a factor, `p = free *
    clip(raw, 0, 1)` with `free = exp2(t - lse)` the weight the key would
    have at mask 1 and `raw` the unclipped mask: no logarithm (the forward
    needs one for its running maximum, the backward knows `lse`), and
    `free` is the span gradient's weight too. `free` and `raw` are None
    unless `edge` is True (`edge` None: decided per tile, a branch; then
    `valid` is None too)."""
    t = s * cfg.scale_log2

    # Each branch computes the distances and the band's mask itself: a
    # boolean tile computed before a `lax.cond` and used inside it is saved
    # and restored as predicate bits (as the Triton forward's was).
    def inside(t):
        _, valid = _tile_distances(i0, j0, t.shape, cfg)
        return jnp.where(valid, jnp.exp2(t - lse[:, None]), 0.0)

    def at_edge(t):
        r, valid = _tile_distances(i0, j0, t.shape, cfg)
        raw = _span_raw(z, r, cfg)
        # (an argument below 115 keeps `free` finite where the mask is 0)
        free = jnp.exp2(jnp.minimum(t - lse[:, None], 115.0))
        p = jnp.where(valid & (raw > 0.0), free * jnp.minimum(raw, 1.0), 0.0)
        return p, free, raw

    if edge is None and cfg.has_span:  # one token of slack for rounding
        r_hi = (cfg.length + i0 + s.shape[0] - 1 - j0).astype(jnp.float32)
        p = lax.cond(r_hi > z * cfg.max_span, lambda t: at_edge(t)[0], inside, t)
        return p, None, None, None
    _, valid = _tile_distances(i0, j0, s.shape, cfg)
    if not cfg.has_span or edge is False:
        return inside(t), valid, None, None
    p, free, raw = at_edge(t)
    return p, valid, free, raw


def _edge_split(base, z, cfg, size):
    """The first key tile past the span's edge tiles.

    Key tile `n` holds distances up to `base - n * size`. Tiles from the
    returned index on stay within `z L` (mask 1: no mask arithmetic), the
    ones before may reach past it (edge tiles). The mask is 1 up to `z L +
    1`: float32 rounding here (well below one token) cannot put a tile with
    mask < 1 inside.
    """
    x = (base.astype(jnp.float32) - z * cfg.max_span) / size
    return jnp.ceil(x).astype(jnp.int32)  # base - n size <= z L  <=>  n >= x


def _split_loop(lo, split, hi, body, init):
    """`fori_loop(lo, hi, body)` as two loops, the edge tiles' before `split`
    (`body(..., edge=True)`) and the others' (`edge=False`), each without a
    branch in its body, in the order of the one loop. `split` is clipped to
    [lo, hi]; None: one loop of inside tiles."""
    if split is None:
        return lax.fori_loop(lo, hi, functools.partial(body, edge=False), init)
    split = jnp.clip(split, lo, hi)
    state = lax.fori_loop(lo, split, functools.partial(body, edge=True), init)
    return lax.fori_loop(split, hi, functools.partial(body, edge=False), state)


def _load_rows(ref, b, start, h, size, limit):
    """(size, D) rows [start, start + size) of a (B, rows, H, D) ref."""
    rows = start + lax.iota(jnp.int32, size)
    return plt.load(
        ref.at[b, pl.ds(start, size), h, :],
        mask=(rows < limit)[:, None],
        other=0.0,
    )


def _load_vec(ref, b, h, start, size, limit):
    """(size,) entries [start, start + size) of a (B, H, M) ref."""
    rows = start + lax.iota(jnp.int32, size)
    return plt.load(
        ref.at[b, h, pl.ds(start, size)], mask=rows < limit, other=0.0
    )


def _store_rows(ref, b, start, h, size, limit, value):
    rows = start + lax.iota(jnp.int32, size)
    plt.store(
        ref.at[b, pl.ds(start, size), h, :],
        value.astype(ref.dtype),
        mask=(rows < limit)[:, None],
    )


def _store_vec(ref, b, h, start, size, limit, value):
    rows = start + lax.iota(jnp.int32, size)
    plt.store(
        ref.at[b, h, pl.ds(start, size)],
        value.astype(ref.dtype),
        mask=rows < limit,
    )


def _band_index(i0, j0, cfg):
    """Rows `i` and QP columns `c = j - i` of the (BQ, BK) tile at (i0, j0),
    and where they lie inside the (M, A) position scores."""
    shape = (cfg.block_q, cfg.block_k)
    i = i0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    c = j0 + lax.broadcasted_iota(jnp.int32, shape, 1) - i
    inside = (i < cfg.queries) & (c >= 0) & (c < cfg.length)
    return i, c, inside


def _position_band(qp_ref, b, h, i0, j0, cfg):
    """`q_i . P[:, j - i]` for the (BQ, BK) tile at (i0, j0), float32.

    A gather from QP with the indices clamped into bounds: the entries
    outside the band (distances not in 1..A, rows past M) read some other
    in-bounds entry, and the caller masks them with the logits."""
    i, c, _ = _band_index(i0, j0, cfg)
    i = jnp.minimum(i, cfg.queries - 1)
    c = jnp.clip(c, 0, cfg.length - 1)
    return qp_ref[b, i, h, c].astype(jnp.float32)


def _store_band(ds_ref, b, h, i0, j0, cfg, value):
    """Writes the (BQ, BK) tile at (i0, j0) into the skewed (M, A) layout."""
    i, c, inside = _band_index(i0, j0, cfg)
    plt.store(ds_ref.at[b, i, h, c], value.astype(ds_ref.dtype), mask=inside)


def _key_range(i0, rmax, cfg):
    """Key tiles [kt_lo, kt_hi) holding keys of the query tile at i0."""
    j_lo = jnp.maximum(i0 + cfg.length - rmax, 0)
    j_hi = jnp.minimum(cfg.total - 1, i0 + cfg.block_q + cfg.length - 2)
    return _idiv(j_lo, cfg.block_k), _idiv(j_hi, cfg.block_k) + 1


def _key_split(i0, z, cfg):
    """Key tiles of the query tile at i0 from which on the span mask is 1
    (None without adaptive span): key tile n reaches distances up to
    `L + i0 + BQ - 1 - n BK`."""
    if not cfg.has_span:
        return None
    return _edge_split(cfg.length + i0 + cfg.block_q - 1, z, cfg, cfg.block_k)


def _online_init(rows, d):
    """The online softmax's state before its first tile: running maximum
    and sum as (rows, 1) columns (see `_online_update`), output (rows, d)."""
    return (
        jnp.full((rows, 1), _M_INIT, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
        jnp.zeros((rows, d), jnp.float32),
    )


def _online_update(state, t, vals, cfg, keep=None):
    """One tile of the online softmax; `keep`: dropout factors or None (the
    normaliser sums the weights before dropout, the output after).

    The running maximum and sum are (BQ, 1) columns, not (BQ,) vectors: with
    vectors, Triton's layout pass kept them in another layout than the
    logits (whose tile adds the position band, a gathered load) and so
    computed the maximum, the exponentials and the sum twice, once in each
    (sm_90, `benchmarks/pallas_registers.py`: 70 exponentials a thread a
    64 x 64 tile instead of 34, and 1,311 instructions a tile instead of
    1,006)."""
    m_i, l_i, acc = state
    m_new = jnp.maximum(m_i, jnp.max(t, axis=1, keepdims=True))
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(t - m_new)
    l_new = l_i * alpha + jnp.sum(p, axis=1, keepdims=True)
    acc = acc * alpha + _dot_nn(_dropped(p, keep).astype(vals.dtype), vals, cfg)
    return m_new, l_new, acc


def _mix32(x):
    """`keras_allattn.ops.random.mix32` on int32 values in a kernel."""
    x = x ^ lax.shift_right_logical(x, jnp.int32(16))
    x = x * jnp.int32(dropout_hash.MIX_1)
    x = x ^ lax.shift_right_logical(x, jnp.int32(15))
    x = x * jnp.int32(dropout_hash.MIX_2)
    return x ^ lax.shift_right_logical(x, jnp.int32(16))


def _dropout_factor(rk, u, cfg):
    """Dropout factors (0 or 1 / keep) of row keys rk (BQ,) and column ids
    u, one hash a weight: the counter-based mask of
    `keras_allattn.ops.random`; None without dropout."""
    if not cfg.has_dropout:
        return None
    x = _mix32(rk[:, None] ^ (lax.shift_right_logical(u, jnp.int32(1))
                              * jnp.int32(dropout_hash.COLUMN)))
    half = jnp.where((u & 1) == 1, lax.shift_right_logical(x, jnp.int32(16)), x)
    bits = half & jnp.int32((1 << dropout_hash.KEEP_BITS) - 1)
    return jnp.where(bits < cfg.keep_threshold, 1.0 / (1.0 - cfg.dropout), 0.0)


def _paired_dropout(rk, u_first, cfg, shape):
    """Dropout factors of a (rows, 2 P) tile whose column ids run down from
    the odd id `u_first` (column 2c has id u_first - 2c, column 2c + 1 the
    next lower one): the two columns of a pair share the hash of
    `u_first >> 1 - c`, the first the high half, the second the low."""
    rows, cols = shape
    pair = lax.shift_right_logical(u_first, jnp.int32(1)) - lax.broadcasted_iota(
        jnp.int32, (rows, cols // 2), 1
    )
    x = _mix32(rk[:, None] ^ (pair * jnp.int32(dropout_hash.COLUMN)))
    scale = 1.0 / (1.0 - cfg.dropout)
    mask = jnp.int32((1 << dropout_hash.KEEP_BITS) - 1)
    high = jnp.where(lax.shift_right_logical(x, jnp.int32(16)) < cfg.keep_threshold, scale, 0.0)
    low = jnp.where((x & mask) < cfg.keep_threshold, scale, 0.0)
    return jnp.stack([high, low], axis=-1).reshape(rows, cols)


def _context_dropout(rk, i0, j0, cfg, shape, paired=True):
    """Dropout factors of the (BQ, BK) context tile: column id = the key's
    place from the last key, `A + M - 1 - j`. Key tiles start at even j0,
    so with A + M even (and BK even) the tile's columns pair up; `paired`
    False hashes each column (the same factors, twice the hashing, no
    interleaving of the halves)."""
    if not cfg.has_dropout:
        return None
    if paired and cfg.total % 2 == 0 and shape[1] % 2 == 0:
        return _paired_dropout(rk, cfg.total - 1 - j0, cfg, shape)
    j = j0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    return _dropout_factor(rk, cfg.total - 1 - j, cfg)


def _persistent_dropout(rk, n0, cfg, shape, paired=True):
    """Dropout factors of a (BQ, BN) persistent tile: column id = -1 - n
    (odd as uint32 for even n0, so the columns pair up); `paired` as in
    `_context_dropout`."""
    if not cfg.has_dropout:
        return None
    if paired and shape[1] % 2 == 0:
        return _paired_dropout(rk, -1 - n0, cfg, shape)
    n = n0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    return _dropout_factor(rk, -1 - n, cfg)


def _load_keys(r, b, h, i0, cfg):
    """The dropout row keys (BQ,) of the query tile at i0, or None."""
    if not cfg.has_dropout:
        return None
    rows = i0 + lax.iota(jnp.int32, cfg.block_q)
    return plt.load(
        r["rk"].at[b, h, pl.ds(i0, cfg.block_q)], mask=rows < cfg.queries, other=0
    )


def _dropped(x, keep):
    return x if keep is None else x * keep


def _persistent_logits(q, mk, n0, cfg):
    u = _dot_nt(q, mk, cfg) * cfg.scale_log2
    n = n0 + lax.broadcasted_iota(jnp.int32, u.shape, 1)
    return jnp.where(n < cfg.persistent, u, -jnp.inf)


def _load_persistent(ref, h, n0, cfg):
    rows = n0 + lax.iota(jnp.int32, cfg.block_n)
    return plt.load(
        ref.at[h, pl.ds(n0, cfg.block_n), :],
        mask=(rows < cfg.persistent)[:, None],
        other=0.0,
    )


def _unpack(refs, names):
    refs = list(refs)
    out = {}
    for name in names:
        out[name] = refs.pop(0) if name else None
    assert not refs, refs
    return out


def _input_names(cfg):
    names = ["q", "k", "v", "qp"]
    names += ["mk", "mv"] if cfg.persistent else []
    names += ["z"] if cfg.has_span else []
    names += ["rk"] if cfg.has_dropout else []
    return names


# ---------------------------------------------------------------------------
# Forward kernel
# ---------------------------------------------------------------------------


def _fwd_kernel(cfg, *refs):
    names = _input_names(cfg) + ["o", "lse"]
    if cfg.separate_persistent:
        names += ["o_ctx", "o_pers", "lse_p"]
    r = _unpack(refs, names)
    bq, bk, d = cfg.block_q, cfg.block_k, cfg.head_dim
    groups = cfg.groups(cfg.nq)
    g, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    z = r["z"][h].astype(jnp.float32) if cfg.has_span else None
    rmax = _span_limit(z, cfg)

    def tile_body(step, carry):
        qt = g + step * groups
        i0 = qt * bq
        q = _load_rows(r["q"], b, i0, h, bq, cfg.queries)
        rk = _load_keys(r, b, h, i0, cfg)
        kt_lo, kt_hi = _key_range(i0, rmax, cfg)

        # Dropout: without a span the forward hashes each column of a tile
        # (on an H200, fixed 2048, 2.094 -> 1.980 ms a layer), under a span
        # once for two columns (adaptive A 1280, 1.409 -> 1.357 ms): the
        # interleaving of the two halves costs the forward shuffles that
        # the span's own work hides. Same factors either way; the
        # backward kernels always pair.
        def key_body(kt, state, edge):
            j0 = kt * bk
            kb = _load_rows(r["k"], b, j0, h, bk, cfg.total)
            vb = _load_rows(r["v"], b, j0, h, bk, cfg.total)
            s = _dot_nt(q, kb, cfg) + _position_band(r["qp"], b, h, i0, j0, cfg)
            t = _context_logits(s, i0, j0, z, cfg, edge)
            keep = _context_dropout(rk, i0, j0, cfg, s.shape, paired=cfg.has_span)
            return _online_update(state, t, vb, cfg, keep)

        init = _online_init(bq, d)
        state = _split_loop(
            kt_lo, _key_split(i0, z, cfg), kt_hi, key_body, init
        )

        def pers_body(nt, state):
            n0 = nt * cfg.block_n
            mk = _load_persistent(r["mk"], h, n0, cfg)
            mv = _load_persistent(r["mv"], h, n0, cfg)
            u = _persistent_logits(q, mk, n0, cfg)
            keep = _persistent_dropout(rk, n0, cfg, u.shape, paired=cfg.has_span)
            return _online_update(state, u, mv, cfg, keep)

        if cfg.persistent and cfg.joint:
            state = lax.fori_loop(0, cfg.nn, pers_body, state)
        m_i, l_i, acc = state
        out = acc / l_i
        lse = (m_i + jnp.log2(l_i))[:, 0]
        if cfg.separate_persistent:
            init = _online_init(bq, d)
            m_p, l_p, acc_p = lax.fori_loop(0, cfg.nn, pers_body, init)
            out_p = acc_p / l_p
            _store_rows(r["o_ctx"], b, i0, h, bq, cfg.queries, out)
            _store_rows(r["o_pers"], b, i0, h, bq, cfg.queries, out_p)
            _store_vec(r["lse_p"], b, h, i0, bq, cfg.queries, (m_p + jnp.log2(l_p))[:, 0])
            out = out + out_p
        _store_rows(r["o"], b, i0, h, bq, cfg.queries, out)
        _store_vec(r["lse"], b, h, i0, bq, cfg.queries, lse)
        return carry

    steps = _idiv(cfg.nq - g + groups - 1, groups)
    lax.fori_loop(0, steps, tile_body, 0)


# ---------------------------------------------------------------------------
# Backward kernels
# ---------------------------------------------------------------------------


def _dkdv_kernel(cfg, *refs):
    names = _input_names(cfg) + ["do", "lse", "delta", "dk", "dv"]
    r = _unpack(refs, names)
    bq, bk, d = cfg.block_q, cfg.block_k, cfg.head_dim
    groups = cfg.groups(cfg.nk)
    g, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    z = r["z"][h].astype(jnp.float32) if cfg.has_span else None
    rmax = _span_limit(z, cfg)

    def tile_body(step, carry):
        kt = g + step * groups
        j0 = kt * bk
        kb = _load_rows(r["k"], b, j0, h, bk, cfg.total)
        vb = _load_rows(r["v"], b, j0, h, bk, cfg.total)
        # Query tiles holding a query that sees a key of this tile.
        i_lo = jnp.maximum(j0 - cfg.length + 1, 0)
        i_hi = jnp.minimum(cfg.queries - 1, j0 + bk - 1 - cfg.length + rmax)
        qt_lo = _idiv(i_lo, bq)
        qt_hi = jnp.where(i_hi >= i_lo, _idiv(jnp.maximum(i_hi, 0), bq) + 1, qt_lo)

        def q_body(qt, state, edge):
            dk, dv = state
            i0 = qt * bq
            q = _load_rows(r["q"], b, i0, h, bq, cfg.queries)
            do = _load_rows(r["do"], b, i0, h, bq, cfg.queries)
            lse = _load_vec(r["lse"], b, h, i0, bq, cfg.queries)
            delta = _load_vec(r["delta"], b, h, i0, bq, cfg.queries)
            s = _dot_nt(q, kb, cfg) + _position_band(r["qp"], b, h, i0, j0, cfg)
            p, _, _, _ = _tile_probs(s, i0, j0, z, lse, cfg, edge)
            keep = _context_dropout(_load_keys(r, b, h, i0, cfg), i0, j0, cfg, s.shape)
            dv = dv + _dot_tn(_dropped(p, keep).astype(do.dtype), do, cfg)
            dp = _dropped(_dot_nt(do, vb, cfg), keep)
            ds = p * (dp - delta[:, None])
            dk = dk + _dot_tn(ds.astype(q.dtype), q, cfg)
            return dk, dv

        init = (jnp.zeros((bk, d), jnp.float32), jnp.zeros((bk, d), jnp.float32))
        # One loop that decides per tile: on the H200 (D 64, dropout 0.3, A
        # 1280, spans 1024) splitting it at the span's edge as the forward
        # and dQ do made this kernel slower, 1.82 against 1.31 ms a layer.
        edge = None if cfg.has_span else False
        dk, dv = lax.fori_loop(
            qt_lo, qt_hi, functools.partial(q_body, edge=edge), init
        )
        _store_rows(r["dk"], b, j0, h, bk, cfg.total, dk * cfg.scale)
        _store_rows(r["dv"], b, j0, h, bk, cfg.total, dv)
        return carry

    steps = _idiv(cfg.nk - g + groups - 1, groups)
    lax.fori_loop(0, steps, tile_body, 0)


def _dq_kernel(cfg, *refs):
    names = _input_names(cfg) + ["do", "lse", "delta"]
    if cfg.separate_persistent:
        names += ["lse_p", "delta_p"]
    names += ["dq", "ds", "dz"]
    r = _unpack(refs, names)
    bq, bk, d = cfg.block_q, cfg.block_k, cfg.head_dim
    groups = cfg.groups(cfg.nq)
    g, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    z = r["z"][h].astype(jnp.float32) if cfg.has_span else None
    rmax = _span_limit(z, cfg)
    store_ds = not _DEBUG["skip_ds_store"]

    def tile_body(step, dz):
        qt = g + step * groups
        i0 = qt * bq
        q = _load_rows(r["q"], b, i0, h, bq, cfg.queries)
        do = _load_rows(r["do"], b, i0, h, bq, cfg.queries)
        lse = _load_vec(r["lse"], b, h, i0, bq, cfg.queries)
        delta = _load_vec(r["delta"], b, h, i0, bq, cfg.queries)
        rk = _load_keys(r, b, h, i0, cfg)
        kt_lo, kt_hi = _key_range(i0, rmax, cfg)

        if store_ds and not _DEBUG["skip_zero_tiles"]:
            # dS is zero at the distances the span skips: write those tiles
            # (all of the band that lies before kt_lo) so that every entry
            # of the (M, A) layout is written once.
            kt_first, _ = _key_range(i0, cfg.length, cfg)
            zeros = jnp.zeros((bq, bk), jnp.float32)

            def zero_body(kt, carry):
                _store_band(r["ds"], b, h, i0, kt * bk, cfg, zeros)
                return carry

            lax.fori_loop(kt_first, kt_lo, zero_body, 0)

        def key_body(kt, state, edge):
            dq, dz = state
            j0 = kt * bk
            kb = _load_rows(r["k"], b, j0, h, bk, cfg.total)
            vb = _load_rows(r["v"], b, j0, h, bk, cfg.total)
            s = _dot_nt(q, kb, cfg) + _position_band(r["qp"], b, h, i0, j0, cfg)
            p, valid, free, raw = _tile_probs(s, i0, j0, z, lse, cfg, edge)
            keep = _context_dropout(rk, i0, j0, cfg, s.shape)
            dp = _dropped(_dot_nt(do, vb, cfg), keep)
            ds = p * (dp - delta[:, None])
            dq = dq + _dot_nn(ds.astype(kb.dtype), kb, cfg)
            if store_ds:
                _store_band(r["ds"], b, h, i0, j0, cfg, ds)
            if edge and not _DEBUG["skip_ramp_sum"]:
                # d/dz over the distances whose unclipped mask lies in
                # [0, 1], ends included (torch.clamp's gradient in the
                # reference): exp(s - lse) (dP - Delta) = free (dP - Delta),
                # which equals dS / m inside the ramp and stays defined
                # where m = 0. Only the edge tiles reach the ramp.
                ramp = valid & (raw >= 0.0) & (raw <= 1.0)
                contrib = jnp.where(ramp, free * (dp - delta[:, None]), 0.0)
                dz = dz + jnp.sum(jnp.sum(contrib, axis=1), axis=0)
            return dq, dz

        dq, dz = _split_loop(
            kt_lo, _key_split(i0, z, cfg), kt_hi, key_body,
            (jnp.zeros((bq, d), jnp.float32), dz),
        )

        if cfg.persistent:
            lse_p, delta_p = lse, delta
            if cfg.separate_persistent:
                lse_p = _load_vec(r["lse_p"], b, h, i0, bq, cfg.queries)
                delta_p = _load_vec(r["delta_p"], b, h, i0, bq, cfg.queries)

            def pers_body(nt, dq):
                n0 = nt * cfg.block_n
                mk = _load_persistent(r["mk"], h, n0, cfg)
                mv = _load_persistent(r["mv"], h, n0, cfg)
                u = _persistent_logits(q, mk, n0, cfg)
                a = jnp.exp2(u - lse_p[:, None])
                keep = _persistent_dropout(rk, n0, cfg, u.shape)
                du = a * (_dropped(_dot_nt(do, mv, cfg), keep) - delta_p[:, None])
                return dq + _dot_nn(du.astype(mk.dtype), mk, cfg)

            dq = lax.fori_loop(0, cfg.nn, pers_body, dq)
        _store_rows(r["dq"], b, i0, h, bq, cfg.queries, dq)
        return dz

    steps = _idiv(cfg.nq - g + groups - 1, groups)
    dz = lax.fori_loop(0, steps, tile_body, jnp.float32(0.0))
    r["dz"][g, h, b] = dz * (cfg.max_span / cfg.span_ramp if cfg.has_span else 0.0)


def _persistent_kernel(cfg, *refs):
    names = ["q", "mk", "mv", "do", "lse", "delta"]
    names += ["rk"] if cfg.has_dropout else []
    names += ["dmk", "dmv"]
    r = _unpack(refs, names)
    bq, bn, d = cfg.block_q, cfg.block_n, cfg.head_dim
    nt, h, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bgroups = _persistent_groups(cfg)
    n0 = nt * bn
    mk = _load_persistent(r["mk"], h, n0, cfg)
    mv = _load_persistent(r["mv"], h, n0, cfg)
    rows_per_b = cfg.nq
    nb_local = _idiv(cfg.batch - g + bgroups - 1, bgroups)

    def body(step, state):
        dmk, dmv = state
        b = g + _idiv(step, rows_per_b) * bgroups
        i0 = lax.rem(step, rows_per_b) * bq
        q = _load_rows(r["q"], b, i0, h, bq, cfg.queries)
        do = _load_rows(r["do"], b, i0, h, bq, cfg.queries)
        lse = _load_vec(r["lse"], b, h, i0, bq, cfg.queries)
        delta = _load_vec(r["delta"], b, h, i0, bq, cfg.queries)
        u = _persistent_logits(q, mk, n0, cfg)
        rows = i0 + lax.broadcasted_iota(jnp.int32, u.shape, 0)
        a = jnp.where(rows < cfg.queries, jnp.exp2(u - lse[:, None]), 0.0)
        keep = _persistent_dropout(_load_keys(r, b, h, i0, cfg), n0, cfg, u.shape)
        dmv = dmv + _dot_tn(_dropped(a, keep).astype(do.dtype), do, cfg)
        du = a * (_dropped(_dot_nt(do, mv, cfg), keep) - delta[:, None])
        dmk = dmk + _dot_tn(du.astype(q.dtype), q, cfg)
        return dmk, dmv

    init = (jnp.zeros((bn, d), jnp.float32), jnp.zeros((bn, d), jnp.float32))
    dmk, dmv = lax.fori_loop(0, nb_local * rows_per_b, body, init)
    rows = n0 + lax.iota(jnp.int32, bn)
    mask = (rows < cfg.persistent)[:, None]
    plt.store(r["dmk"].at[g, h, pl.ds(n0, bn), :], dmk * cfg.scale, mask=mask)
    plt.store(r["dmv"].at[g, h, pl.ds(n0, bn), :], dmv, mask=mask)


def _persistent_groups(cfg):
    per = cfg.nn * cfg.heads
    return int(min(cfg.batch, max(1, -(-cfg.programs // per))))


# ---------------------------------------------------------------------------
# pallas_call wrappers
# ---------------------------------------------------------------------------


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype)


def _position_scores(cfg, q, pos):
    """QP (B, M, H, A) = Q P in the dtype of q, float32 accumulation: one
    (B M H, D) x (D, A) matmul, no transpose."""
    return jnp.einsum(
        "bmhd,da->bmha", q, pos, precision=cfg.precision,
        preferred_element_type=jnp.float32,
    ).astype(q.dtype)


def _inputs(cfg, q, k, v, qp, mk, mv, z, rk):
    args = [q, k, v, qp]
    if cfg.persistent:
        args += [mk, mv]
    if cfg.has_span:
        args += [z]
    if cfg.has_dropout:
        args += [rk]
    return args


def position_chunks(batch, heads, queries, length, itemsize):
    """Batch chunks the Pallas passes run one after the other: the fewest (a
    divisor of `batch`) whose position scores, `heads * queries * length`
    values of `itemsize` bytes per batch row, fit
    `kernel_settings.position_bytes()`."""
    cap = position_bytes()
    per_row = heads * queries * length * itemsize
    for n in range(1, batch + 1):
        if batch % n == 0 and (batch // n) * per_row <= cap:
            return n
    return batch


def _batch_chunks(cfg, itemsize):
    return position_chunks(
        cfg.batch, cfg.heads, cfg.queries, cfg.length, itemsize
    )


def _over_chunks(fn, xs, n, batched, inplace=()):
    """`fn` over `n` batch chunks of `xs`, one after the other.

    `fn` takes the chunks of `xs` (arrays with the batch axis first, or
    None) and returns a tuple. The outputs at the positions in `batched`
    have the batch axis first and are merged into one buffer, each chunk's
    rows written in place; the others (float32 partial sums) are added up
    in chunk order, so the result is reproducible. `inplace` pairs (output
    position, input position): the input's buffer takes that output chunk
    by chunk (each chunk is read before its rows are overwritten); where
    the input is still needed after this call, XLA copies it first.

    Not `lax.map`: its stacked outputs start as constant-filled buffers,
    and XLA moved those fills of every layer of a model to one place early
    in the step (merged into one fusion), so every layer's dK and dV
    buffers were alive at once: 1.1 GiB a layer at A = 8192, B = 64,
    enwik8_large ran out of memory at full span. Here the first chunk
    runs before the loop and the buffers start from its results (or from
    the inputs they replace), so each exists only while its layer runs.
    """
    if n == 1:
        return list(fn(xs))
    size = xs[next(i for i, x in enumerate(xs) if x is not None)].shape[0] // n
    outputs_of = dict(inplace)

    def chunk(x, i):
        if x is None:
            return None
        return lax.dynamic_slice_in_dim(x, i * size, size, axis=0)

    first = fn(tuple(chunk(x, 0) for x in xs))
    buffers, sums = {}, {}
    for j, out in enumerate(first):
        if out is None:
            continue
        if j not in batched:
            sums[j] = out
            continue
        if j in outputs_of:
            base = xs[outputs_of[j]]
        else:
            base = jnp.broadcast_to(out[None], (n,) + out.shape)
            base = base.reshape((n * size,) + out.shape[1:])
        buffers[j] = lax.dynamic_update_slice_in_dim(base, out, 0, axis=0)
    # Inputs whose buffer an output took are read from that buffer.
    from_buffer = {i: j for j, i in outputs_of.items()}

    def step(i, carry):
        buffers, sums = carry
        args = tuple(
            chunk(buffers[from_buffer[k]] if k in from_buffer else x, i)
            for k, x in enumerate(xs)
        )
        out = fn(args)
        buffers = {
            j: lax.dynamic_update_slice_in_dim(b, out[j], i * size, axis=0)
            for j, b in buffers.items()
        }
        sums = {j: s + out[j] for j, s in sums.items()}
        return buffers, sums

    buffers, sums = lax.fori_loop(1, n, step, (buffers, sums))
    merged = {**buffers, **sums}
    return [merged.get(j) for j in range(len(first))]


def _forward(cfg, q, k, v, pos, mk, mv, z, rk):
    n = _batch_chunks(cfg, q.dtype.itemsize)
    part = dataclasses.replace(cfg, batch=cfg.batch // n)

    def body(xs):
        qc, kc, vc, rkc = xs
        return _forward_chunk(part, qc, kc, vc, pos, mk, mv, z, rkc)

    outputs = 5 if cfg.separate_persistent else 2
    return _over_chunks(body, (q, k, v, rk), n, batched=range(outputs))


def _forward_chunk(cfg, q, k, v, pos, mk, mv, z, rk):
    B, M, H, D = q.shape
    groups = cfg.groups(cfg.nq)
    qp = _position_scores(cfg, q, pos)
    out_shape = [_sds((B, M, H, D), q.dtype), _sds((B, H, M), jnp.float32)]
    if cfg.separate_persistent:
        out_shape += [
            _sds((B, M, H, D), jnp.float32),
            _sds((B, M, H, D), jnp.float32),
            _sds((B, H, M), jnp.float32),
        ]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg),
        grid=(groups, H, B),
        out_shape=out_shape,
        compiler_params=cfg.compiler_params(),
        interpret=cfg.interpret,
        name="all_attention_fwd",
    )(*_inputs(cfg, q, k, v, qp, mk, mv, z, rk))


def _deltas(cfg, res, do):
    """Row sums dO . O (context / persistent parts), float32 (B, H, M)."""
    _, _, _, _, _, _, _, _, o, _, o_ctx, o_pers, _ = res
    dof = do.astype(jnp.float32)

    def row_dot(x):  # (B, M, H, D) -> (B, H, M)
        return jnp.transpose(jnp.sum(dof * x.astype(jnp.float32), -1), (0, 2, 1))

    if cfg.separate_persistent:
        return row_dot(o_ctx), row_dot(o_pers)
    return row_dot(o), None


def _dkdv_call(cfg, res, qp, do, delta):
    cfg = cfg.dkdv
    q, k, v, _, mk, mv, z, rk, _, lse, _, _, _ = res
    H, B = cfg.heads, cfg.batch
    groups = cfg.groups(cfg.nk)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg),
        grid=(groups, H, B),
        out_shape=[_sds(k.shape, k.dtype), _sds(v.shape, v.dtype)],
        compiler_params=cfg.compiler_params(),
        interpret=cfg.interpret,
        name="all_attention_dkdv",
    )(*_inputs(cfg, q, k, v, qp, mk, mv, z, rk), do, lse, delta)
    return dk, dv


def _dq_call(cfg, res, qp, do, delta, delta_p):
    """The kernel's share of dQ (context keys and persistent keys, unscaled,
    float32), the score gradients dS (B, M, H, A) and d span_ratio."""
    cfg = cfg.dq
    q, k, v, _, mk, mv, z, rk, _, lse, _, _, lse_p = res
    H, B = cfg.heads, cfg.batch
    f32 = jnp.float32
    groups = cfg.groups(cfg.nq)
    extra = [do, lse, delta]
    if cfg.separate_persistent:
        extra += [lse_p, delta_p]
    dq, ds, dz = pl.pallas_call(
        functools.partial(_dq_kernel, cfg),
        grid=(groups, H, B),
        out_shape=[
            _sds(q.shape, f32),
            _sds(qp.shape, q.dtype),
            _sds((groups, H, B), f32),
        ],
        compiler_params=cfg.compiler_params(),
        interpret=cfg.interpret,
        name="all_attention_dq",
    )(*_inputs(cfg, q, k, v, qp, mk, mv, z, rk), *extra)
    dz = jnp.sum(dz, axis=(0, 2)) if cfg.has_span else None
    return dq, ds, dz


def _position_gradients(cfg, q, pos, dq, ds):
    """Adds the position term's share `dS P^T` to the kernel's dQ and returns
    (dQ, d position_keys = Q^T dS summed over batch, heads and queries, in
    float32)."""
    f32 = jnp.float32
    dq = dq + jnp.einsum(
        "bmha,da->bmhd", ds, pos.astype(ds.dtype), precision=cfg.precision,
        preferred_element_type=f32,
    )
    dpos = jnp.einsum(
        "bmhd,bmha->da", q, ds.astype(q.dtype), precision=cfg.precision,
        preferred_element_type=f32,
    )
    return (dq * cfg.scale).astype(q.dtype), dpos * cfg.scale


def _persistent_call(cfg, res, do, delta, delta_p):
    q, _, _, _, mk, mv, _, rk, _, lse, _, _, lse_p = res
    H, D = cfg.heads, cfg.head_dim
    groups = _persistent_groups(cfg)
    lse_x = lse_p if cfg.separate_persistent else lse
    delta_x = delta_p if cfg.separate_persistent else delta
    dmk, dmv = pl.pallas_call(
        functools.partial(_persistent_kernel, cfg),
        grid=(cfg.nn, H, groups),
        out_shape=[
            _sds((groups, H, cfg.persistent, D), jnp.float32),
            _sds((groups, H, cfg.persistent, D), jnp.float32),
        ],
        compiler_params=cfg.compiler_params(),
        interpret=cfg.interpret,
        name="all_attention_persistent",
    )(q, mk, mv, do, lse_x, delta_x, *([rk] if cfg.has_dropout else []))
    return jnp.sum(dmk, axis=0), jnp.sum(dmv, axis=0)  # float32


# Indices of the residuals (see `_attention_fwd`) that have a batch axis.
_BATCHED = (0, 1, 2, 7, 8, 9, 10, 11, 12)


def _backward(cfg, res, do):
    q, pos, mk, mv = res[0], res[3], res[4], res[5]
    n = _batch_chunks(cfg, q.dtype.itemsize)
    part = dataclasses.replace(cfg, batch=cfg.batch // n)

    def body(xs):
        full = list(res)
        for i, x in zip(_BATCHED, xs[:-1]):
            full[i] = x
        return _backward_chunk(part, tuple(full), xs[-1])

    xs = tuple(res[i] for i in _BATCHED) + (do,)
    # dQ, dK and dV take the buffers of q, k and v (positions 0, 1, 2 of
    # xs), which the backward no longer needs once their chunk is done.
    grads = _over_chunks(
        body, xs, n, batched=(0, 1, 2), inplace=((0, 0), (1, 1), (2, 2))
    )
    dq, dk, dv, dpos, dmk, dmv, dz, _ = grads
    dpos = dpos.astype(pos.dtype)
    if cfg.persistent:
        dmk, dmv = dmk.astype(mk.dtype), dmv.astype(mv.dtype)
    # The dropout row keys are integers: no cotangent.
    return dq, dk, dv, dpos, dmk, dmv, dz, None


def _backward_chunk(cfg, res, do):
    """Gradients of one batch chunk; dpos, dmk, dmv, dz in float32."""
    q, pos = res[0], res[3]
    do = do.astype(q.dtype)
    delta, delta_p = _deltas(cfg, res, do)
    # Recomputed, not kept from the forward: the barrier stops XLA from
    # merging the two matmuls (common subexpressions), which would keep
    # every layer's QP alive from its forward to its backward.
    qp = _position_scores(cfg, *lax.optimization_barrier((q, pos)))
    dk, dv = _dkdv_call(cfg, res, qp, do, delta)
    dq, ds, dz = _dq_call(cfg, res, qp, do, delta, delta_p)
    dq, dpos = _position_gradients(cfg, q, pos, dq, ds)
    dmk = dmv = None
    if cfg.persistent:
        dmk, dmv = _persistent_call(cfg, res, do, delta, delta_p)
    # The dropout row keys are integers: no cotangent.
    return dq, dk, dv, dpos, dmk, dmv, dz, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, pos, mk, mv, z, rk):
    return _forward(cfg, q, k, v, pos, mk, mv, z, rk)[0]


def _attention_fwd(cfg, q, k, v, pos, mk, mv, z, rk):
    outs = _forward(cfg, q, k, v, pos, mk, mv, z, rk)
    o, lse = outs[0], outs[1]
    o_ctx = o_pers = lse_p = None
    if cfg.separate_persistent:
        o_ctx, o_pers, lse_p = outs[2:]
    return o, (q, k, v, pos, mk, mv, z, rk, o, lse, o_ctx, o_pers, lse_p)


def _attention_bwd(cfg, res, do):
    return _backward(cfg, res, do)


_attention.defvjp(_attention_fwd, _attention_bwd)


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------


def pallas_all_attention(
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
    interpret=False,
    block_q=64,
    block_k=64,
    block_n=None,
    num_warps=4,
    num_stages=2,
    precision=None,
    num_programs=_DEFAULT_PROGRAMS,
    backward_blocks=None,
    deterministic=None,
    dropout_rate=0.0,
    dropout_keys=None,
):
    """Fused all-attention with Pallas kernels, JAX backend.

    Computes the function of `portable_all_attention`, forward and
    backward, attention dropout included.

    Args:
        query: (B, M, H, D).
        key: (B, A + M, H, D), memory rows then block rows.
        value: (B, A + M, H, D).
        position_keys: (D, A), column `c` is the key of distance `A - c`.
        persistent_keys: None or (H, N, D), as used.
        persistent_values: None or (H, N, D), as used.
        span_ratio: None or (H,), the adaptive-span ratios `z` in [0, 1].
        max_span: int `L`, needed with `span_ratio`.
        span_ramp: int `R`.
        integration: "joint" or "separate".
        interpret: run the kernels with the Pallas interpreter (CPU tests).
        block_q: query tile of the forward kernel (power of two, >= 16).
        block_k: key tile of the forward kernel (power of two, >= 16).
        block_n: persistent tile (power of two, >= 16); default `block_k`.
        num_warps: Triton warps per program.
        num_stages: Triton software-pipelining depth.
        precision: None (default matmul precision: TF32 for float32 inputs
            on the GPU) or "highest" (exact float32 products).
        num_programs: programs a grid aims at; each program loops over
            `ceil(tiles / groups)` tiles.
        backward_blocks: None or a pair of tuples `(block_q, block_k)` or
            `(block_q, block_k, num_warps, num_stages)`: the tiles of the
            dK/dV and of the dQ kernel. None: `(block_q, block_k)` and
            `(block_q, block_k / 2, num_warps, num_stages + 1)` (tiles at
            least 16), the best of the shapes timed on an H200 for D = 64
            with the recipe's dropout (with 64x64 forward tiles: dK/dV
            64x64, dQ 64x32 with 3 stages).
        deterministic: None, True or False; accepted for the dispatcher's
            sake: the kernels' gradients are bitwise reproducible in every
            mode (no atomics, partials summed in a fixed order).
        dropout_rate: float in [0, 1), the attention dropout rate.
        dropout_keys: int32 (B, H, M) row keys of the dropout mask
            (`keras_allattn.ops.random.attention_dropout_keys` of the
            call's seed), needed when `dropout_rate > 0`.

    Returns:
        (B, M, H, D) outputs in the dtype of `query`.
    """
    cfg, args = _prepare(
        query, key, value, position_keys, persistent_keys, persistent_values,
        span_ratio, max_span, span_ramp, integration, interpret, block_q,
        block_k, block_n, num_warps, num_stages, precision, num_programs,
        backward_blocks, deterministic, dropout_rate, dropout_keys,
    )
    return _attention(cfg, *args)


def _prepare(
    query, key, value, position_keys, persistent_keys, persistent_values,
    span_ratio, max_span, span_ramp, integration, interpret, block_q,
    block_k, block_n, num_warps, num_stages, precision, num_programs,
    backward_blocks=None, deterministic=None, dropout_rate=0.0,
    dropout_keys=None,
):
    """Validates the arguments; returns the static config and kernel inputs."""
    resolve_deterministic(deterministic)  # validates the argument
    dropout_rate = float(dropout_rate)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(
            f"`dropout_rate` must be in [0, 1). Received: dropout_rate={dropout_rate}"
        )
    if integration not in INTEGRATIONS:
        raise ValueError(
            f"`integration` must be one of {INTEGRATIONS}. "
            f"Received: integration={integration!r}"
        )
    if (persistent_keys is None) != (persistent_values is None):
        raise ValueError(
            "`persistent_keys` and `persistent_values` must be given together."
        )
    if span_ratio is not None and max_span is None:
        raise ValueError("`max_span` is required with `span_ratio`.")
    if precision not in (None, "default", "highest"):
        raise ValueError(f"Unknown precision {precision!r}.")
    B, M, H, D = query.shape
    if dropout_rate > 0.0:
        if dropout_keys is None or tuple(dropout_keys.shape) != (B, H, M):
            raise ValueError(
                "`dropout_keys` must be an int32 (B, H, M) = "
                f"{(B, H, M)} array when dropout_rate > 0. Received: "
                f"dropout_keys with shape "
                f"{None if dropout_keys is None else tuple(dropout_keys.shape)}"
            )
    else:
        dropout_keys = None
    A = position_keys.shape[-1]
    if position_keys.shape != (D, A) or A < 1:
        raise ValueError(
            f"`position_keys` must be (D, A) with A >= 1; got {position_keys.shape}."
        )
    if key.shape != (B, A + M, H, D) or value.shape != key.shape:
        raise ValueError(
            f"`key` and `value` must be (B, A + M, H, D) = {(B, A + M, H, D)}; "
            f"got {key.shape} and {value.shape}."
        )
    block_n = block_k if block_n is None else block_n
    if backward_blocks is None:
        backward_blocks = (
            (block_q, block_k),
            (block_q, max(16, block_k // 2), num_warps, num_stages + 1),
        )
    try:
        kernels = []
        for blocks in backward_blocks:
            blocks = tuple(blocks)
            if len(blocks) == 2:
                blocks = blocks + (num_warps, num_stages)
            bq_, bk_, warps_, stages_ = blocks
            kernels.append((bq_, bk_, int(warps_), int(stages_)))
        dkdv_blocks, dq_blocks = kernels
    except (TypeError, ValueError):
        raise ValueError(
            "`backward_blocks` must be a pair of (block_q, block_k[, num_warps, "
            f"num_stages]) tuples; got {backward_blocks!r}."
        ) from None
    tiles = (
        ("block_q", block_q), ("block_k", block_k), ("block_n", block_n),
        ("backward_blocks", dkdv_blocks[0]), ("backward_blocks", dkdv_blocks[1]),
        ("backward_blocks", dq_blocks[0]), ("backward_blocks", dq_blocks[1]),
    )
    for name, val in tiles:
        if not isinstance(val, int) or not _is_pow2(val) or val < 16:
            raise ValueError(f"`{name}` tiles must be powers of two >= 16; got {val}.")
    if not _is_pow2(D) or D < 16:
        raise ValueError(f"The head width must be a power of two >= 16; got {D}.")
    N = 0
    if persistent_keys is not None:
        N = persistent_keys.shape[1]
        if persistent_keys.shape != (H, N, D) or persistent_values.shape != (H, N, D):
            raise ValueError(
                "`persistent_keys`/`persistent_values` must be (H, N, D); got "
                f"{persistent_keys.shape} and {persistent_values.shape}."
            )
    cfg = _Config(
        batch=B,
        queries=M,
        length=A,
        heads=H,
        head_dim=D,
        persistent=N,
        has_span=span_ratio is not None,
        max_span=float(max_span) if span_ratio is not None else 0.0,
        span_ramp=float(span_ramp),
        joint=integration == "joint",
        block_q=block_q,
        block_k=block_k,
        block_n=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=bool(interpret),
        highest=precision == "highest",
        programs=int(num_programs),
        dkdv_blocks=dkdv_blocks,
        dq_blocks=dq_blocks,
        dropout=dropout_rate,
    )
    dtype = query.dtype
    pos = position_keys.astype(dtype)
    mk = mv = z = None
    if N:
        mk = persistent_keys.astype(dtype)
        mv = persistent_values.astype(value.dtype)
    if span_ratio is not None:
        z = span_ratio.astype(jnp.float32)
    key = key.astype(dtype)
    value = value.astype(dtype)
    rk = None if dropout_keys is None else dropout_keys.astype(jnp.int32)
    return cfg, (query, key, value, pos, mk, mv, z, rk)
