"""Data-parallel scaling: training tokens/s of a preset on 1..N devices.

On one host, trains `AllAttentionLM` data parallel as `keras_allattn.distribution` sets
it up on the current backend (the segment memory sharded with the rows),
on random tokens, with a fixed number of rows per device (weak scaling:
8 devices x 8 rows is the paper's batch of 64), and prints one JSON line
per device count: tokens/s and the efficiency against one device,
`tokens_per_s(N) / (N * tokens_per_s(1))`. `--record` appends a row per
count to the scaling table of `benchmarks/RESULTS.md`.

    # JAX and TensorFlow: every count in one process
    KERAS_BACKEND=jax python benchmarks/scaling.py --preset enwik8_small \\
        --devices 1,2,4,8 --record
    # PyTorch: one count per launch (DDP ranks are processes); the 1-device
    # row first, then each launch finds it in RESULTS.md for its efficiency
    KERAS_BACKEND=torch python benchmarks/scaling.py --record
    KERAS_BACKEND=torch torchrun --nproc_per_node 8 benchmarks/scaling.py --record
    # CPU smoke check (virtual devices share the cores: never recorded)
    KERAS_BACKEND=jax python benchmarks/scaling.py --preset char_tiny_cpu \\
        --cpu-devices 8 --devices 1,8 --steps 2 --warmup-steps 1

Multi-process rows: one process per GPU, as on several hosts, against one
process driving the same GPUs (the row of `--devices 2` above). JAX: every
process runs the same command with `KERAS_DISTRIBUTION_*` set
(`jax.distributed.initialize` through `keras.distribution.initialize()`)
and sees its own GPU; the run uses every device of every process. PyTorch
DDP is one process per GPU anyway (`torchrun`), so its rows are the
multi-process ones:

    for i in 0 1; do KERAS_BACKEND=jax KERAS_DISTRIBUTION_JOB_ADDRESSES=localhost:1234 \\
        KERAS_DISTRIBUTION_NUM_PROCESSES=2 KERAS_DISTRIBUTION_PROCESS_ID=$i \\
        CUDA_VISIBLE_DEVICES=$i python benchmarks/scaling.py --record & done; wait

The devices cell of such a row says how many processes ran ("2 (2
processes)"); the JSON line adds `vs_one_process`, its tokens/s over the
last recorded one-process row of as many devices, backend, card and
settings.

The model and optimizer are `benchmarks/throughput.py`'s (`--span`,
`--dtype`, `--implementation`, `--remat` as there). JAX and TensorFlow
train with `fit` (XLA on JAX; TensorFlow's `fit` runs without XLA under a
strategy); PyTorch with `DataParallelTrainer`'s eager DDP loop.
"""

import argparse
import datetime
import json
import os
import pathlib
import time

import keras
import numpy as np

import throughput
from keras_allattn.data import StreamBatcher
from keras_allattn.distribution import DataParallelTrainer
from keras_allattn.distribution import plan_data_parallel
from keras_allattn.distribution import use_virtual_cpu_devices
from keras_allattn.presets import get_preset

RESULTS = pathlib.Path(__file__).parent / "RESULTS.md"
TABLE_HEADING = "## Data-parallel scaling"
ROUTES = {
    "jax": "keras.distribution + fit",
    "tensorflow": "MirroredStrategy + fit",
    "torch": "DataParallelTrainer (DDP, eager)",
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="enwik8_small")
    parser.add_argument("--span", default="fixed:2048",
                        help="fixed:S or adaptive:S (tokens)")
    parser.add_argument("--devices",
                        help="device counts, e.g. 1,2,4,8 (JAX, TensorFlow; "
                        "default: 1 and the powers of two up to all devices); "
                        "PyTorch measures its world size")
    parser.add_argument("--batch-per-device", type=int,
                        help="rows per device (default: the preset's batch / 8)")
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--dtype", default="mixed_bfloat16")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--implementation", default="auto",
                        choices=["auto", "portable", "fused"])
    parser.add_argument("--remat", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--jit-compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--cpu-devices", type=int,
                        help="split the CPU into this many devices (smoke check)")
    parser.add_argument("--record", action="store_true")
    return parser.parse_args()


def device_pool():
    """The devices to take the first N of (JAX and TensorFlow)."""
    if keras.backend.backend() == "jax":
        return keras.distribution.list_devices()
    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    return gpus or [d.name for d in tf.config.list_logical_devices("CPU")]


def device_counts(args, pool_size):
    if args.devices:
        counts = [int(n) for n in args.devices.split(",")]
    else:
        counts = [1 << k for k in range(pool_size.bit_length()) if 1 << k <= pool_size]
    if max(counts) > pool_size:
        raise SystemExit(f"--devices asks for {max(counts)}, {pool_size} available")
    return counts


def random_batcher(rows, block, steps):
    """Random tokens for `steps` batches of `rows` streams (vocabulary 256)."""
    length = rows * (block * (steps + 2) + 1)
    tokens = np.random.default_rng(0).integers(0, 256, length, dtype=np.int32)
    return StreamBatcher(tokens, rows, block, seed=0)


