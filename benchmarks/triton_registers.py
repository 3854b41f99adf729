"""Registers and spills of the Triton kernels, compiled for a GPU without one.

Compiles the all-attention Triton kernels (forward, dQ, dK/dV) for a CUDA
architecture (default sm_90, the H100/H200) with Triton's own compiler and
ptxas, on any machine (no GPU needed), and reads each kernel's resource
usage from the cubin (`cuobjdump -res-usage`): registers a thread, the
stack a thread spills to, shared memory. With `--loops` it also counts the
instructions of each loop of the kernel's machine code (`cuobjdump
-sass`), and of the path through the loop that skips its forward branches
(in the forward, the tiles inside a head's span), with the spill reloads
(LDL) and predicate saves (P2R) among them. One JSON line per kernel, span
setting and tile shape.

The arguments are specialised as on the GPU: pointers 16-byte aligned and
integers (strides, sizes) divisible by 16 where the enwik8_small geometry's
are (M 512, A 1024, H 8, D 64, N 1024). Without that the compiler cannot
prove alignment, and loads, registers and spills differ from the GPU's.

A kernel that spills, or that holds so many registers that one program of
`num_warps` warps fills a multiprocessor's register file, hides memory
latency badly; this screens tile shapes and code changes before a GPU
times them (`triton_kernel_check.py --sweep`). Registers are not time: on
an H200, splitting the dQ and forward loops at the span's edge spilled and
ran slower, while dK/dV ran faster with a little more spilled.

Usage:

    KERAS_BACKEND=torch python benchmarks/triton_registers.py
    KERAS_BACKEND=torch python benchmarks/triton_registers.py \\
        --tiles 64,64,8,2 32,64,8,2 --record
    KERAS_BACKEND=torch python benchmarks/triton_registers.py \\
        --tiles 64,64,4,2 --loops

Settings: the library's defaults (dropout on, the matmul position design,
joint persistent vectors, D = 64, bf16 inputs), with and without adaptive
span.
"""

import argparse
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "torch")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from _common import commit  # noqa: E402
from keras_allattn.ops import triton_attention  # noqa: E402

# Pointer arguments of the kernels and their element types (bf16 inputs).
POINTERS = {
    "Q": "*bf16", "K": "*bf16", "V": "*bf16", "POS": "*bf16", "QP": "*bf16",
    "MK": "*fp32", "MV": "*fp32", "Z": "*fp32", "RK": "*i32", "O": "*bf16",
    "OC": "*fp32", "OP": "*fp32", "LSE_C": "*fp32", "LSE_P": "*fp32",
    "DO": "*bf16", "DEL_C": "*fp32", "DEL_P": "*fp32", "DQ": "*bf16",
    "DPOS": "*fp32", "DS": "*bf16", "DZP": "*fp32", "DK": "*bf16", "DV": "*bf16",
}
FLOATS = {"max_span", "span_ramp", "scale_log2", "scale", "dz_coef", "drop_scale"}
# Integer arguments at the enwik8_small geometry (B 64, M 512, A 1024, H 8,
# D 64, N 1024): those divisible by 16 are specialised as the GPU's JIT does.
_M, _A, _H, _D, _N = 512, 1024, 8, 64, 1024
INTS = dict(
    s_qb=_M * _H * _D, s_qm=_H * _D, s_qh=_D, s_kb=(_A + _M) * _H * _D,
    s_km=_H * _D, s_kh=_D, s_vb=(_A + _M) * _H * _D, s_vm=_H * _D, s_vh=_D,
    s_ob=_M * _H * _D, s_om=_H * _D, s_oh=_D, s_mkh=_N * _D, s_mkn=_D,
    s_mvh=_N * _D, s_mvn=_D, s_pb=_M * _H * _A, s_pm=_H * _A, s_ph=_A,
    H=_H, M=_M, A=_A, N=_N, B=64,
)


def kernels(has_span, head_dim):
    """name -> (jit function, constexprs besides the tiles)."""
    # PAIRS: A + M even (the enwik8 geometries), one dropout hash for two keys.
    base = dict(HAS_SPAN=has_span, HAS_DROPOUT=True, POS_MATMUL=True,
                D=head_dim, BD=head_dim, PREC="ieee", PAIRS=True)
    return {
        "forward": (triton_attention._fwd_kernel,
                    dict(base, HAS_PERS=True, SEPARATE=False)),
        "dq": (triton_attention._bwd_dq_kernel,
               dict(base, HAS_PERS=True, NEED_DPOS=False)),
        "dkdv": (triton_attention._bwd_dkdv_kernel,
                 dict(base, NEED_DZ=has_span, FUSED_DQ=False)),
        "dkdv_fused": (triton_attention._bwd_dkdv_kernel,
                       dict(base, NEED_DZ=has_span, FUSED_DQ=True)),
    }


def _branch_target(op):
    match = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", op)
    return int(match.group(1), 16) if match else None


