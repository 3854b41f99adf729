"""Peak device memory of the word-level loss: adaptive softmax vs full softmax.

Measures one compiled forward and backward pass of the loss alone (hidden
states in, mean negative log-likelihood of the targets out, gradients for
the hidden states and every output weight) at the WikiText-103 geometry:
vocabulary 267,735, batch 64 x block 256 positions, width 512, targets
drawn from a Zipf law over the frequency-ordered vocabulary. Two
configurations:

- `adaptive`: `AdaptiveSoftmax` (cutoffs 20000 / 40000 / 200000, div_val 4,
  tied to an `AdaptiveEmbedding` as in `AllAttentionLM`), target path:
  chunks of `--chunk-size` positions, recomputed in the backward pass.
- `full`: a dense layer to all 267,735 logits (float32) and
  `sparse_categorical_crossentropy`, the plain model's output layer.

Each configuration runs in a fresh process (JAX's peak counter cannot be
reset) and prints one JSON line: the peak device memory during the step
and the part of it above what was allocated before (weights and inputs),
the step time, and on JAX the temporary buffer size XLA plans for the
compiled step (also meaningful on a CPU). Peak memory is read from
`jax.local_devices()[0].memory_stats()` (JAX), `torch.cuda.max_memory_allocated`
(PyTorch) or `tf.config.experimental.get_memory_info` (TensorFlow); on a
CPU these are not available and the fields are null.

    KERAS_BACKEND=jax python benchmarks/adaptive_softmax_memory.py --record
    KERAS_BACKEND=torch python benchmarks/adaptive_softmax_memory.py --record
    KERAS_BACKEND=jax python benchmarks/adaptive_softmax_memory.py --small

`--small` shrinks everything (vocabulary 20,000, batch 4 x block 64, width
64) for a smoke check on a CPU. `--compile-only` (JAX) compiles the step
and reports XLA's planned temporary memory without running it, which works
at the full geometry on a CPU too (a plan for the CPU, not a GPU peak).
`--record` appends one row per configuration to benchmarks/RESULTS.md; it
refuses when no device peak was measured (CPU), so CPU figures never pass
for GPU ones.
"""

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

import keras
import numpy as np
from _common import commit
from _common import device_name

from keras_allattn import AdaptiveEmbedding
from keras_allattn import AdaptiveSoftmax

CONFIGS = ("adaptive", "full")
FULL = dict(vocabulary_size=267_735, cutoffs=[20_000, 40_000, 200_000],
            batch_size=64, block_size=256, hidden_dim=512)
SMALL = dict(vocabulary_size=20_000, cutoffs=[2_000, 4_000, 15_000],
             batch_size=4, block_size=64, hidden_dim=64)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="CPU smoke-check geometry (see above)")
    parser.add_argument("--config", choices=CONFIGS,
                        help="run this configuration in this process only")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--div-val", type=int, default=4)
    parser.add_argument("--dtype", default="float32",
                        help='layer dtype policy, e.g. "mixed_bfloat16"')
    parser.add_argument("--steps", type=int, default=3,
                        help="timed steps after the compiling one")
    parser.add_argument("--compile-only", action="store_true",
                        help="JAX: report XLA's memory plan, run nothing")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if args.compile_only and keras.backend.backend() != "jax":
        parser.error("--compile-only needs KERAS_BACKEND=jax")
    return args


class FullSoftmaxLoss(keras.layers.Layer):
    """Mean NLL through a dense layer to all logits (the plain model's)."""

    def __init__(self, vocabulary_size, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(vocabulary_size, dtype=self.dtype_policy)

    def build(self, hidden_shape, targets_shape=None):
        self.dense.build(hidden_shape)
        self.built = True

    def call(self, hidden, targets):
        logits = keras.ops.cast(self.dense(hidden), "float32")  # (n, V)
        return keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(
                targets, logits, from_logits=True
            )
        )


class AdaptiveSoftmaxLoss(keras.layers.Layer):
    """Mean NLL through a tied `AdaptiveSoftmax` (the word-level model's)."""

    def __init__(self, vocabulary_size, hidden_dim, cutoffs, div_val,
                 chunk_size, **kwargs):
        super().__init__(**kwargs)
        self.embedding = AdaptiveEmbedding(
            vocabulary_size, hidden_dim, cutoffs, div_val,
            dtype=self.dtype_policy,
        )
        self.softmax = AdaptiveSoftmax(
            vocabulary_size, hidden_dim, cutoffs, div_val,
            embedding=self.embedding, chunk_size=chunk_size,
            dtype=self.dtype_policy,
        )

    def build(self, hidden_shape, targets_shape=None):
        self.embedding.build()
        self.softmax.build(hidden_shape)
        self.built = True

    def call(self, hidden, targets):
        return -keras.ops.mean(self.softmax(hidden, targets=targets))


def zipf_targets(rng, vocabulary_size, count):
    """Token ids with p(rank r) proportional to 1 / r (most frequent first)."""
    weights = 1.0 / np.arange(1, vocabulary_size + 1)
    return rng.choice(vocabulary_size, count, p=weights / weights.sum()).astype(
        "int32"
    )


