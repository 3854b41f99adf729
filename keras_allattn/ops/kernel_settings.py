"""The settings the dispatcher and both fused kernels share.

`attention.py` (the dispatch point), `pallas_attention.py` and
`triton_attention.py` import these; this module imports none of them, so
the kernels and the dispatcher do not import each other back.

- The integration strategies (SPEC §1): `INTEGRATIONS`.
- Deterministic mode. The Triton (PyTorch) backward adds the query
  gradient (and, in the in-kernel position design, the position-key
  gradient) with float32 atomics, so the order of the additions, hence the
  rounding, varies from run to run (the Pallas kernels use no atomics and
  need no mode). `set_deterministic(True)` (or
  `KERAS_ALLATTN_DETERMINISTIC=1` in the environment, the default until
  `set_deterministic` is called) computes the query gradient in a kernel
  of its own, one program a query tile, and gives every program its own
  position-gradient buffer, summed in a fixed order afterwards. The mode is read when a kernel is called: on PyTorch at
  every forward call, on JAX when the function is traced.
- Tile sizes: a tile (and the head width the kernels tile by) is a power
  of two of at least `MIN_TILE`.
- The Triton kernels' position design (`triton_position`): "matmul" (the
  default) or "in_kernel", from `KERAS_ALLATTN_TRITON_POSITION`, so a
  whole training step can run either design without code changes.
- The cap on the position scores of one pass (`position_bytes`): where QP
  (and its gradient dS) of the whole batch would exceed it, the kernels run
  their passes over batch chunks, one after the other, so the transients
  stay near the cap whatever the span.
"""

import os

INTEGRATIONS = ("joint", "separate")

# The smallest tile of a fused kernel's `tl.dot`/`pl.dot` (and head width).
MIN_TILE = 16


def is_power_of_two(x):
    """Whether the int `x` is 1, 2, 4, 8, ..."""
    return x >= 1 and (x & (x - 1)) == 0


def tile_size_reason(head_dim):
    """Why no fused kernel tiles this head width, or "" if one does."""
    if head_dim < MIN_TILE or not is_power_of_two(head_dim):
        return f"the head width {head_dim} is not a power of 2 >= {MIN_TILE}"
    return ""


_FLAG_VALUES = {"1": True, "true": True, "yes": True, "on": True,
                "0": False, "false": False, "no": False, "off": False}


def env_flag(name, default):
    """The on/off environment variable `name`: 1/true/yes/on or
    0/false/no/off (any case, spaces ignored), `default` where it is unset
    or empty; anything else raises a ValueError naming it and its value."""
    value = os.environ.get(name, "")
    if not value.strip():
        return default
    try:
        return _FLAG_VALUES[value.strip().lower()]
    except KeyError:
        raise ValueError(
            f"The environment variable {name} must be one of 1/true/yes/on "
            f"or 0/false/no/off. Received: {name}={value!r}"
        ) from None


DETERMINISTIC_ENV = "KERAS_ALLATTN_DETERMINISTIC"
# None: not set in this process, the environment decides.
_deterministic = None


