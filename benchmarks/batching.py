"""Stream-batching throughput on a 10^8-token corpus.

Times `StreamBatcher.iterate` (the batches, their one-token-shifted
targets and the memory-reset flags) and `StreamDataset` indexing (what
`model.fit` calls) over whole passes of a random int32 corpus the size of
enwik8, and prints one JSON line. With `--record` it also appends a dated
row to `benchmarks/RESULTS.md`.

    KERAS_BACKEND=jax .venv/bin/python benchmarks/batching.py --record
"""

import argparse
import datetime
import json
import os
import subprocess
import time

import keras
import numpy as np

from keras_allattn.data import StreamBatcher

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
HEADER = """# Benchmark results

Measured numbers, one row per run, appended by the scripts in `benchmarks/`.

| date | benchmark | card | backend | commit | result | settings |
|---|---|---|---|---|---|---|
"""


def commit():
    """Short hash of HEAD, or "uncommitted" when the measured code differs."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True
        )

    head = git("rev-parse", "--short", "HEAD")
    measured = ["keras_allattn/data", "benchmarks/batching.py"]
    changes = git("status", "--porcelain", "--", *measured)
    if head.returncode or changes.returncode or changes.stdout.strip():
        return "uncommitted"
    return head.stdout.strip()


def measure(function, steps):
    start = time.perf_counter()
    for step in range(steps):
        function(step)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10**8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--card", default="CPU (2 cores)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    corpus = np.random.default_rng(args.seed).integers(
        0, 256, args.tokens, dtype=np.int32
    )
    start = time.perf_counter()
    batcher = StreamBatcher(
        corpus, args.batch_size, args.block_size, seed=args.seed
    )
    setup_s = time.perf_counter() - start
    steps = sum(batcher.batches_in_pass(p) for p in range(args.passes))
    tokens = steps * args.batch_size * args.block_size

    iterator = iter(batcher.iterate(steps))
    iterate_s = measure(lambda _: next(iterator), steps)
    dataset = batcher.as_dataset()
    dataset_s = measure(dataset.__getitem__, steps)

    result = {
        "benchmark": "stream_batching",
        "tokens_per_s": tokens / iterate_s,
        "dataset_tokens_per_s": tokens / dataset_s,
        "corpus_tokens": args.tokens,
        "batch_size": args.batch_size,
        "block_size": args.block_size,
        "steps": steps,
        "passes": args.passes,
        "setup_s": setup_s,
        "backend": keras.backend.backend(),
        "card": args.card,
    }
    print(json.dumps(result))
    if args.record:
        if not os.path.exists(RESULTS):
            with open(RESULTS, "w") as f:
                f.write(HEADER)
        row = (
            f"| {datetime.date.today().isoformat()} | stream_batching "
            f"| {args.card} | {result['backend']} | {commit()} "
            f"| {result['tokens_per_s'] / 1e6:,.0f}M tokens/s "
            f"(StreamDataset: {result['dataset_tokens_per_s'] / 1e6:,.0f}M) "
            f"| {args.tokens:,} random int32 tokens, batch {args.batch_size}, "
            f"block {args.block_size}, {args.passes} passes ({steps} batches) |\n"
        )
        with open(RESULTS, "a") as f:
            f.write(row)


if __name__ == "__main__":
    main()