def device_memory():
    """(bytes in use, peak bytes) on the first device, or (None, None)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        stats = jax.local_devices()[0].memory_stats() or {}
        return stats.get("bytes_in_use"), stats.get("peak_bytes_in_use")
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            return None, None
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    import tensorflow as tf

    try:
        info = tf.config.experimental.get_memory_info("GPU:0")
    except (ValueError, RuntimeError):
        return None, None
    return info["current"], info["peak"]


def reset_peak():
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    elif backend == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.experimental.reset_memory_stats("GPU:0")
        except (ValueError, RuntimeError):
            pass


def step_function(layer, hidden, targets):
    """A compiled `step()` -> (loss, gradients), and XLA's temp bytes (JAX)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def loss(trainable, hidden):
            value, _ = layer.stateless_call(
                trainable, [v.value for v in layer.non_trainable_variables],
                hidden, targets,
            )
            return value

        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        trainable = [v.value for v in layer.trainable_variables]
        compiled = grad.lower(trainable, hidden).compile()
        analysis = compiled.memory_analysis()
        temp = None if analysis is None else analysis.temp_size_in_bytes

        def step():
            value, grads = compiled(trainable, hidden)
            jax.block_until_ready(grads)
            return value

        return step, temp
    if backend == "torch":
        import torch

        hidden = hidden.detach().requires_grad_()

        def step():
            for variable in layer.trainable_variables:
                variable.value.grad = None
            value = layer(hidden, targets)
            value.backward()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return value

        return step, None
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def tf_step(hidden):
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            value = layer(hidden, targets)
        grads = tape.gradient(value, [hidden, *layer.trainable_variables])
        return value, grads

    def step():
        value, grads = tf_step(hidden)
        [g.numpy() for g in grads[:1]]
        return value

    return step, None


def measure(args):
    geometry = SMALL if args.small else FULL
    vocabulary, d = geometry["vocabulary_size"], geometry["hidden_dim"]
    positions = geometry["batch_size"] * geometry["block_size"]
    if args.config == "adaptive":
        layer = AdaptiveSoftmaxLoss(
            vocabulary, d, geometry["cutoffs"], args.div_val, args.chunk_size,
            dtype=args.dtype,
        )
    else:
        layer = FullSoftmaxLoss(vocabulary, dtype=args.dtype)
    layer.build((positions, d), (positions,))
    rng = np.random.default_rng(0)
    hidden = keras.ops.convert_to_tensor(
        rng.normal(0, 1, (positions, d)).astype("float32")
    )
    targets = keras.ops.convert_to_tensor(zipf_targets(rng, vocabulary, positions))
    step, xla_temp = step_function(layer, hidden, targets)
    before, _ = device_memory()
    loss = elapsed = peak = None
    if not args.compile_only:
        reset_peak()
        loss = round(float(keras.ops.convert_to_numpy(step())), 4)  # counts
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        elapsed = round(1000 * (time.perf_counter() - start) / max(args.steps, 1), 2)
        _, peak = device_memory()
    return {
        "benchmark": "adaptive_softmax_memory",
        "config": args.config,
        "backend": keras.backend.backend(),
        "device": device_name(),
        "dtype_policy": args.dtype,
        "vocabulary_size": vocabulary,
        "cutoffs": geometry["cutoffs"] if args.config == "adaptive" else None,
        "div_val": args.div_val if args.config == "adaptive" else None,
        "chunk_size": args.chunk_size if args.config == "adaptive" else None,
        "positions": positions,
        "hidden_dim": d,
        "output_parameters": sum(
            int(np.prod(v.shape)) for v in layer.trainable_variables
        ),
        "loss": loss,
        "step_ms": elapsed,
        "peak_memory_gib": gib(peak),
        "peak_above_start_gib": gib(
            None if peak is None or before is None else peak - before
        ),
        "xla_temp_gib": gib(xla_temp),
        "full_logits_gib": gib(positions * vocabulary * 4),
    }


def gib(size):
    """Bytes in GiB (3 decimals), None stays None."""
    return None if size is None else round(size / 2**30, 3)


def record(result):
    path = pathlib.Path(__file__).parent / "RESULTS.md"
    settings = (
        f"{result['config']} softmax, V {result['vocabulary_size']:,}, "
        f"{result['positions']} positions (batch x block), d "
        f"{result['hidden_dim']}, {result['dtype_policy']}"
    )
    if result["config"] == "adaptive":
        settings += (
            f", cutoffs {result['cutoffs']}, div_val {result['div_val']}, "
            f"chunk {result['chunk_size']}, tied"
        )
    row = (
        f"| {datetime.date.today()} | adaptive_softmax_memory | "
        f"{result['device']} | {result['backend']} | {commit()} | loss fwd+bwd "
        f"peak {result['peak_memory_gib']} GiB ({result['peak_above_start_gib']}"
        f" GiB above weights and inputs), {result['step_ms']} ms/step | "
        f"{settings} |\n"
    )
    with open(path, "a") as f:
        f.write(row)


def main():
    args = parse_args()
    if args.config is not None:
        print(json.dumps(measure(args)), flush=True)
        return
    results = []
    for config in CONFIGS:
        command = [sys.executable, __file__, "--config", config,
                   "--chunk-size", str(args.chunk_size), "--div-val",
                   str(args.div_val), "--dtype", args.dtype, "--steps",
                   str(args.steps)]
        command += ["--small"] * args.small + ["--compile-only"] * args.compile_only
        run = subprocess.run(command, capture_output=True, text=True,
                             env=os.environ.copy())
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        if run.returncode or not lines:
            # The full softmax may run out of memory: report it, go on.
            result = {"benchmark": "adaptive_softmax_memory", "config": config,
                      "backend": keras.backend.backend(),
                      "error": run.stderr.strip().splitlines()[-1:]}
        else:
            result = json.loads(lines[-1])
            results.append(result)
        print(json.dumps(result), flush=True)
    if args.record:
        if any(r["peak_memory_gib"] is None for r in results) or not results:
            raise SystemExit(
                "Not recording: no device peak memory was measured (CPU run)."
            )
        for result in results:
            record(result)


if __name__ == "__main__":
    main()
