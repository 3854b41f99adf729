"""Per-kernel A/B of the Pallas kernels against another version of them.

Times the forward, dK/dV and dQ kernels and the whole backward ("bwd") of
`keras_allattn.ops.pallas_attention` ("current") and of a baseline copy of
that module read from a file
("baseline", e.g. `git show COMMIT:keras_allattn/ops/pallas_attention.py >
/tmp/baseline.py`), on the same inputs in one process, in alternating rounds
(current first in even rounds, baseline first in odd ones), so that the
GPU's clock and the machine's state affect both alike. Separate calls of
`kernel_check.py --profile` differed by up to 17% for an unchanged kernel on
an H200; these rounds agree within 2%.

Each round times `--calls` back-to-back calls of a kernel (one
`block_until_ready` at the end); the JSON line per configuration gives, per
kernel and version, [median, min, max] ms over the rounds, and the
baseline's median over the current one's.

Usage (on the GPU machine, Keras importable):

    git show 0737ba2:keras_allattn/ops/pallas_attention.py > /tmp/baseline.py
    KERAS_BACKEND=jax python3 benchmarks/pallas_ab.py --baseline /tmp/baseline.py \\
        --configs adaptive_A1152_span1k_bf16,fixed_A1024_bf16 --dropout 0.3 --record

`--tiles JSON` and `--baseline-tiles JSON` set each version's tiles
(kernel_check's `kernel` options, e.g. '{"backward_blocks": [[64, 64],
[64, 64, 4, 3]]}'): with the current file as the baseline, a tile shape
against the default, kernel by kernel.

`--baseline-switch NAME` (repeatable) turns on one of the baseline
module's profiling switches (`_DEBUG`: `skip_ds_store`, `skip_zero_tiles`,
`skip_ramp_sum`; the results are then wrong): with the current file as
the baseline, it times what one part of the dQ kernel costs.

Configurations are `kernel_check.py`'s (`--list` there); default tiles
(64 x 64 forward, the default backward tiles). `--interpret` runs the
Pallas interpreter (a CPU check of this script; its times mean nothing).
"""

import argparse
import inspect
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import kernel_check  # noqa: E402
from _common import add_ab_arguments  # noqa: E402
from _common import append_ab_row  # noqa: E402
from _common import check_ab_arguments  # noqa: E402
from _common import load_module_file  # noqa: E402
from _common import median_min_max  # noqa: E402
from _common import tiles_text  # noqa: E402
from keras_allattn.ops import pallas_attention  # noqa: E402

# The kernels, and "bwd": the whole backward (every kernel, the position
# gradients' matmuls, the batch chunks), comparable across designs that
# split the work between the kernels differently.
KERNELS = ("fwd", "dkdv", "dq", "bwd")


def load_module(path):
    """The module in the file at `path`, under a name of its own."""
    return load_module_file(path, "pallas_baseline")

def kernel_calls(pa, cfg, tiles):
    """kernel name -> (jitted function, arguments) of module `pa` at the
    config's tiles updated by `tiles`."""
    kcfg, prepared, ct = kernel_check.prepare_kernels(pa, cfg, jnp.bfloat16, tiles)
    q = prepared[0]
    fwd = jax.jit(lambda *a: pa._attention_fwd(kcfg, *a))
    _, res = fwd(*prepared)
    qp = jax.jit(lambda q, p: pa._position_scores(kcfg, q, p))(prepared[0], prepared[3])
    do = ct.astype(q.dtype)
    delta, delta_p = jax.jit(lambda r, d: pa._deltas(kcfg, r, d))(res, do)
    dq = jax.jit(lambda *a: pa._dq_call(kcfg, *a))
    dq_args = (res, qp, do, delta, delta_p)
    if getattr(kcfg, "fused_dq", False):
        # The dK/dV kernel adds the context share into the dQ kernel's
        # (persistent) share.
        dkdv = jax.jit(lambda r, p, d, dl, q_: pa._dkdv_call(kcfg, r, p, d, dl, q_))
        dkdv_args = (res, qp, do, delta, dq(*dq_args))
    else:
        dkdv = jax.jit(lambda r, p, d, dl: pa._dkdv_call(kcfg, r, p, d, dl))
        dkdv_args = (res, qp, do, delta)
    if "ds" in inspect.signature(pa._dq_call).parameters:
        # The dK/dV kernel writes dS (its third output); the dQ kernel reads it.
        dq_args += (dkdv(*dkdv_args)[2],)
    bwd = jax.jit(lambda r, d: pa._backward(kcfg, r, d))
    return {
        "fwd": (fwd, tuple(prepared)),
        "dkdv": (dkdv, dkdv_args),
        "dq": (dq, dq_args),
        "bwd": (bwd, (res, do)),
    }