def loop_counts(sass):
    """Per loop of the machine code (a backward branch): its instructions,
    those on the path that skips the loop's forward branches, and the spill
    reloads (LDL) and predicate saves (P2R) on that path."""
    code = []
    for line in sass.splitlines():
        match = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if match:
            code.append((int(match.group(1), 16), match.group(2).strip()))
    targets = [_branch_target(op) for _, op in code]
    loops = []
    for (address, _), target in zip(code, targets):
        if target is None or target >= address:
            continue
        body = [(a, o, t) for (a, o), t in zip(code, targets) if target <= a <= address]
        skips = [(a, t) for a, _, t in body if t is not None and t > a]
        path = [o for a, o, _ in body if not any(s < a < t for s, t in skips)]
        loops.append({
            "instructions": len(body),
            "main_path": len(path),
            "main_path_ldl": sum("LDL" in o for o in path),
            "main_path_p2r": sum("P2R" in o for o in path),
        })
    return loops


def resource_usage(fn, constexprs, num_warps, num_stages, arch, loops=False):
    signature = {}
    attrs = {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
            if name not in FLOATS and INTS.get(name, 1) % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    return cubin_usage(compiled, loops)


def cubin_usage(compiled, loops=False):
    """Registers, spill stack and shared memory of a compiled kernel (and
    with `loops` its `loop_counts`), read from its cubin with cuobjdump."""
    tool = pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        text = subprocess.run([str(tool), "-res-usage", cubin.name],
                              capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(tool), "-sass", cubin.name], capture_output=True,
                              text=True, check=True).stdout if loops else ""
    line = next(line for line in text.splitlines() if "REG:" in line)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    usage = {
        "registers": int(fields["REG"]),
        "spill_stack_bytes": int(fields["STACK"]),
        "shared_bytes": compiled.metadata.shared,
    }
    if loops:
        usage["loops"] = loop_counts(sass)
    return usage


def usage_text(r):
    """A result line's usage column in RESULTS.md."""
    usage = (r.get("error") or f"{r['registers']} registers, spills "
             f"{r['spill_stack_bytes']} B, shared {r['shared_bytes']} B")
    if r.get("loops"):
        usage += "; loops (instructions, main path, its LDL, P2R): " + ", ".join(
            f"{x['instructions']}/{x['main_path']}/{x['main_path_ldl']}/"
            f"{x['main_path_p2r']}" for x in r["loops"]
        )
    return usage


def measured(result, measure):
    """`result` updated with `measure()` (a dict), or with the error it
    raised; printed as one JSON line and returned."""
    try:
        result.update(measure())
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    print(json.dumps(result), flush=True)
    return result


def record_rows(tool, backend, rows, settings):
    """Appends a RESULTS.md row per result; `settings(r)`: its last column."""
    with open(HERE / "RESULTS.md", "a") as f:
        for r in rows:
            f.write(
                f"| {datetime.date.today()} | {tool} | {r['arch']} (compiled, "
                f"no GPU) | {backend} | {commit()} | {usage_text(r)} | "
                f"{settings(r)} |\n"
            )


def parse_tiles(text):
    try:
        block_q, block_k, warps, stages = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"tiles are block_q,block_k,num_warps,num_stages. Received: {text!r}"
        ) from None
    return block_q, block_k, warps, stages


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", nargs="+", type=parse_tiles,
                        default=[(64, 64, 8, 2), (32, 64, 8, 2), (64, 64, 4, 2)],
                        metavar="BQ,BK,WARPS,STAGES")
    parser.add_argument("--arch", type=int, default=90,
                        help="CUDA compute capability x 10 (default 90, sm_90)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--loops", action="store_true",
                        help="also count each loop's instructions (cuobjdump -sass)")
    parser.add_argument("--record", action="store_true",
                        help="append one row per line to benchmarks/RESULTS.md")
    args = parser.parse_args()
    triton_attention.register_operators()  # jits the kernels
    rows = []
    for has_span in (False, True):
        for name, (fn, constexprs) in kernels(has_span, args.head_dim).items():
            for block_q, block_k, warps, stages in args.tiles:
                result = {"kernel": name, "adaptive_span": has_span,
                          "tiles": [block_q, block_k, warps, stages],
                          "arch": f"sm_{args.arch}", "triton": triton.__version__}
                if block_q > block_k and name != "dkdv":
                    result["error"] = "this kernel needs block_q <= block_k"
                    print(json.dumps(result), flush=True)
                else:
                    tiles = dict(BQ=block_q, BK=block_k)
                    if name.startswith("dkdv"):
                        tiles["BQE"] = triton_attention._edge_rows(block_q, has_span)
                    measured(result, lambda: resource_usage(
                        fn, dict(constexprs, **tiles), warps, stages, args.arch,
                        loops=args.loops,
                    ))
                rows.append(result)
    if args.record:
        record_rows("triton_registers", "torch", rows, lambda r: (
            f"kernel {r['kernel']}, adaptive span {r['adaptive_span']}, tiles "
            f"{tuple(r['tiles'])}, triton {r['triton']}, D {args.head_dim}, "
            f"bf16, dropout, matmul position design, arguments specialised as "
            f"at enwik8_small"
        ))


if __name__ == "__main__":
    main()
