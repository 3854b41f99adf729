"""The fused kernels against PyTorch's own fused attention, one layer's worth.

What a layer's attention costs here, set beside the fastest attention
kernels PyTorch ships for the same card (`torch.nn.functional.
scaled_dot_product_attention` with the FlashAttention-2, cuDNN and
memory-efficient backends), with and without attention dropout. The peers
compute less than a layer of the model: dense attention of each query over
`A + N` keys (the `A` distances of its band plus the `N` persistent
vectors: the same `Q K^T` and `A V` work), with no relative-position term,
no band and no span. So a peer's time is a floor under what a kernel of its
kind would take for the layer, and the script answers: how fast would the
training step be with the peer's speed, and how far are the library's
kernels from it.

Per configuration (`triton_kernel_check.py`'s shapes, bfloat16), one JSON
line with, for each implementation, the forward and forward+backward time
(ms a layer, median of `--rounds` rounds of `--calls` calls, CUDA events)
and the useful TFLOP/s: 2 flops per multiply-add of the matmuls the
function needs (forward `B H M D (2 (A + N) + A)` multiply-adds for the
library, the last term being `Q P`; `B H M D 2 (A + N)` for the peers),
forward+backward counted as 3.5 times the forward (the backward's five
matmuls against the forward's two, as FlashAttention counts them).

Usage (on the GPU machine):

    KERAS_BACKEND=torch python3 benchmarks/attention_peers.py \\
        --configs fixed,fixed1024 --dropout 0.3 --record

`--smoke` runs the tiny configuration on the CPU (Triton interpreter,
float32, PyTorch's math backend): a check of the script, its times mean
nothing.
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")
if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import triton_kernel_check as tkc  # noqa: E402
from _common import append_peers_row  # noqa: E402
from _common import check_names  # noqa: E402
from _common import device_name  # noqa: E402

# The peers: scaled_dot_product_attention restricted to one backend each.
PEERS = ("flash", "cudnn", "efficient")


def _backend(name):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


def useful_flops(shape, peer):
    """Forward+backward flops of the matmuls the function needs (see the
    module doc)."""
    B, M, H, D, A, N = (shape[k] for k in ("B", "M", "H", "D", "A", "N"))
    if shape["span"] is not None:
        A = min(A, shape["span"] + tkc.SPAN_RAMP)  # the distances attended
    macs = B * H * M * D * (2 * (A + N) + (0 if peer else A))
    return 3.5 * 2 * macs


def time_step(step, rounds, calls):
    """Median ms a call of `step` over `rounds` rounds of `calls` calls."""
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    samples = []
    for _ in range(rounds):
        if torch.cuda.is_available():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                step()
            samples.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(samples)


def library_steps(shape, batch, dtype, device, dropout):
    """Forward and forward+backward steps of the library's Triton kernels."""
    from keras_allattn.ops.triton_attention import triton_all_attention

    inputs, grad, kwargs = tkc.make_inputs(shape, batch, dtype, device)
    drop, _ = tkc.dropout_kwargs(inputs, dropout)
    kwargs = dict(kwargs, **drop)
    args = tkc.leaves(inputs)

    def forward():
        with torch.no_grad():
            triton_all_attention(**args, **kwargs)

    def forward_backward():
        out = triton_all_attention(**args, **kwargs)
        out.backward(grad.to(out.dtype))
        for t in args.values():
            t.grad = None

    return forward, forward_backward


def peer_steps(shape, batch, dtype, device, dropout, backend):
    """Forward and forward+backward steps of scaled_dot_product_attention
    on one backend: dense attention of M queries over A + N keys."""
    from torch.nn.attention import sdpa_kernel

    gen = torch.Generator(device="cpu").manual_seed(0)
    M, H, D, A, N = (shape[k] for k in ("M", "H", "D", "A", "N"))
    if shape["span"] is not None:
        A = min(A, shape["span"] + tkc.SPAN_RAMP)

    def rnd(*size, scale=1.0):
        x = torch.randn(*size, generator=gen) * scale
        return x.to(device=device, dtype=dtype).requires_grad_()

    q = rnd(batch, H, M, D, scale=0.5)
    k = rnd(batch, H, A + N, D, scale=0.5)
    v = rnd(batch, H, A + N, D)
    grad = torch.randn(batch, H, M, D, generator=gen).to(device=device, dtype=dtype)
    chosen = _backend(backend)

    def call():
        with sdpa_kernel(chosen):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)

    def forward():
        with torch.no_grad():
            call()

    def forward_backward():
        call().backward(grad)
        for t in (q, k, v):
            t.grad = None

    return forward, forward_backward


def measure(name, shape, batch, steps, args, peer):
    record = {}
    try:
        forward, forward_backward = steps()
        fwd = time_step(forward, args.rounds, args.calls)
        fwd_bwd = time_step(forward_backward, args.rounds, args.calls)
    except Exception as error:  # a backend that does not take this shape
        record[f"{name}_error"] = repr(error)[:300]
        return record
    flops = useful_flops(dict(shape, B=batch), peer)
    record[f"{name}_fwd_ms"] = round(fwd, 3)
    record[f"{name}_fwd_bwd_ms"] = round(fwd_bwd, 3)
    record[f"{name}_tflops"] = round(flops / (fwd_bwd / 1e3) / 1e12, 1)
    return record


def append_row(record, peers):
    append_peers_row(
        "attention_peers", record["device"], "torch", record, ["library"] + peers,
        f"config {record['config']}, batch {record['batch']}, {record['dtype']}, "
        f"dropout {record['dropout']}; peers: scaled_dot_product_attention over "
        f"A + N keys (no position term, band or span)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="fixed,fixed1024",
                        help=f"comma-separated names among {sorted(tkc.CONFIGS)}")
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--batch", type=int, default=None,
                        help="batch rows (default: the configuration's)")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated names among {list(PEERS)}")
    parser.add_argument("--record", action="store_true",
                        help="append a row per configuration to benchmarks/RESULTS.md")
    parser.add_argument("--smoke", action="store_true",
                        help="the tiny configuration on the CPU (a check of the script)")
    args = parser.parse_args()
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1). Received: --dropout {args.dropout}")
    for flag in ("rounds", "calls"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1. Received: --{flag} {getattr(args, flag)}")
    names = check_names(parser, "--configs", args.configs, tkc.CONFIGS)
    peers = check_names(parser, "--peers", args.peers, PEERS)
    if args.smoke:
        names, peers, device, dtype = ["tiny"], ["math"], "cpu", torch.float32
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA device (or --smoke)")
        device, dtype = "cuda", torch.bfloat16
    for name in names:
        shape = tkc.CONFIGS[name]
        batch = args.batch or shape["B"]
        record = {"benchmark": "attention_peers", "config": name, "device": device_name(),
                  "batch": batch, "dtype": str(dtype).replace("torch.", ""),
                  "dropout": args.dropout}
        record.update(measure(
            "library", shape, batch,
            lambda: library_steps(shape, batch, dtype, device, args.dropout), args, False))
        for peer in peers:
            record.update(measure(
                peer, shape, batch,
                lambda: peer_steps(shape, batch, dtype, device, args.dropout, peer),
                args, True))
        print(json.dumps(record), flush=True)
        if args.record and not args.smoke:
            append_row(record, peers)
        tkc.empty_cache()


if __name__ == "__main__":
    main()