def measure(args, devices=None):
    """Tokens/s on `devices` (JAX, TensorFlow) or on the torchrun ranks."""
    config = dict(get_preset(args.preset)["model"])
    for key, value in (("block_size", args.block_size), ("num_layers", args.layers)):
        if value is not None:
            config[key] = value
    if devices:
        replicas = len(devices)
    elif keras.backend.backend() == "jax":  # several processes, initialised
        replicas = len(keras.distribution.list_devices())
    else:
        replicas = int(os.environ.get("WORLD_SIZE", "1"))
    config["batch_size"] = args.batch_per_device * replicas
    plan = plan_data_parallel(config, devices=devices)
    plan.activate()
    run_args = argparse.Namespace(**vars(args), batch_size=plan.model_batch_size)
    model, config, remat = throughput.build(run_args, transformer=False)
    plan.check_model(model)
    if plan.strategy is not None:
        model.jit_compile = False  # Keras's `fit` does no XLA under tf.distribute
    block = config["block_size"]
    total = args.warmup_steps + args.steps
    batcher = plan.shard(random_batcher(plan.global_batch_size, block, total))
    if plan.uses_fit and plan.backend != "torch":  # torch: always the loop
        def run(steps, start):
            model.fit(batcher.as_dataset(start), steps_per_epoch=steps, verbose=0)
    else:
        trainer = DataParallelTrainer(model, plan)

        def run(steps, start):
            trainer.train(batcher, steps, start)

    run(args.warmup_steps, 0)
    throughput.synchronize(model)
    start = time.perf_counter()
    run(args.steps, args.warmup_steps)
    throughput.synchronize(model)
    elapsed = time.perf_counter() - start
    result = {
        "benchmark": "scaling",
        "preset": args.preset,
        "backend": keras.backend.backend(),
        "device": throughput.device_name(),
        "devices": plan.num_replicas,
        "processes": plan.process_count,
        "batch_per_device": args.batch_per_device,
        "global_batch_size": plan.global_batch_size,
        "tokens_per_s": round(args.steps * plan.global_batch_size * block / elapsed),
        "step_ms": round(1000 * elapsed / args.steps, 1),
        "settings": (
            f"preset {args.preset}, span {args.span}, {args.batch_per_device} "
            f"rows per device, block {block}, layers {config['num_layers']}, "
            f"{args.dtype}, implementation {args.implementation}, remat "
            f"{remat}, {ROUTES[keras.backend.backend()]}"
        ),
        "is_main_process": plan.process_index == 0,
    }
    del model
    keras.backend.clear_session()
    return result


def recorded_baseline(result, devices=1):
    """tokens/s of the last recorded one-process row of `devices` devices
    with the same backend, card and settings (None without one)."""
    baseline = None
    for line in RESULTS.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[1] == str(devices) and cells[2:4] == [
            result["backend"], result["device"]
        ] and cells[7] == result["settings"]:
            baseline = float(cells[4].replace(",", ""))
    return baseline


def devices_cell(result):
    """The devices cell: the count, and the processes where several ran."""
    if result["processes"] == 1:
        return str(result["devices"])
    return f"{result['devices']} ({result['processes']} processes)"


def record(result):
    """Adds `result` as the last row of the scaling table."""
    lines = RESULTS.read_text().split("\n")
    at = lines.index(TABLE_HEADING)
    while not lines[at].startswith("|"):
        at += 1
    while at < len(lines) and lines[at].startswith("|"):
        at += 1
    efficiency = result["efficiency"]
    lines.insert(at, (
        f"| {datetime.date.today()} | {devices_cell(result)} | {result['backend']} "
        f"| {result['device']} | {result['tokens_per_s']:,} | "
        f"{'n/a' if efficiency is None else f'{efficiency:.1%}'} | "
        f"{throughput.commit()} | {result['settings']} |"
    ))
    RESULTS.write_text("\n".join(lines))


def main():
    args = parse_args()
    if args.cpu_devices:
        use_virtual_cpu_devices(args.cpu_devices)
    if args.batch_per_device is None:
        args.batch_per_device = max(1, get_preset(args.preset)["model"]["batch_size"] // 8)
    if keras.backend.backend() == "torch":
        results = [measure(args)]
    elif os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES"):
        # JAX, several processes: all their devices, once.
        keras.distribution.initialize()
        results = [measure(args)]
    else:
        pool = device_pool()
        results = [measure(args, pool[:n]) for n in device_counts(args, len(pool))]
    one = next((r["tokens_per_s"] for r in results if r["devices"] == 1), None)
    for result in results:
        if not result.pop("is_main_process"):
            continue
        baseline = one or recorded_baseline(result)
        result["efficiency"] = (
            None if baseline is None
            else round(result["tokens_per_s"] / (result["devices"] * baseline), 4)
        )
        if result["processes"] > 1:
            one_process = recorded_baseline(result, result["devices"])
            result["vs_one_process"] = (
                None if one_process is None
                else round(result["tokens_per_s"] / one_process, 4)
            )
        print(json.dumps(result), flush=True)
        if args.record:
            if result["device"] == "CPU":
                print("not recorded: CPU devices share the same cores", flush=True)
            else:
                record(result)


if __name__ == "__main__":
    main()
