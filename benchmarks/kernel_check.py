"""Check and time the fused Pallas all-attention kernel on a GPU (JAX + CUDA).

For each configuration this script
  * checks the forward output and the gradients of every input against
    `portable_all_attention` (the keras.ops reference path), in float32
    (kernel with exact float32 products vs. the portable path at "highest"
    matmul precision, and both at default/TF32 precision) and in bfloat16
    (kernel on bf16 inputs vs. the float32 portable path on the same
    bf16-rounded inputs, next to the portable path's own bf16 error), on a
    slice of the batch so that the portable path fits in memory;
  * times the kernel's forward and forward+backward (all gradients) at the
    full shape, with warm-up, `jax.block_until_ready` and the median of
    several runs, and the portable path's where it fits;
and prints one JSON line per configuration (errors are caught, printed in the
line as "error", and the script goes on).

Usage (on the GPU machine, Keras importable, e.g. from carried wheels):

    KERAS_BACKEND=jax python3 benchmarks/kernel_check.py            # all
    KERAS_BACKEND=jax python3 benchmarks/kernel_check.py --only smoke_odd_shapes,enwik8_small_bf16
    KERAS_BACKEND=jax python3 benchmarks/kernel_check.py --sweep    # tile sweep
    KERAS_BACKEND=jax python3 benchmarks/kernel_check.py --profile --only enwik8_small_bf16
    KERAS_BACKEND=jax python3 benchmarks/kernel_check.py --list

`--profile` times each kernel separately (forward, the position scores,
dK/dV, dQ with and without its dS store, the position-term gradients,
persistent) for the tile shapes in
PROFILE_TILES. Measured on an H100 (jax 0.11.2, triton 3.6), default tiles,
enwik8_small_bf16: forward 2.7 ms vs 7.4 ms for the portable path, forward +
backward 13.8 ms vs 18.6 ms; adaptive_L8192_span1k_bf16: 10.8 ms vs 64.5 ms.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from keras_allattn.ops.pallas_attention import pallas_all_attention  # noqa: E402

GRAD_NAMES = ("dq", "dk", "dv", "dpos", "dmk", "dmv", "dz")

# Span ratios are chosen with z * max_span away from integers: where z L is an
# integer a distance enters the span with m = 0+, the derivative in z jumps
# there, and float32 rounding decides which side a computation lands on.
#
# name -> shape and options. `check_batch` rows are used for the accuracy
# check against the portable path; timings use `batch` rows.
CONFIGS = {
    # Small odd shapes (A, M not multiples of the tiles, masked distances,
    # ramp, separate softmaxes): a quick correctness check of the compiled
    # kernels with several tile shapes.
    "smoke_odd_shapes": dict(
        batch=3, queries=77, length=300, heads=4, head_dim=64, persistent=40,
        span=(0.0537, 0.3137, 0.7137, 1.0), max_span=320, integration="joint",
        dtypes=("float32", "bfloat16"), time=False,
        kernel=dict(block_q=64, block_k=64),
    ),
    "smoke_separate_q128_k32": dict(
        batch=2, queries=200, length=333, heads=2, head_dim=64, persistent=70,
        span=(0.2137, 0.9137), max_span=400, integration="separate",
        dtypes=("float32",), time=False,
        kernel=dict(block_q=128, block_k=32, num_warps=8, num_stages=2),
    ),
    "smoke_context_only_q32_k128": dict(
        batch=2, queries=129, length=257, heads=3, head_dim=32, persistent=0,
        span=None, integration="joint", dtypes=("float32",), time=False,
        kernel=dict(block_q=32, block_k=128, num_stages=1),
    ),
    # enwik8-small layer geometry: fixed span 2048, 1024 persistent vectors.
    "enwik8_small_bf16": dict(
        batch=64, queries=512, length=2048, heads=8, head_dim=64,
        persistent=1024, span=None, integration="joint",
        dtypes=("bfloat16",), check_batch=4,
    ),
    "enwik8_small_fp32": dict(
        batch=64, queries=512, length=2048, heads=8, head_dim=64,
        persistent=1024, span=None, integration="joint",
        dtypes=("float32",), check_batch=4,
    ),
    "enwik8_small_bf16_separate": dict(
        batch=64, queries=512, length=2048, heads=8, head_dim=64,
        persistent=1024, span=None, integration="separate",
        dtypes=("bfloat16",), check_batch=4,
    ),
    # Adaptive span, L = A = 8192, learned spans ~1024 (z L + R ~ 750..1350):
    # the kernel skips the key tiles beyond each head's span.
    "adaptive_L8192_span1k_bf16": dict(
        batch=64, queries=512, length=8192, heads=8, head_dim=64,
        persistent=1024, max_span=8192,
        span=tuple(float(x) for x in (np.linspace(0.088, 0.16, 8) + 1.37e-5).round(7)),
        integration="joint", dtypes=("bfloat16",), check_batch=2,
    ),
    # What training at spans near 1024 runs: the memory trimmed to 1152 rows
    # (span_granularity "auto", the default), every head at span 1024
    # (z L = 992.05); and to 1280 rows (span_granularity 256, the default
    # until f3c2cbf).
    "adaptive_A1152_span1k_bf16": dict(
        batch=64, queries=512, length=1152, heads=8, head_dim=64,
        persistent=1024, max_span=8192, span=(0.1211,) * 8,
        integration="joint", dtypes=("bfloat16",), check_batch=2,
    ),
    "adaptive_A1280_span1k_bf16": dict(
        batch=64, queries=512, length=1280, heads=8, head_dim=64,
        persistent=1024, max_span=8192, span=(0.1211,) * 8,
        integration="joint", dtypes=("bfloat16",), check_batch=2,
    ),
    # The same with fixed spans of 1024 (A = 1024, no mask) and with the full
    # span 8192 (z = 1): cost should follow the span, not A.
    "fixed_A1024_bf16": dict(
        batch=64, queries=512, length=1024, heads=8, head_dim=64,
        persistent=1024, span=None, integration="joint",
        dtypes=("bfloat16",), check=False,
    ),
    "adaptive_L8192_full_span_bf16": dict(
        batch=64, queries=512, length=8192, heads=8, head_dim=64,
        persistent=1024, max_span=8192, span=(1.0,) * 8,
        integration="joint", dtypes=("bfloat16",), check=False,
        time_portable=False,
    ),
}

SWEEP = [
    dict(block_q=64, block_k=64, num_warps=4, num_stages=2),
    dict(block_q=128, block_k=64, num_warps=8, num_stages=3),
    dict(block_q=128, block_k=64, num_warps=4, num_stages=2),
    dict(block_q=64, block_k=64, num_warps=4, num_stages=2,
         backward_blocks=((64, 64, 4, 2), (64, 64, 4, 3))),
    dict(block_q=64, block_k=64, num_warps=4, num_stages=2,
         backward_blocks=((32, 128, 8, 2), (128, 32, 8, 3))),
    dict(block_q=64, block_k=64, num_warps=4, num_stages=2,
         backward_blocks=((64, 128, 8, 2), (128, 64, 8, 2))),
    dict(block_q=64, block_k=64, num_warps=4, num_stages=3),
    dict(block_q=64, block_k=64, num_warps=8, num_stages=2),
    dict(block_q=128, block_k=64, num_warps=8, num_stages=2),
    dict(block_q=64, block_k=128, num_warps=8, num_stages=2),
    dict(block_q=128, block_k=128, num_warps=8, num_stages=2),
    dict(block_q=32, block_k=64, num_warps=4, num_stages=2),
]


def make_inputs(cfg, batch, dtype, seed=0):
    rng = np.random.default_rng(seed)
    b, m, a = batch, cfg["queries"], cfg["length"]
    h, d, n = cfg["heads"], cfg["head_dim"], cfg["persistent"]
    q = rng.normal(size=(b, m, h, d)).astype(np.float32)
    k = rng.normal(size=(b, a + m, h, d)).astype(np.float32)
    v = rng.normal(size=(b, a + m, h, d)).astype(np.float32)
    pos = rng.normal(size=(d, a)).astype(np.float32)
    mk = rng.normal(size=(h, n, d)).astype(np.float32) if n else None
    mv = rng.normal(size=(h, n, d)).astype(np.float32) if n else None
    z = np.asarray(cfg["span"], np.float32) if cfg.get("span") else None
    ct = rng.normal(size=(b, m, h, d)).astype(np.float32)
    # Inputs in `dtype` (activations); parameters stay float32 as in a model.
    arrays = [
        jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
        jnp.asarray(pos), None if mk is None else jnp.asarray(mk),
        None if mv is None else jnp.asarray(mv),
        None if z is None else jnp.asarray(z),
    ]
    return arrays, jnp.asarray(ct, dtype)


def span_kwargs(cfg):
    if cfg.get("span"):
        return dict(max_span=cfg["max_span"], span_ramp=cfg.get("ramp", 32))
    return dict(span_ramp=cfg.get("ramp", 32))


INTERPRET = [False]  # --interpret: Pallas interpreter (CPU smoke test of this script)
DROPOUT = [0.0]  # --dropout: attention dropout rate of the timed kernels


def dropout_options(q):
    """The kernel's dropout arguments for queries q (B, M, H, D)."""
    if not DROPOUT[0]:
        return {}
    from keras_allattn.ops.random import attention_dropout_keys

    b, m, h, _ = q.shape
    seed = jnp.asarray([1234, 5], jnp.uint32)
    return dict(dropout_rate=DROPOUT[0],
                dropout_keys=attention_dropout_keys(seed, b, h, m))


