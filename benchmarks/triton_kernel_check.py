"""Check and time the fused Triton all-attention kernel on a CUDA GPU.

For enwik8-small-like shapes (B=64, M=512, H=8, D=64, N=1024) this script
  * checks the forward output and every gradient of `triton_all_attention`
    against `portable_all_attention` (the keras.ops reference, PyTorch
    backend): in float32 (the kernel's exact-fp32 `tl.dot` path) and in
    bfloat16 (the kernel on bf16 inputs against the float32 reference on the
    same bf16-rounded inputs; the portable path's own bf16 error is printed
    beside it for scale). The check runs on the first `--check-batch` rows of
    the batch to bound the reference's memory (it materialises (B, H, M, A+M)
    scores);
  * times forward and forward+backward in bf16 at the full batch with
    `triton.testing.do_bench` (median, ms), the peak memory of one
    forward+backward, and the portable path's times for comparison;
  * optionally times a few alternative tile configurations.

With `--dropout RATE` every check and timing runs with attention dropout at
that rate (the kernel with the row keys of a fixed seed, the portable path
with the seed itself: the same mask).

`--position in_kernel,matmul` checks and times each design of the position
term (`position` argument of `triton_all_attention`) in turn, one record
each (field "position"), so one call compares them. `--profile` adds, per
design, the device time of each kernel in one forward+backward step (a
`torch.profiler` trace of `--profile-steps` steps, ms per step): the Triton
kernels by name, the matmuls (the position scores and gradients of the
matmul design) and the rest.

Configurations: "fixed" (A = 2048 attended distances, no adaptive span) and
"adaptive" (L = A = 8192, span ratios chosen so that the heads' spans are
about 768..1280, ~1024 on average: the kernel skips the key tiles beyond
each head's span), "trimmed1152" and "trimmed" (what training at spans of
1024 attends, every head at 1024: A = 1152 rows with span_granularity
"auto", the default, 1280 with 256), "fixed1024", and two probes of the
difference: "fixed1280" (1280 rows, no span) and "spanfull" (every head at
1024 = A). One JSON line per configuration (and per tile variant);
errors are caught and printed per configuration.

Usage (on the GPU machine, Keras carried as wheels, see GPU.md):
    KERAS_BACKEND=torch python3 benchmarks/triton_kernel_check.py
    ... --configs fixed --check-batch 4 --no-sweep --no-portable-timing
    ... --dropout 0.3
    ... --configs fixed --no-check --no-sweep --no-portable-timing \
        --dropout 0.3 --position in_kernel,matmul --profile
CPU self-test of the script (Triton interpreter, tiny shapes, checks only):
    KERAS_BACKEND=torch python3 benchmarks/triton_kernel_check.py --smoke [--dropout 0.3]
"""

import argparse
import json
import os
import sys
import time
import traceback

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

SPAN_RAMP = 32
DROPOUT_SEED = (123456789, 42)

CONFIGS = {
    # name: (B, M, H, D, A, N, max_span or None, mean span or None)
    "fixed": dict(B=64, M=512, H=8, D=64, A=2048, N=1024, max_span=None, span=None),
    "adaptive": dict(B=64, M=512, H=8, D=64, A=8192, N=1024, max_span=8192, span=1024),
    # What training at spans near 1024 runs: the memory trimmed to 1280 rows
    # (span_granularity 256, the default until f3c2cbf) or 1152 (its default
    # since, "auto"), every head at span 1024 (`uniform`), against fixed
    # spans of 1024.
    "trimmed": dict(B=64, M=512, H=8, D=64, A=1280, N=1024, max_span=8192, span=1024,
                    uniform=True),
    "trimmed1152": dict(B=64, M=512, H=8, D=64, A=1152, N=1024, max_span=8192, span=1024,
                        uniform=True),
    "fixed1024": dict(B=64, M=512, H=8, D=64, A=1024, N=1024, max_span=None, span=None),
    # Probes of what "trimmed" adds to "fixed1024": its 1280-row memory
    # without a span, and a span without the extra rows (every head at
    # 1024 = A: the band of fixed1024, through the span's code).
    "fixed1280": dict(B=64, M=512, H=8, D=64, A=1280, N=1024, max_span=None, span=None),
    "spanfull": dict(B=64, M=512, H=8, D=64, A=1024, N=1024, max_span=8192, span=1024,
                     uniform=True),
    # For `--smoke` (CPU, Triton interpreter): the script's own logic.
    "tiny": dict(B=2, M=37, H=2, D=16, A=100, N=20, max_span=120, span=40),
}