def set_deterministic(enabled):
    """Switches the fused kernels' deterministic mode on or off.

    In deterministic mode the backward kernels give every program its own
    float32 copy of the position-key gradient (A x D, with the kernels'
    padding), summed in a fixed order afterwards, instead of spreading
    atomics over a few shared copies. This makes the kernels' gradients
    bitwise reproducible from run to run on the same device and shapes;
    each attention call's backward then holds, for a while:

    - Triton (PyTorch): `ceil(M / block_q) * B * H` copies: with B = 64,
      H = 8, block M = 512, span A = 2048, D = 64 and 64-query dQ tiles,
      4096 x 0.5 MiB = 2 GiB (8 copies, 4 MiB, otherwise).
    - Pallas (JAX): nothing: its kernels use no atomics (the position-key
      gradient is a matmul outside them), so their gradients are bitwise
      reproducible in both modes.

    The rest of the computation must be reproducible too: on PyTorch,
    `torch.use_deterministic_algorithms(True)` and
    `CUBLAS_WORKSPACE_CONFIG=:4096:8` (set before CUDA starts); on JAX,
    `XLA_FLAGS=--xla_gpu_deterministic_ops=true` (set before JAX starts its
    GPU backend). `benchmarks/loss_match.py --deterministic` sets all three.

    The mode is read when a kernel is called (PyTorch) or traced (JAX): JAX
    functions already traced keep the mode they were traced with.

    Args:
        enabled: bool, whether to run deterministically. Overrides the
            `KERAS_ALLATTN_DETERMINISTIC` environment variable.
    """
    global _deterministic
    if not isinstance(enabled, bool):
        raise ValueError(
            "`enabled` must be True or False. "
            f"Received: enabled={enabled!r} (of type {type(enabled).__name__})"
        )
    _deterministic = enabled


def is_deterministic():
    """Whether the fused kernels run in deterministic mode.

    The value of `set_deterministic` if it was called, else that of the
    environment variable `KERAS_ALLATTN_DETERMINISTIC` (1/true/yes/on or
    0/false/no/off, default off).
    """
    if _deterministic is not None:
        return _deterministic
    return env_flag(DETERMINISTIC_ENV, False)


def resolve_deterministic(deterministic):
    """A kernel's `deterministic` argument: None means `is_deterministic()`."""
    if deterministic is None:
        return is_deterministic()
    if not isinstance(deterministic, bool):
        raise ValueError(
            "`deterministic` must be None, True or False. "
            f"Received: deterministic={deterministic!r}"
        )
    return deterministic


TRITON_POSITION_ENV = "KERAS_ALLATTN_TRITON_POSITION"
TRITON_POSITIONS = ("in_kernel", "matmul")


def triton_position():
    """The Triton kernels' default position design (see
    `keras_allattn.ops.triton_attention`): the environment variable
    `KERAS_ALLATTN_TRITON_POSITION`, "matmul" (the default) or "in_kernel".
    Read at every kernel call; a compiled PyTorch graph keeps the design it
    was traced with."""
    value = os.environ.get(TRITON_POSITION_ENV, "").strip().lower() or "matmul"
    if value not in TRITON_POSITIONS:
        raise ValueError(
            f"The environment variable {TRITON_POSITION_ENV} must be one of "
            f"{TRITON_POSITIONS}. Received: {TRITON_POSITION_ENV}="
            f"{os.environ.get(TRITON_POSITION_ENV)!r}"
        )
    return value


POSITION_BYTES_ENV = "KERAS_ALLATTN_POSITION_BYTES"
# 1 GiB: one pass over the whole batch up to B * H * M * A = 2**29 bfloat16
# scores (B = 64, H = 8, M = 512, A = 2048), where chunks cost copies (the
# inputs sliced, the outputs gathered: 11 of 190 ms a step at fixed span 2048
# with 512 MiB); at A = 8192 the scores of the whole batch would take 4 GiB.
POSITION_BYTES = 2**30


def position_bytes():
    """The cap in bytes on the position scores QP (and dS) of one kernel
    pass: `KERAS_ALLATTN_POSITION_BYTES` in the environment if set (a
    positive number of bytes), else `POSITION_BYTES` (1 GiB). Read when a
    kernel is called (PyTorch) or traced (JAX)."""
    value = os.environ.get(POSITION_BYTES_ENV, "").strip()
    if not value:
        return POSITION_BYTES
    if not value.isdigit() or int(value) < 1:
        raise ValueError(
            f"The environment variable {POSITION_BYTES_ENV} must be a "
            f"positive number of bytes. Received: {POSITION_BYTES_ENV}="
            f"{os.environ.get(POSITION_BYTES_ENV)!r}"
        )
    return int(value)
