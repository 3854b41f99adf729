"""Registers and spills of the Pallas kernels, compiled for a GPU without one.

The JAX counterpart of `triton_registers.py`. Traces the backward pass of
`keras_allattn.ops.pallas_attention.pallas_all_attention` at the
enwik8_small layer geometry (B 64, M 512, H 8, D 64, N 1024, bf16,
dropout 0.3, joint persistent vectors; A 2048 with fixed spans, A 1152
with adaptive span, L 8192) on abstract inputs (`jax.make_jaxpr`, no
arrays), takes the jaxpr of each `pallas_call` (forward, dK/dV, dQ,
persistent) and lowers it to a Triton MLIR module with jax's own Pallas
Triton lowering (`lower_jaxpr_to_triton_module`, what jaxlib runs on a
GPU), then compiles that module for a CUDA architecture (default sm_90,
the H100/H200) with the local `triton` package and reads each kernel's
resource usage from the cubin (`cuobjdump -res-usage`): registers a
thread, the stack a thread spills to, shared memory. With `--loops` it
also counts the instructions of each loop of the machine code, and of the
path through the loop that skips its forward branches, with the spill
reloads (LDL) and predicate saves (P2R) among them
(`triton_registers.loop_counts`). One JSON line per kernel and span
setting.

No GPU is needed: the shapes are static in a Pallas kernel, so the module
holds every size and stride as a constant, and its pointer arguments carry
`tt.divisibility = 32` as on the GPU: the module is the one a GPU run
builds for the same shapes and tiles (`--dump-ir DIR` writes it, one
`.ttir` file a kernel).

Limits. The module is compiled by the `triton` installed here (the one
PyTorch ships, 3.9), not by the Triton that compiles it on a GPU, which
is bundled with jaxlib (in jax 0.10.2's `pallas_call_registration`,
jaxlib up to 0.10.2 hands the module to XLA's `__gpu$xla.gpu.triton`
custom call, later ones compile it with jaxlib's own `triton.compile`):
their versions and pass pipelines may differ, so
registers, spills and instruction counts can differ from the GPU's
binary. The module itself comes from the jax installed here; another jax
on the GPU machine may lower the kernels differently. Compare tile shapes
and code changes with one another under the same versions, and time the
candidates on a GPU (`kernel_check.py`, `pallas_ab.py`). Registers are
not time (see `triton_registers.py`).

Usage:

    python benchmarks/pallas_registers.py
    python benchmarks/pallas_registers.py --loops --record
    python benchmarks/pallas_registers.py --tiles 64,64,4,2 128,64,8,2 \\
        --backward-blocks '[[64, 64, 4, 2], [64, 32, 4, 3]]' --kernels dkdv dq

`--tiles BQ,BK,WARPS,STAGES`: the forward's tiles (`block_q`, `block_k`,
`num_warps`, `num_stages`; the persistent kernel's are `block_q`,
`block_n = block_k`); the backward's follow from them as in
`pallas_all_attention` unless `--backward-blocks` gives them (its
`backward_blocks` argument as JSON). Default: the library's defaults.
"""

import argparse
import inspect
import json
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src import core as jax_core  # noqa: E402
from jax._src import sharding_impls  # noqa: E402
from jax._src.interpreters import mlir  # noqa: E402
from jax._src.pallas.triton import lowering  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from keras_allattn.ops import pallas_attention  # noqa: E402
from triton_registers import cubin_usage  # noqa: E402
from triton_registers import measured  # noqa: E402
from triton_registers import parse_tiles  # noqa: E402
from triton_registers import record_rows  # noqa: E402

# The enwik8_small layer geometry.
BATCH, QUERIES, HEADS, HEAD_DIM, PERSISTENT = 64, 512, 8, 64, 1024
KERNELS = {  # pallas_call name -> kernel
    "all_attention_fwd": "forward",
    "all_attention_dkdv": "dkdv",
    "all_attention_dq": "dq",
    "all_attention_persistent": "persistent",
}


def _tiles(cfg, kernel):
    """(block_q, block_k or block_n, num_warps, num_stages) of a kernel."""
    if kernel == "dkdv":
        return tuple(cfg.dkdv_blocks)
    if kernel == "dq":
        return tuple(cfg.dq_blocks)
    block = cfg.block_n if kernel == "persistent" else cfg.block_k
    return (cfg.block_q, block, cfg.num_warps, cfg.num_stages)


