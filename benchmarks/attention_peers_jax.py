"""The Pallas kernels against the fused attention JAX offers, one layer's worth.

The JAX counterpart of `attention_peers.py`: a layer's all-attention
(`pallas_all_attention`, the XLA position matmuls included) beside the
dense attention kernels available to JAX on the same card, over the same
`Q K^T` and `A V` work (each of M queries against the `A` distances of its
band plus the `N` persistent vectors, as `A + N` dense keys; no
relative-position term, band or span):

* "cudnn": `jax.nn.dot_product_attention(..., implementation="cudnn")`
  (cuDNN's fused attention);
* "mosaic": jax's Hopper example kernel written with Pallas's Mosaic GPU
  backend (`jax.experimental.pallas.ops.gpu.attention_mgpu`, warpgroup
  matrix multiplies, asynchronous copies, warp specialisation), forward and
  backward, in float16 (the only type it takes).

Neither peer takes attention dropout through a public API, so the peers run
without it; the library runs at `--dropout` (and its own dropout-free time
with `--dropout 0`). Per configuration (`kernel_check.py`'s shapes), one
JSON line with each implementation's forward and forward+backward time (ms
a layer, median of `--repeats` jit-compiled calls) and useful TFLOP/s as
`attention_peers.py` counts them (forward+backward = 3.5 forwards; the
library's forward adds `Q P`).

Usage (on the GPU machine):

    KERAS_BACKEND=jax python3 benchmarks/attention_peers_jax.py \\
        --configs enwik8_small_bf16,fixed_A1024_bf16 --dropout 0 --record

`--smoke` runs a small configuration on the CPU (Pallas interpreter, the
library and an XLA dense attention only): a check of the script.
"""

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kernel_check as kc  # noqa: E402
from _common import append_peers_row  # noqa: E402
from _common import check_names  # noqa: E402
from _common import device_name  # noqa: E402

PEERS = ("cudnn", "mosaic")
SMOKE = dict(batch=2, queries=64, length=128, heads=2, head_dim=64,
             persistent=64, span=None, integration="joint", dtypes=("float32",))


def useful_flops(cfg, batch, peer):
    """Forward+backward flops of the matmuls the function needs."""
    m, h, d, a, n = (cfg[k] for k in ("queries", "heads", "head_dim", "length", "persistent"))
    macs = batch * h * m * d * (2 * (a + n) + (0 if peer else a))
    return 3.5 * 2 * macs


def _dense_inputs(cfg, batch, dtype):
    rng = np.random.default_rng(0)
    m, h, d = cfg["queries"], cfg["heads"], cfg["head_dim"]
    keys = cfg["length"] + cfg["persistent"]
    q = jnp.asarray(rng.normal(size=(batch, m, h, d)) * 0.5, dtype)
    k = jnp.asarray(rng.normal(size=(batch, keys, h, d)) * 0.5, dtype)
    v = jnp.asarray(rng.normal(size=(batch, keys, h, d)), dtype)
    ct = jnp.asarray(rng.normal(size=(batch, m, h, d)), dtype)
    return (q, k, v), ct


def _peer_fn(name):
    if name == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if name == "xla":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    config = attention_mgpu.TuningConfig(
        block_q=64, block_kv=64, max_concurrent_steps=2,
        block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64,
    )
    return lambda q, k, v: attention_mgpu.attention(q, k, v, config)


def _time_pair(fn, arrays, ct, repeats):
    fwd, both, xs, _ = kc.fwd_bwd(fn, list(arrays))
    return kc.timed(fwd, (xs,), repeats), kc.timed(both, (xs, ct), repeats)


def measure(name, cfg, batch, dtype, repeats, peer):
    record = {}
    try:
        if peer:
            # jax's Mosaic GPU example takes float16 (the same speed as
            # bfloat16 on the tensor cores).
            arrays, ct = _dense_inputs(
                cfg, batch, jnp.float16 if name == "mosaic" else dtype)
            fwd, fwd_bwd = _time_pair(_peer_fn(name), arrays, ct, repeats)
        else:
            arrays, ct = kc.make_inputs(cfg, batch, dtype)
            fwd, fwd_bwd = _time_pair(kc.kernel_fn(cfg), arrays, ct, repeats)
    except Exception as error:  # a peer that does not take this shape here
        record[f"{name}_error"] = repr(error)[:300]
        return record
    record[f"{name}_fwd_ms"] = fwd
    record[f"{name}_fwd_bwd_ms"] = fwd_bwd
    record[f"{name}_tflops"] = round(
        useful_flops(cfg, batch, peer) / (fwd_bwd / 1e3) / 1e12, 1)
    return record


def append_row(record, peers):
    mosaic = "mosaic in float16; " if "mosaic" in peers else ""
    append_peers_row(
        "attention_peers_jax", record["device"], "jax", record, ["library"] + peers,
        f"config {record['config']}, batch {record['batch']}, {record['dtype']}, "
        f"library dropout {record['dropout']}; {mosaic}peers over A + N dense keys "
        f"without dropout (no position term, band or span)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="enwik8_small_bf16,fixed_A1024_bf16",
                        help=f"comma-separated names among {sorted(kc.CONFIGS)}")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="the library's attention dropout (the peers run without)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated names among {list(PEERS)}")
    parser.add_argument("--record", action="store_true",
                        help="append a row per configuration to benchmarks/RESULTS.md")
    parser.add_argument("--smoke", action="store_true",
                        help="a small configuration on the CPU (a check of the script)")
    args = parser.parse_args()
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1). Received: --dropout {args.dropout}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1. Received: --repeats {args.repeats}")
    names = check_names(parser, "--configs", args.configs, kc.CONFIGS)
    peers = check_names(parser, "--peers", args.peers, PEERS)
    kc.DROPOUT[0] = args.dropout
    configs = [(n, kc.CONFIGS[n]) for n in names]
    if args.smoke:
        kc.INTERPRET[0] = True
        configs, peers = [("smoke", SMOKE)], ["xla"]
    for name, cfg in configs:
        dtype = jnp.dtype(cfg["dtypes"][0])
        batch = cfg["batch"]
        record = {"benchmark": "attention_peers_jax", "config": name,
                  "device": device_name(), "batch": batch, "dtype": str(dtype),
                  "dropout": args.dropout}
        record.update(measure("library", cfg, batch, dtype, args.repeats, False))
        for peer in peers:
            record.update(measure(peer, cfg, batch, dtype, args.repeats, True))
        print(json.dumps(record), flush=True)
        if args.record and not args.smoke:
            append_row(record, peers)


if __name__ == "__main__":
    main()