def kernel_fn(cfg, precision=None, **tiles):
    options = dict(cfg.get("kernel", {}))
    options.update(tiles)
    options["interpret"] = INTERPRET[0]

    def fn(q, k, v, pos, mk, mv, z):
        return pallas_all_attention(
            q, k, v, pos, mk, mv, z, integration=cfg["integration"],
            precision=precision, **span_kwargs(cfg), **options,
            **dropout_options(q),
        )

    return fn


def portable_fn(cfg):
    from keras_allattn.ops.attention import portable_all_attention

    def fn(q, k, v, pos, mk, mv, z):
        dropout = {}
        if DROPOUT[0]:  # the kernels' mask: same seed
            dropout = dict(dropout_rate=DROPOUT[0],
                           dropout_seed=jnp.asarray([1234, 5], jnp.uint32))
        return portable_all_attention(
            q, k, v, pos, mk, mv, z, integration=cfg["integration"],
            **span_kwargs(cfg), **dropout,
        )

    return fn


def fwd_bwd(fn, arrays):
    """jit-compiled (forward, forward+all-gradients) of fn on `arrays`."""
    present = [i for i, x in enumerate(arrays) if x is not None]

    def call(xs):
        full = list(arrays)
        for i, x in zip(present, xs):
            full[i] = x
        return fn(*full)

    fwd = jax.jit(call)

    @jax.jit
    def both(xs, ct):
        out, pullback = jax.vjp(call, xs)
        return out, pullback(ct)[0]

    xs = [arrays[i] for i in present]
    names = [GRAD_NAMES[i] for i in present]
    return fwd, both, xs, names