def pallas_calls(has_span, length, options):
    """{kernel: (tiles, pallas_call equation)} of one forward and backward
    pass of `pallas_all_attention(**options)`, traced on abstract inputs."""
    B, M, H, D, N = BATCH, QUERIES, HEADS, HEAD_DIM, PERSISTENT
    sds = jax.ShapeDtypeStruct
    inputs = [
        sds((B, M, H, D), jnp.bfloat16),  # query
        sds((B, length + M, H, D), jnp.bfloat16),  # key
        sds((B, length + M, H, D), jnp.bfloat16),  # value
        sds((D, length), jnp.float32),  # position_keys (parameters)
        sds((H, N, D), jnp.float32),  # persistent keys
        sds((H, N, D), jnp.float32),  # persistent values
        sds((H,), jnp.float32),  # span_ratio
        sds((B, H, M), jnp.int32),  # dropout row keys
    ]
    configs = []

    def loss(q, k, v, pos, mk, mv, z, rk):
        kwargs = dict(options, query=q, key=k, value=v, position_keys=pos,
                      persistent_keys=mk, persistent_values=mv,
                      span_ratio=z if has_span else None, dropout_keys=rk)
        bound = inspect.signature(pallas_attention.pallas_all_attention).bind(**kwargs)
        bound.apply_defaults()
        configs.append(pallas_attention._prepare(**bound.arguments)[0])
        out = pallas_attention.pallas_all_attention(**kwargs)
        return out.astype(jnp.float32).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5, 6)))(*inputs)
    equations = []

    def find(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                equations.append(eqn)
                continue
            for sub in jax_core.jaxprs_in_params(eqn.params):
                find(sub)

    find(jaxpr.jaxpr)
    calls = {}
    for eqn in equations:  # batch chunks repeat a kernel: keep the first
        kernel = KERNELS.get(eqn.params["name"], eqn.params["name"])
        calls.setdefault(kernel, (_tiles(configs[0], kernel), eqn))
    return calls


def triton_module(eqn, arch):
    """The Triton MLIR module (text) of a pallas_call, as lowered on a GPU."""
    context = mlir.ModuleContext(
        platforms=["cuda"], backend=None,
        axis_context=sharding_impls.ShardingContext(1), keepalives=[],
        channel_iterator=None, host_callbacks=[],
        lowering_parameters=mlir.LoweringParameters(),
    )
    result = lowering.lower_jaxpr_to_triton_module(
        eqn.params["jaxpr"], eqn.params["grid_mapping"], "cuda", arch,
        mlir_ctx=context,
    )
    return result.module.operation.get_asm(enable_debug_info=False)


def resource_usage(ttir, num_warps, num_stages, arch, loops=False):
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "kernel.ttir"
        path.write_text(ttir)
        compiled = triton.compile(
            str(path), target=GPUTarget("cuda", arch, 32),
            options={"num_warps": num_warps, "num_stages": num_stages},
        )
    return cubin_usage(compiled, loops)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", nargs="+", type=parse_tiles, default=[None],
                        metavar="BQ,BK,WARPS,STAGES",
                        help="forward tiles (default: the library's, 64,64,4,2)")
    parser.add_argument("--backward-blocks", type=json.loads, default=None,
                        help="pallas_all_attention's backward_blocks, as JSON")
    parser.add_argument("--kernels", nargs="+", choices=list(KERNELS.values()),
                        default=list(KERNELS.values()))
    parser.add_argument("--length", type=int, default=2048,
                        help="A with fixed spans (default 2048)")
    parser.add_argument("--span-length", type=int, default=1152,
                        help="A with adaptive span (default 1152: spans ~1024)")
    parser.add_argument("--max-span", type=int, default=8192)
    parser.add_argument("--spans", nargs="+", choices=["fixed", "adaptive"],
                        default=["fixed", "adaptive"])
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--arch", type=int, default=90,
                        help="CUDA compute capability x 10 (default 90, sm_90)")
    parser.add_argument("--loops", action="store_true",
                        help="also count each loop's instructions (cuobjdump -sass)")
    parser.add_argument("--dump-ir", type=pathlib.Path, default=None, metavar="DIR",
                        help="write each kernel's Triton module to DIR")
    parser.add_argument("--record", action="store_true",
                        help="append one row per line to benchmarks/RESULTS.md")
    args = parser.parse_args()
    rows = []
    for spans in args.spans:
        has_span = spans == "adaptive"
        length = args.span_length if has_span else args.length
        for tiles in args.tiles:
            options = dict(dropout_rate=args.dropout, integration="joint",
                           span_ramp=32)
            if has_span:
                options["max_span"] = args.max_span
            if tiles is not None:
                block_q, block_k, warps, stages = tiles
                options.update(block_q=block_q, block_k=block_k,
                               num_warps=warps, num_stages=stages)
            if args.backward_blocks is not None:
                options["backward_blocks"] = args.backward_blocks
            try:
                calls = pallas_calls(has_span, length, options)
            except Exception as error:
                calls = {k: (tiles, f"{type(error).__name__}: {str(error)[:300]}")
                         for k in args.kernels}
            for name in args.kernels:
                kernel_tiles, eqn = calls.get(name, (None, "no such pallas_call"))
                result = {"kernel": name, "adaptive_span": has_span, "length": length,
                          "tiles": list(kernel_tiles or ()), "arch": f"sm_{args.arch}",
                          "triton": triton.__version__, "jax": jax.__version__}
                if isinstance(eqn, str):
                    result["error"] = eqn
                    print(json.dumps(result), flush=True)
                else:
                    def measure(eqn=eqn, name=name, spans=spans, length=length,
                                kernel_tiles=kernel_tiles):
                        ttir = triton_module(eqn, args.arch)
                        if args.dump_ir:
                            args.dump_ir.mkdir(parents=True, exist_ok=True)
                            shape = "_".join(str(t) for t in kernel_tiles)
                            (args.dump_ir / f"{name}_{spans}_A{length}_{shape}.ttir"
                             ).write_text(ttir)
                        return resource_usage(ttir, kernel_tiles[2], kernel_tiles[3],
                                              args.arch, loops=args.loops)

                    measured(result, measure)
                rows.append(result)
    if args.record:
        record_rows("pallas_registers", "jax", rows, lambda r: (
            f"kernel {r['kernel']}, adaptive span {r['adaptive_span']}, A "
            f"{r['length']}, tiles {tuple(r['tiles'])}, Pallas lowering of jax "
            f"{r['jax']} compiled by the local triton {r['triton']} (not "
            f"jaxlib's), B {BATCH}, M {QUERIES}, H {HEADS}, D {HEAD_DIM}, "
            f"N {PERSISTENT}, bf16, dropout {args.dropout}, joint"
        ))


if __name__ == "__main__":
    main()