def per_call_ms(fn, args, calls):
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) * 1e3 / calls


def compare(name, baseline, rounds, calls, tiles=None, baseline_tiles=None):
    cfg = kernel_check.CONFIGS[name]
    versions = {
        "current": kernel_calls(pallas_attention, cfg, tiles or {}),
        "baseline": kernel_calls(baseline, cfg, baseline_tiles or {}),
    }
    times = {v: {k: [] for k in KERNELS} for v in versions}
    for r in range(rounds):
        order = ("current", "baseline") if r % 2 == 0 else ("baseline", "current")
        for version in order:
            for kernel, (fn, args) in versions[version].items():
                times[version][kernel].append(per_call_ms(fn, args, calls))
    result = {"config": name, "rounds": rounds, "calls": calls,
              "tiles": tiles or {}, "baseline_tiles": baseline_tiles or {}}
    for version, kernels in times.items():
        for kernel, samples in kernels.items():
            result[f"{version}_{kernel}_ms"] = median_min_max(samples)
    for kernel in KERNELS:
        result[f"{kernel}_baseline_over_current"] = round(
            result[f"baseline_{kernel}_ms"][0] / result[f"current_{kernel}_ms"][0], 3
        )
    return result


def record(result, baseline_path, switches, dropout):
    device = jax.devices()[0]
    append_ab_row(
        "pallas_ab", getattr(device, "device_kind", str(device)), "jax", result,
        KERNELS, "per layer",
        f"config {result['config']}, baseline {pathlib.Path(baseline_path).name}"
        + "".join(f" with {name}" for name in switches)
        + f", tiles {tiles_text(result['tiles'])} vs "
        f"{tiles_text(result['baseline_tiles'])}, dropout {dropout}, "
        f"{result['rounds']} alternating rounds of {result['calls']} calls",
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_ab_arguments(
        parser, "pallas_attention.py", kernel_check.CONFIGS,
        "adaptive_A1152_span1k_bf16,fixed_A1024_bf16", 20,
        "tile options (kernel_check `kernel` keys: block_q, block_k, num_warps, "
        "num_stages, backward_blocks)",
    )
    parser.add_argument("--baseline-switch", action="append", default=[],
                        metavar="NAME", help="a profiling switch of the baseline "
                        "module to turn on (repeatable)")
    parser.add_argument("--interpret", action="store_true",
                        help="Pallas interpreter (CPU check of the script)")
    args = parser.parse_args()
    check_ab_arguments(parser, args, kernel_check.CONFIGS)
    kernel_check.DROPOUT[0] = args.dropout
    kernel_check.INTERPRET[0] = args.interpret
    baseline = load_module(args.baseline)
    for switch in args.baseline_switch:
        if switch not in getattr(baseline, "_DEBUG", {}):
            parser.error(
                f"--baseline-switch takes names among "
                f"{sorted(getattr(baseline, '_DEBUG', {}))}. Received: {switch!r}"
            )
        baseline._DEBUG[switch] = True
    for name in args.names:
        result = compare(name, baseline, args.rounds, args.calls,
                         args.tiles, args.baseline_tiles)
        print(json.dumps(result), flush=True)
        if args.record:
            record(result, args.baseline, args.baseline_switch, args.dropout)


if __name__ == "__main__":
    main()