def rel(x, ref):
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def run_both(fn, arrays, ct, precision=None):
    fwd, both, xs, names = fwd_bwd(fn, arrays)
    if precision:
        with jax.default_matmul_precision(precision):
            out, grads = both(xs, ct)
    else:
        out, grads = both(xs, ct)
    jax.block_until_ready(grads)
    return out, dict(zip(names, grads))


def errors(got, want):
    out, grads = got
    out_ref, grads_ref = want
    result = {"out": rel(out, out_ref)}
    for key in grads:
        result[key] = rel(grads[key], grads_ref[key])
    return {k: float(f"{v:.3e}") for k, v in result.items()}


def check(cfg, dtype_name):
    """Relative errors of the kernel (and of the portable path) vs. float32."""
    batch = min(cfg["batch"], cfg.get("check_batch", cfg["batch"]))
    dtype = jnp.dtype(dtype_name)
    arrays, ct = make_inputs(cfg, batch, dtype, seed=1)
    # Reference: portable path in float32 on the same (rounded) inputs.
    arrays32 = [None if x is None else x.astype(jnp.float32) for x in arrays]
    reference = run_both(portable_fn(cfg), arrays32, ct.astype(jnp.float32), "highest")
    result = {"check_batch": batch}
    if dtype == jnp.float32:
        exact = run_both(kernel_fn(cfg, precision="highest"), arrays32, ct)
        result["kernel_highest_vs_portable_highest"] = errors(exact, reference)
        default = run_both(kernel_fn(cfg), arrays32, ct)
        result["kernel_default_vs_portable_highest"] = errors(default, reference)
        portable_default = run_both(portable_fn(cfg), arrays32, ct)
        result["portable_default_vs_portable_highest"] = errors(portable_default, reference)
    else:
        low = run_both(kernel_fn(cfg), arrays, ct)
        result["kernel_bf16_vs_portable_fp32"] = errors(low, reference)
        portable_low = run_both(portable_fn(cfg), arrays, ct)
        result["portable_bf16_vs_portable_fp32"] = errors(portable_low, reference)
    return result


def timed(fn, args, repeats, warmup=2):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(samples), 3)


