"""Counter-based attention dropout, one function for every implementation.

The dropout mask of an attention weight is a pure function of the call's
seed and the weight's position, so that the portable path, the Pallas
kernel and the Triton kernel draw the very same mask, and a backward pass
(or a recomputation under remat) regenerates the forward's mask from the
seed alone, without storing it.

The function, in unsigned 32-bit arithmetic (all products modulo 2^32):

    mix(x):  x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15;
             x *= 0x846CA68B; x ^= x >> 16          (a bijection of uint32)
    call key   k = mix(s0 ^ mix(s1 + 0x9E3779B9))   (seed (s0, s1))
    row key    K[b, h, i] = mix(k + ((b H + h) M + i) * 0x9E3779B9)
    weight     x = mix(K[b, h, i] ^ ((u >> 1) * 0x85EBCA6B))
               bits = (x >> 16 (u & 1)) & 0xFFFF
    kept       iff bits < round((1 - rate) 2^16)

with `u` the column id of the weight. For a context key it is the key's
place counted from the last key, `e = M - 1 - i + r` for the query `i`
(0-based in its block of M) at distance `r = 1 .. A`: it does not change
when the attended length A is trimmed, so a key keeps its mask. For the
persistent vector `n = 0 .. N-1` it is `u = 2^32 - 1 - n`. Two weights of
a row whose ids differ only in the last bit (adjacent keys, adjacent
persistent vectors) share one hash and take its two 16-bit halves, so a
kernel hashes once for two weights. Kept weights are scaled by
`1 / (1 - rate)`; a weight is kept with probability `round((1 - rate)
2^16) / 2^16` (0.7000122 for the recipe's rate 0.3).
The seed is a `keras.random.SeedGenerator` draw, which
differs per layer (the generator's own seed) and per step (its counter).
The row keys (B, H, M) are computed once per call with `keras.ops`
(`attention_dropout_keys`); the kernels receive them as a tensor, so a
batch-sharded kernel sees the rows of the full batch's keys and draws the
mask of a single-device run.

The portable path works in int32 (two's complement products wrap as the
unsigned ones do; right shifts are made logical by masking), the kernels
in uint32; the tests compare all of them with a NumPy uint32 transcription.
"""

from keras import ops

# The constants as int32 (two's complement of the uint32 values above).
MIX_1 = 0x7FEB352D
MIX_2 = 0x846CA68B - 2**32
GOLDEN = 0x9E3779B9 - 2**32
COLUMN = 0x85EBCA6B - 2**32
# Uniform bits compared with the keep threshold: a hash's half.
KEEP_BITS = 16


def keep_threshold(rate):
    """The integer threshold of `bits < threshold` for a dropout rate."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(
            f"`rate` must be in [0, 1). Received: rate={rate!r}"
        )
    return int(round((1.0 - rate) * 2**KEEP_BITS))


def _srl(x, shift):
    """Logical right shift of int32 values."""
    return ops.bitwise_and(
        ops.right_shift(x, shift), (1 << (32 - shift)) - 1
    )


def mix32(x):
    """The uint32 bijection `mix` on int32 tensors (see the module doc)."""
    x = ops.bitwise_xor(x, _srl(x, 16))
    x = x * MIX_1
    x = ops.bitwise_xor(x, _srl(x, 15))
    x = x * MIX_2
    return ops.bitwise_xor(x, _srl(x, 16))


def next_seed(generator):
    """The next seed of a `keras.random.SeedGenerator`, as its `next()`.

    The same draw and the same step of the generator's state (`[s, c]` ->
    `[s, c + 1]`), with the step `[0, 1]` made by `ops.arange` instead of
    a NumPy constant: in a traced PyTorch training step
    (`keras_allattn.compiling.torch_train_step`) the constant would be a
    host tensor copied to the device at every step, one synchronising
    copy a layer; `arange` is computed on the device.

    Args:
        generator: a `keras.random.SeedGenerator`.

    Returns:
        An integer tensor of shape (2,), the state before the step.
    """
    state = generator.state
    seed = state.value * 1
    state.assign(ops.add(state.value, ops.arange(2, dtype=state.dtype)))
    return seed


def attention_dropout_keys(seed, batch, heads, queries):
    """Row keys of the attention dropout of one call.

    Args:
        seed: an integer tensor of shape (2,), e.g.
            `next_seed(keras.random.SeedGenerator())`.
        batch: int, `B`.
        heads: int, `H`.
        queries: int, `M`.

    Returns:
        An int32 tensor (B, H, M).
    """
    seed = ops.cast(ops.convert_to_tensor(seed), "int32")
    call = mix32(ops.bitwise_xor(seed[0], mix32(seed[1] + GOLDEN)))
    index = ops.arange(batch * heads * queries, dtype="int32")
    keys = mix32(call + index * GOLDEN)
    return ops.reshape(keys, (batch, heads, queries))


def dropout_multiplier(keys, columns, rate):
    """The dropout factors 0 or `1 / (1 - rate)` of a block of weights.

    Args:
        keys: int32 row keys broadcastable against `columns`, e.g.
            (B, H, M, 1).
        columns: int32 column ids `u` (`context_columns`,
            `persistent_columns`), broadcastable against `keys`.
        rate: float in [0, 1).

    Returns:
        A float32 tensor of the broadcast shape.
    """
    columns = ops.convert_to_tensor(columns, "int32")
    x = mix32(ops.bitwise_xor(keys, _srl(columns, 1) * COLUMN))
    high = ops.equal(ops.bitwise_and(columns, 1), 1)
    bits = ops.bitwise_and(ops.where(high, _srl(x, KEEP_BITS), x), (1 << KEEP_BITS) - 1)
    kept = ops.less(bits, keep_threshold(rate))
    return ops.cast(ops.where(kept, 1.0 / (1.0 - rate), 0.0), "float32")


def context_columns(queries, length):
    """Column ids (M, A) of the context scores in the layout by distance
    (column `c` holds distance `A - c`): the key's place from the last key,
    `M - 1 - i + A - c` for query `i`."""
    rows = ops.arange(queries - 1, -1, -1, dtype="int32")[:, None]
    return rows + ops.arange(length, 0, -1, dtype="int32")[None, :]


def persistent_columns(count):
    """Column ids of the persistent scores: `-1 - n` (2^32 - 1 - n as
    uint32) for vector `n`."""
    return -1 - ops.arange(count, dtype="int32")