# Alternative tiles timed with --sweep: keyword arguments of the kernel.
SWEEP = [
    # The defaults are `triton_attention.DEFAULT_TILES` (per kernel, with
    # and without a span) and 8 position-gradient replicas; a variant that
    # names a forward tile gives every kernel the forward's tiles, as
    # `dict(num_warps=4)` (64, 64, 4, 2 everywhere). With 8 warps (the
    # default until the matmul position design and dropout) every kernel
    # held 237-255 registers a thread at (64, 64) (triton 3.9's ptxas for
    # sm_90), dQ with the span gradient spilling 256 bytes; on an H200 at
    # fixed 2048 and dropout 0.3, 4 warps took one layer's forward+backward
    # from 14.52 ms to 8.41 (every kernel faster; RESULTS.md).
    dict(num_warps=4),
    dict(num_warps=8),
    dict(num_warps=2),
    dict(num_stages=3),
    dict(block_q=32),
    dict(block_k=32),
    dict(block_q=32, num_stages=3),
    dict(block_q=128, block_k=128, num_warps=8),
    # Query tiles taller than key tiles (the matmul design allows them):
    # 128 rows for two warpgroups of 8 warps.
    dict(block_q=128, num_warps=8),
    dict(block_q=128, num_warps=8, backward={
        "dq": (64, 64, 4, 3), "dkdv": (64, 64, 4, 2), "persistent": (64, 64, 4, 3)}),
    dict(backward={"dq": (128, 64, 8, 2)}),
    dict(backward={"dkdv": (64, 128, 8, 2)}),
    dict(backward={"dq": (32, 64, 4, 2)}),
    dict(backward={"dkdv": (32, 64, 4, 2)}),
    dict(backward={"dq": (64, 64, 4, 3), "dkdv": (64, 64, 4, 3)}),
    dict(backward={"persistent": (64, 128, 4, 2)}),
    dict(position_grad_replicas=1),
]