def flops(cfg, batch):
    """Nominal forward FLOPs: QK, QP and PV over the attended distances."""
    m, h, d, n = cfg["queries"], cfg["heads"], cfg["head_dim"], cfg["persistent"]
    if cfg.get("span"):
        spans = [
            min(cfg["length"], math.ceil(z * cfg["max_span"]) + cfg.get("ramp", 32))
            for z in cfg["span"]
        ]
        context = sum(spans) / len(spans)
    else:
        context = cfg["length"]
    return batch * h * m * d * 2 * (3 * context + 2 * n), context


def time_config(cfg, dtype_name, repeats, tiles=None, portable=True):
    batch = cfg["batch"]
    arrays, ct = make_inputs(cfg, batch, jnp.dtype(dtype_name))
    fwd_flops, context = flops(cfg, batch)
    result = {"mean_attended_distances": context}
    fwd, both, xs, _ = fwd_bwd(kernel_fn(cfg, **(tiles or {})), arrays)
    t_fwd = timed(fwd, (xs,), repeats)
    t_both = timed(both, (xs, ct), repeats)
    result["kernel_fwd_ms"] = t_fwd
    result["kernel_fwd_bwd_ms"] = t_both
    result["kernel_fwd_tflops"] = round(fwd_flops / t_fwd / 1e9, 1)
    # Backward nominal FLOPs ~ 2.5x forward (recompute + 4 gradient products).
    result["kernel_fwd_bwd_tflops_nominal"] = round(3.5 * fwd_flops / t_both / 1e9, 1)
    del fwd, both
    if portable and cfg.get("time_portable", True):
        try:
            fwd, both, xs, _ = fwd_bwd(portable_fn(cfg), arrays)
            result["portable_fwd_ms"] = timed(fwd, (xs,), max(3, repeats // 2))
            result["portable_fwd_bwd_ms"] = timed(both, (xs, ct), max(3, repeats // 2))
            result["speedup_fwd_bwd"] = round(
                result["portable_fwd_bwd_ms"] / result["kernel_fwd_bwd_ms"], 2
            )
        except Exception as error:  # e.g. out of memory
            result["portable_error"] = f"{type(error).__name__}: {str(error)[:300]}"
    return result


PROFILE_TILES = [
    dict(block_q=64, block_k=64, num_warps=4, num_stages=2),
    dict(block_q=64, block_k=64, num_warps=4, num_stages=3,
         backward_blocks=((64, 64, 4, 2), (64, 64, 4, 2))),
    dict(block_q=128, block_k=64, num_warps=8, num_stages=3,
         backward_blocks=((64, 128, 8, 2), (128, 64, 8, 2))),
    dict(block_q=128, block_k=32, num_warps=4, num_stages=3,
         backward_blocks=((32, 128, 4, 3), (128, 32, 4, 3))),
    dict(block_q=64, block_k=128, num_warps=4, num_stages=2,
         backward_blocks=((64, 128, 4, 2), (64, 128, 8, 2))),
]


def prepare_kernels(pa, cfg, dtype, tiles):
    """(kernel config, prepared inputs, output cotangent) of the Pallas
    module `pa` (its internals) for `cfg`'s inputs in `dtype`, with the
    tiles of `cfg["kernel"]` updated by `tiles`."""
    arrays, ct = make_inputs(cfg, cfg["batch"], dtype)
    q, k, v, pos, mk, mv, z = arrays
    options = dict(cfg.get("kernel", {}))
    options.update(tiles)
    kcfg, prepared = pa._prepare(
        q, k, v, pos, mk, mv, z, cfg.get("max_span"), cfg.get("ramp", 32),
        cfg["integration"], INTERPRET[0], options.get("block_q", 64),
        options.get("block_k", 64), options.get("block_n"),
        options.get("num_warps", 4), options.get("num_stages", 2), None,
        options.get("num_programs", pa._DEFAULT_PROGRAMS),
        options.get("backward_blocks"), None, **dropout_options(q),
    )
    return kcfg, jax.block_until_ready(prepared), ct


def profile_config(cfg, dtype_name, repeats, tiles):
    """Per-kernel times (uses the module's internals)."""
    from keras_allattn.ops import pallas_attention as pa

    kcfg, prepared, ct = prepare_kernels(pa, cfg, jnp.dtype(dtype_name), tiles)
    q = prepared[0]
    result = {}
    fwd = jax.jit(lambda *a: pa._attention_fwd(kcfg, *a))
    result["fwd_ms"] = timed(fwd, prepared, repeats)
    _, res = fwd(*prepared)
    qpos, ppos = prepared[0], prepared[3]
    scores = jax.jit(lambda q, p: pa._position_scores(kcfg, q, p))
    result["position_scores_ms"] = timed(scores, (qpos, ppos), repeats)
    qp = scores(qpos, ppos)
    do = ct.astype(q.dtype)
    deltas = jax.jit(lambda res, do: pa._deltas(kcfg, res, do))
    delta, delta_p = deltas(res, do)
    result["deltas_ms"] = timed(deltas, (res, do), repeats)
    dkdv = jax.jit(lambda res, qp, do, d: pa._dkdv_call(kcfg, res, qp, do, d))
    result["dkdv_ms"] = timed(dkdv, (res, qp, do, delta), repeats)
    dq = jax.jit(lambda res, qp, do, d, dp: pa._dq_call(kcfg, res, qp, do, d, dp))
    result["dq_ds_dz_ms"] = timed(dq, (res, qp, do, delta, delta_p), repeats)
    dq_out, ds, _ = dq(res, qp, do, delta, delta_p)
    switches = ["skip_ds_store"]
    if kcfg.has_span:
        switches += ["skip_zero_tiles", "skip_ramp_sum"]
    for switch in switches:
        pa._DEBUG[switch] = True
        try:
            dq2 = jax.jit(lambda res, qp, do, d, dp: pa._dq_call(kcfg, res, qp, do, d, dp))
            label = switch.replace("skip_", "dq_without_")
            result[f"{label}_ms"] = timed(dq2, (res, qp, do, delta, delta_p), repeats)
        finally:
            pa._DEBUG[switch] = False
    grads = jax.jit(lambda q, p, dq, ds: pa._position_gradients(kcfg, q, p, dq, ds))
    result["position_gradients_ms"] = timed(grads, (qpos, ppos, dq_out, ds), repeats)
    if kcfg.persistent:
        pers = jax.jit(lambda res, do, d, dp: pa._persistent_call(kcfg, res, do, d, dp))
        result["persistent_ms"] = timed(pers, (res, do, delta, delta_p), repeats)
    return result


def describe(cfg):
    keys = ("batch", "queries", "length", "heads", "head_dim", "persistent",
            "integration", "max_span", "span")
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def emit(record):
    print(json.dumps(record), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated config names")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="tile sweep on enwik8_small_bf16")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--no-time", action="store_true")
    parser.add_argument("--no-portable-time", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="per-kernel times of the chosen configs (--only) for a few tile shapes")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--profile-tiles", type=int, default=None,
                        help="profile only the first N tile shapes")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="attention dropout rate of the timed kernels")
    parser.add_argument("--interpret", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    INTERPRET[0] = args.interpret
    DROPOUT[0] = args.dropout
    if args.list:
        for name, cfg in CONFIGS.items():
            print(name, describe(cfg))
        return
    device = jax.devices()[0]
    emit({"device": str(device), "platform": device.platform, "dropout": args.dropout,
          "jax": jax.__version__, "kind": getattr(device, "device_kind", "")})
    names = [n for n in args.only.split(",") if n] or list(CONFIGS)
    if args.profile:
        for name in names:
            cfg = CONFIGS[name]
            for tiles in PROFILE_TILES[: args.profile_tiles]:
                record = {"config": name, "profile": True, "tiles": tiles}
                try:
                    record["time"] = profile_config(cfg, cfg["dtypes"][0], args.repeats, tiles)
                except Exception as error:
                    record["error"] = f"{type(error).__name__}: {str(error)[:1000]}"
                emit(record)
        return
    for name in names:
        cfg = CONFIGS.get(name)
        if cfg is None:
            emit({"config": name, "error": "unknown configuration"})
            continue
        for dtype_name in cfg["dtypes"]:
            record = {"config": name, "dtype": dtype_name, **describe(cfg),
                      "tiles": cfg.get("kernel", {})}
            start = time.perf_counter()
            try:
                if cfg.get("check", True) and not args.no_check:
                    record["check"] = check(cfg, dtype_name)
                if cfg.get("time", True) and not args.no_time:
                    record["time"] = time_config(
                        cfg, dtype_name, args.repeats,
                        portable=not args.no_portable_time,
                    )
            except Exception as error:
                record["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
                record["traceback"] = traceback.format_exc()[-3000:]
            record["seconds"] = round(time.perf_counter() - start, 1)
            emit(record)
    if args.sweep:
        cfg = CONFIGS["enwik8_small_bf16"]
        for tiles in SWEEP:
            record = {"config": "sweep_enwik8_small_bf16", "tiles": tiles}
            try:
                record["time"] = time_config(cfg, "bfloat16", args.repeats, tiles, portable=False)
            except Exception as error:
                record["error"] = f"{type(error).__name__}: {str(error)[:1000]}"
            emit(record)


if __name__ == "__main__":
    main()
