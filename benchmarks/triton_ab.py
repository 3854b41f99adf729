"""Per-kernel A/B of the Triton kernels against another version of them.

Times the kernels of `keras_allattn.ops.triton_attention` ("current") and
of a baseline copy of that module read from a file ("baseline", e.g. `git
show COMMIT:keras_allattn/ops/triton_attention.py > /tmp/baseline.py`) on
the same inputs in one process, in alternating rounds (current first in
even rounds, baseline first in odd ones), so that the GPU's clock and the
machine's state affect both alike: separate calls of
`triton_kernel_check.py --profile` are compared across machines and
minutes. The baseline registers its PyTorch operators under a namespace of
its own (`keras_allattn_baseline::`).

Each round traces `--calls` forward+backward steps of a version with
`torch.profiler` and sums each kernel's device time (ms a step: the Triton
kernels by name, "matmul", "other", "total", as `triton_kernel_check.py
--profile`). The JSON line per configuration gives, per kernel and version,
[median, min, max] over the rounds, the baseline's median over the
current one's, and the largest relative difference between the two
versions' output and gradients (one bf16 step, float32 with `--smoke`: a
variant that computes something else shows here; NaN if either has one).

Usage (on the GPU machine):

    git show 1e3cb1c:keras_allattn/ops/triton_attention.py > /tmp/baseline.py
    KERAS_BACKEND=torch python3 benchmarks/triton_ab.py --baseline /tmp/baseline.py \\
        --configs trimmed1152,fixed1024 --dropout 0.3 --record

Configurations are `triton_kernel_check.py`'s; each version runs its own
default tiles unless `--tiles` (a JSON dict of `triton_all_attention`
keyword arguments, e.g. '{"backward": {"dq": [64, 64, 4, 3]}}') gives the
current version others, and `--baseline-tiles` the baseline (with the
current file as the baseline: a tile shape against another, kernel by
kernel). `--smoke` runs the Triton interpreter on the CPU at the "tiny"
configuration (a check of this script: its times are host times and mean
nothing).
"""

import argparse
import json
import math
import os
import pathlib
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")
if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import triton_kernel_check as tkc  # noqa: E402
from _common import add_ab_arguments  # noqa: E402
from _common import append_ab_row  # noqa: E402
from _common import check_ab_arguments  # noqa: E402
from _common import load_module_file  # noqa: E402
from _common import median_min_max  # noqa: E402
from _common import tiles_text  # noqa: E402
from keras_allattn.ops import triton_attention  # noqa: E402

BASELINE_NAMESPACE = "keras_allattn_baseline"


def load_module(path):
    """The module in the file at `path`, under a name of its own, its
    operators in the namespace `BASELINE_NAMESPACE`."""
    module = load_module_file(path, "triton_attention_baseline")
    for name in ("FORWARD_OP", "BACKWARD_OP"):
        namespace, op = getattr(module, name).split("::")
        setattr(module, name, f"{BASELINE_NAMESPACE}::{op}")
    return module


def host_kernel_ms(fn, inputs, grad, kwargs, steps):
    """Host time a forward+backward step (`--smoke`: no device trace)."""
    args = tkc.leaves(inputs)
    start = time.perf_counter()
    for _ in range(steps):
        out = fn(**args, **kwargs)
        out.backward(grad)
        for t in args.values():
            t.grad = None
    return {"total": round((time.perf_counter() - start) * 1e3 / steps, 3)}


def compare(name, versions, args):
    shape = tkc.CONFIGS[name]
    batch = shape["B"]
    # bf16 as trained; float32 in the interpreter, whose bf16 `tl.dot`
    # multiplies raw bit patterns (see test_triton_attention).
    dtype = torch.float32 if args.smoke else torch.bfloat16
    inputs, grad, kwargs = tkc.make_inputs(shape, batch, dtype, args.device)
    drop, _ = tkc.dropout_kwargs(inputs, args.dropout)
    kw = {
        "current": dict(kwargs, **drop, **args.tiles),
        "baseline": dict(kwargs, **drop, **args.baseline_tiles),
    }
    results = {
        v: tkc.forward_backward(fn, inputs, grad, **kw[v]) for v, fn in versions.items()
    }
    errors = [e for e in tkc.rel_errors(results["baseline"], results["current"]).values()
              if e is not None]
    difference = max(errors) if not any(math.isnan(e) for e in errors) else math.nan
    del results
    times = {v: {} for v in versions}
    for r in range(args.rounds):
        order = ("current", "baseline") if r % 2 == 0 else ("baseline", "current")
        for version in order:
            if args.smoke:
                ms = host_kernel_ms(versions[version], inputs, grad, kw[version], args.calls)
            else:
                ms = tkc.profile_kernels(
                    inputs, grad, kw[version], args.calls, fn=versions[version]
                )
            for kernel, value in ms.items():
                times[version].setdefault(kernel, []).append(value)
    result = {"config": name, "rounds": args.rounds, "calls": args.calls,
              "dropout": args.dropout, "tiles": args.tiles,
              "baseline_tiles": args.baseline_tiles,
              "max_rel_difference": difference}
    kernels = sorted(set(times["current"]) | set(times["baseline"]),
                     key=lambda k: (k == "total", k))
    for kernel in kernels:
        for version in versions:
            samples = times[version].get(kernel)
            if samples:
                result[f"{version}_{kernel}_ms"] = median_min_max(samples)
        if f"current_{kernel}_ms" in result and f"baseline_{kernel}_ms" in result:
            result[f"{kernel}_baseline_over_current"] = round(
                result[f"baseline_{kernel}_ms"][0] / result[f"current_{kernel}_ms"][0], 3
            )
    result["kernels"] = kernels
    tkc.empty_cache()
    return result


def record(result, baseline_path):
    append_ab_row(
        "triton_ab", torch.cuda.get_device_name(), "torch", result, result["kernels"],
        "a layer",
        f"config {result['config']}, baseline {pathlib.Path(baseline_path).name}, tiles "
        f"{tiles_text(result['tiles'])} vs {tiles_text(result['baseline_tiles'])}, "
        f"dropout {result['dropout']}, {result['rounds']} alternating rounds of "
        f"{result['calls']} steps, max relative difference "
        f"{result['max_rel_difference']:.2e}",
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_ab_arguments(
        parser, "triton_attention.py", tkc.CONFIGS, "trimmed1152,fixed1024", 5,
        "keyword arguments of triton_all_attention",
    )
    parser.add_argument("--smoke", action="store_true",
                        help="Triton interpreter on the CPU, the tiny configuration")
    args = parser.parse_args()
    check_ab_arguments(parser, args, tkc.CONFIGS)
    names = args.names
    if args.smoke:
        args.device, names = "cpu", ["tiny"]
        if args.record:
            parser.error("--record times a GPU; --smoke runs the interpreter")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("CUDA is not available: run this on the GPU machine "
                             "(or --smoke for the interpreter)")
        args.device = "cuda"
    tkc.args_global = argparse.Namespace(warmup=25, rep=100)
    versions = {
        "current": triton_attention.triton_all_attention,
        "baseline": load_module(args.baseline).triton_all_attention,
    }
    for name in names:
        result = compare(name, versions, args)
        print(json.dumps(result), flush=True)
        if args.record:
            record(result, args.baseline)


if __name__ == "__main__":
    main()