def make_inputs(shape, batch, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, M, H, D, A, N = (shape[k] for k in ("B", "M", "H", "D", "A", "N"))
    B = batch

    def rnd(*size, scale=1.0):
        x = torch.randn(*size, generator=gen) * scale
        return x.to(device=device, dtype=dtype)

    # Scales of a trained model's projections: logits of order 1.
    inputs = {
        "query": rnd(B, M, H, D, scale=0.5),
        "key": rnd(B, A + M, H, D, scale=0.5),
        "value": rnd(B, A + M, H, D),
        "position_keys": rnd(D, A, scale=0.5),
        "persistent_keys": rnd(H, N, D, scale=0.5),
        "persistent_values": rnd(H, N, D),
    }
    kwargs = {"span_ramp": SPAN_RAMP, "integration": "joint"}
    if shape["max_span"] is not None:
        L = shape["max_span"]
        spread = (1.0, 1.0) if shape.get("uniform") else (0.75, 1.25)
        spans = torch.linspace(*spread, H) * shape["span"]
        z = ((spans - SPAN_RAMP) / L).clamp(0, 1)
        inputs["span_ratio"] = z.to(device=device, dtype=torch.float32)
        kwargs["max_span"] = L
    grad = rnd(B, M, H, D)
    return inputs, grad, kwargs


def dropout_kwargs(inputs, rate):
    """(kernel kwargs, portable kwargs) of attention dropout at `rate`.

    The kernel gets the row keys of the seed, the portable path the seed:
    both draw the same mask.
    """
    if not rate:
        return {}, {}
    from keras_allattn.ops.random import attention_dropout_keys

    query = inputs["query"]
    seed = torch.tensor(DROPOUT_SEED, dtype=torch.int32, device=query.device)
    B, M, H, _ = query.shape
    keys = attention_dropout_keys(seed, B, H, M).to(query.device)
    return (
        {"dropout_rate": rate, "dropout_keys": keys},
        {"dropout_rate": rate, "dropout_seed": seed},
    )


def leaves(inputs, dtype=None):
    out = {}
    for name, t in inputs.items():
        t = t.detach()
        if dtype is not None and t.is_floating_point() and name != "span_ratio":
            t = t.to(dtype)
        out[name] = t.clone().requires_grad_()
    return out


def forward_backward(fn, inputs, grad, **kwargs):
    args = leaves(inputs)
    out = fn(**args, **kwargs)
    out.backward(grad.to(out.dtype))
    result = {"output": out.detach()}
    result.update({name: t.grad for name, t in args.items()})
    return result


def rel_errors(result, ref):
    errors = {}
    for name, r in ref.items():
        x = result.get(name)
        if x is None or r is None:
            errors[name] = None
            continue
        x, r = x.double(), r.double()
        errors[name] = float((x - r).norm() / r.norm())
    return errors


def portable(**kwargs):
    from keras_allattn.ops.attention import portable_all_attention

    return portable_all_attention(**kwargs)


def design(args):
    """Keyword arguments of the kernel for the design being measured."""
    return {"position": args.position_design}


def check(shape, args):
    from keras_allattn.ops.triton_attention import triton_all_attention

    record = {}
    # float32: kernel (exact fp32 dots) against the portable path.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    inputs, grad, kwargs = make_inputs(shape, args.check_batch, torch.float32, args.device)
    drop_kernel, drop_portable = dropout_kwargs(inputs, args.dropout)
    ref = forward_backward(portable, inputs, grad, **kwargs, **drop_portable)
    got = forward_backward(
        triton_all_attention, inputs, grad, **kwargs, **drop_kernel, **design(args)
    )
    record["fp32_rel_err"] = rel_errors(got, ref)
    del got
    # bfloat16: kernel on bf16 inputs against the fp32 reference on the
    # same bf16-rounded inputs.
    rounded = {
        k: (v.to(torch.bfloat16).float() if k != "span_ratio" else v)
        for k, v in inputs.items()
    }
    grad_r = grad.to(torch.bfloat16).float()
    ref = forward_backward(portable, rounded, grad_r, **kwargs, **drop_portable)
    bf16_inputs = {
        k: (v.to(torch.bfloat16) if k != "span_ratio" else v) for k, v in inputs.items()
    }
    got = forward_backward(
        triton_all_attention, bf16_inputs, grad_r.bfloat16(), **kwargs,
        **drop_kernel, **design(args),
    )
    record["bf16_rel_err"] = rel_errors(got, ref)
    del got
    if args.portable_bf16_error:
        got = forward_backward(portable, bf16_inputs, grad_r.bfloat16(), **kwargs, **drop_portable)
        record["portable_bf16_rel_err"] = rel_errors(got, ref)
        del got
    del ref
    empty_cache()
    return record


def time_fn(fn, inputs, grad, kwargs, backward):
    import triton.testing

    args = leaves(inputs)
    tensors = [t for t in args.values()]

    if backward:
        def step():
            out = fn(**args, **kwargs)
            out.backward(grad)
    else:
        def step():
            with torch.no_grad():
                fn(**args, **kwargs)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    ms = triton.testing.do_bench(
        step, warmup=args_global.warmup, rep=args_global.rep,
        grad_to_none=tensors if backward else None, return_mode="median",
    )
    return ms, peak


def timings(shape, args, tiles=None):
    from keras_allattn.ops.triton_attention import triton_all_attention

    inputs, grad, kwargs = make_inputs(shape, shape["B"], torch.bfloat16, args.device)
    drop_kernel, drop_portable = dropout_kwargs(inputs, args.dropout)
    kw = dict(kwargs, **drop_kernel, **design(args), **(tiles or {}))
    record = {}
    t0 = time.time()
    fwd, _ = time_fn(triton_all_attention, inputs, grad, kw, backward=False)
    fwd_bwd, peak = time_fn(triton_all_attention, inputs, grad, kw, backward=True)
    record.update(
        triton_fwd_ms=round(fwd, 3), triton_fwd_bwd_ms=round(fwd_bwd, 3),
        triton_peak_gib=round(peak, 2), bench_s=round(time.time() - t0, 1),
    )
    tokens = shape["B"] * shape["M"]
    record["triton_fwd_bwd_tokens_per_s_one_layer"] = round(tokens / (fwd_bwd / 1e3))
    # Useful matmul work of the forward (context: Q K^T, Q P, A V over the
    # attended distances; persistent: Q Mk^T, A Mv): 2 flops per MAC.
    span = shape["A"] if shape["span"] is None else min(shape["A"], shape["span"] + SPAN_RAMP)
    flops = 2 * shape["B"] * shape["H"] * shape["M"] * shape["D"] * (3 * span + 2 * shape["N"])
    record["fwd_tflops_useful"] = round(flops / (fwd / 1e3) / 1e12, 1)
    if args.profile:
        record["kernel_ms"] = profile_kernels(inputs, grad, kw, args.profile_steps)
    if tiles is None and args.portable_timing:
        try:
            pkw = dict(kwargs, **drop_portable)
            pf, _ = time_fn(portable, inputs, grad, pkw, backward=False)
            pfb, ppeak = time_fn(portable, inputs, grad, pkw, backward=True)
            record.update(
                portable_fwd_ms=round(pf, 3), portable_fwd_bwd_ms=round(pfb, 3),
                portable_peak_gib=round(ppeak, 2),
            )
        except Exception as error:  # e.g. out of memory at A = 8192
            record["portable_timing_error"] = repr(error)[:300]
    del inputs, grad
    empty_cache()
    return record


def profile_kernels(inputs, grad, kwargs, steps, fn=None):
    """Device time per forward+backward step of each kernel, in ms: the
    Triton kernels by name, matmuls ("matmul"), everything else ("other"),
    and their total, from a torch.profiler trace of `steps` steps of `fn`
    (default: the library's `triton_all_attention`)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile

    if fn is None:
        from keras_allattn.ops.triton_attention import triton_all_attention as fn

    args = leaves(inputs)

    def step():
        out = fn(**args, **kwargs)
        out.backward(grad)
        for t in args.values():
            t.grad = None

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None)
        if us is None:
            us = getattr(event, "cuda_time_total", 0.0)
        if not us:
            continue
        name = event.key
        if name.startswith("_fwd_kernel") or name.startswith("_bwd_"):
            group = name.split(" ")[0]
        elif any(word in name.lower() for word in ("gemm", "matmul", "xmma", "cutlass", "nvjet")):
            group = "matmul"
        else:
            group = "other"
        times[group] = times.get(group, 0.0) + us
    result = {name: round(us / steps / 1e3, 3) for name, us in sorted(times.items())}
    result["total"] = round(sum(times.values()) / steps / 1e3, 3)
    return result


def empty_cache():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def emit(record):
    print(json.dumps(record), flush=True)


def main():
    global args_global
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="fixed,adaptive")
    parser.add_argument("--check-batch", type=int, default=4)
    parser.add_argument("--no-check", dest="check", action="store_false")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false")
    parser.add_argument("--no-portable-timing", dest="portable_timing", action="store_false")
    parser.add_argument("--no-portable-bf16-error", dest="portable_bf16_error", action="store_false")
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--rep", type=int, default=100)
    parser.add_argument(
        "--dropout", type=float, default=0.0, metavar="RATE",
        help="attention dropout rate of every check and timing (default 0: none)",
    )
    parser.add_argument(
        "--position", default="matmul", metavar="DESIGNS",
        help="comma-separated designs of the position term to check and time "
        "(in_kernel, matmul; default matmul, the library's)",
    )
    parser.add_argument(
        "--profile", action="store_true",
        help="per-kernel device time of one forward+backward step (torch.profiler)",
    )
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument(
        "--smoke", action="store_true",
        help="CPU self-test of this script: tiny shapes, Triton interpreter, checks only",
    )
    args = parser.parse_args()
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1). Received: --dropout {args.dropout}")
    from keras_allattn.ops.triton_attention import POSITION_DESIGNS

    designs = args.position.split(",")
    for name in designs:
        if name not in POSITION_DESIGNS:
            parser.error(
                f"--position takes designs among {POSITION_DESIGNS}. "
                f"Received: --position {args.position}"
            )
    args.device = "cuda"
    if args.smoke:
        args.device = "cpu"
        args.configs, args.check_batch, args.sweep = "tiny", 2, False
    args_global = args

    import triton

    emit({
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "keras_backend": os.environ.get("KERAS_BACKEND"),
    })
    for name, position in [(c, p) for c in args.configs.split(",") for p in designs]:
        args.position_design = position
        shape = CONFIGS[name]
        record = {"config": name, "position": position, "shape": shape,
                  "dtype_timed": "bfloat16", "dropout": args.dropout}
        try:
            if args.check:
                t0 = time.time()
                record.update(check(shape, args))
                record["check_batch"] = args.check_batch
                record["check_s"] = round(time.time() - t0, 1)
        except Exception as error:
            record["check_error"] = repr(error)[:500]
            record["check_traceback"] = traceback.format_exc()[-1500:]
            empty_cache()
        try:
            if args.device == "cuda":
                record.update(timings(shape, args))
        except Exception as error:
            record["timing_error"] = repr(error)[:500]
            record["timing_traceback"] = traceback.format_exc()[-1500:]
            empty_cache()
        emit(record)
        if args.sweep:
            for tiles in SWEEP:
                variant = {"config": name, "position": position, "tiles": tiles,
                           "dropout": args.dropout}
                try:
                    variant.update(timings(shape, args, tiles))
                except Exception as error:
                    variant["error"] = repr(error)[:500]
                    empty_cache()
                emit(variant)


args_global = None

if __name__ == "__main__":
    if "--smoke" in sys.argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        emit_error = {"error": "CUDA is not available: run this on the GPU machine"}
        print(json.dumps(emit_error))
        sys.exit(1)
    main()
