"""Training throughput of AllAttentionLM: tokens/s, peak memory, MFU.

Times `model.fit` steps (after warm-up and compilation) on random tokens
for a preset's geometry on the current Keras backend, and prints one JSON
line per configuration:

    KERAS_BACKEND=jax python benchmarks/throughput.py \
        --preset enwik8_small --span fixed:2048 --batch-size 64
    KERAS_BACKEND=torch python benchmarks/throughput.py \
        --preset enwik8_small --span adaptive:1024 --compare-transformer

`--span fixed:S` turns adaptive span off with `max_span=S`; `--span
adaptive:S` keeps the preset's `max_span` (8192 for enwik8_small) with every
head's learned span set to about `S` tokens. Model FLOPs per token count
the forward pass as the projections (8 d^2), the context and persistent
scores and value sums (4 A d + 4 N d, A the span: the learned one with
adaptive span) and the position scores (2 A d) per layer, plus the output
layer, and the backward pass as twice the forward; MFU divides by the
card's dense bf16 peak. `--record` appends a dated row (card, backend,
commit) to benchmarks/RESULTS.md. `--profile DIR` adds where the step's
device time goes (the attention kernels, matmuls, copies, the rest; the
top kernels), from a profiler trace of `--profile-steps` more steps.
"""

import argparse
import datetime
import json
import pathlib
import time

import keras
import _profile
import numpy as np
from _common import commit
from _common import device_name

from keras_allattn import AllAttentionLM
from keras_allattn import compiling
from keras_allattn.presets import get_preset
from keras_allattn.training import AdagradClip

# Dense bf16 matrix peaks (datasheet, TFLOP/s) by device name fragment.
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="enwik8_small")
    parser.add_argument("--span", default="fixed:2048",
                        help="fixed:S or adaptive:S (tokens)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--hidden-dim", type=int, default=None)
    parser.add_argument("--num-heads", type=int, default=None)
    parser.add_argument("--persistent", type=int, default=None,
                        help="persistent vectors per head")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--dtype", default="mixed_bfloat16")
    parser.add_argument("--dropout", default="0",
                        help="attention dropout rate, or 'recipe' for the "
                        "preset's (0.3 or 0.4)")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="the device memory the model's remat='auto' "
                        "may plan for (e.g. 80 to act as an 80 GB card on a "
                        "larger one: JAX's allocator and PyTorch are "
                        "limited to it as well)")
    parser.add_argument("--implementation", default="auto",
                        choices=["auto", "portable", "fused"])
    parser.add_argument("--remat", choices=["auto", "on", "off", "attention", "layer"],
                        default="auto",
                        help="the model's remat: auto (its memory estimate "
                        "chooses), on (= attention), off, attention, layer")
    parser.add_argument("--jit-compile", choices=["auto", "on", "off"],
                        default="auto",
                        help="compile's jit_compile; auto: on (XLA on "
                        "TensorFlow and JAX; on PyTorch one torch.compile "
                        "graph of the step, fused Triton kernels included), "
                        "except on PyTorch where the step cannot be traced "
                        "(Keras's seeded Dropout: --dropout recipe's "
                        "embedding dropout), which then runs eagerly")
    parser.add_argument("--span-granularity", type=parse_granularity,
                        default=None, metavar="auto|S",
                        help="adaptive span: the model's span_granularity, "
                             "how the attended memory length is rounded up: "
                             "auto (a step relative to the length, 1088 -> "
                             "1152) or a fixed step S in tokens; default the "
                             "model's, auto")
    parser.add_argument("--compare-transformer", action="store_true",
                        help="also time the Transformer baseline (12 layers, "
                        "feed-forward 2048, no persistent vectors)")
    parser.add_argument("--profile", metavar="DIR",
                        help="after the timed steps, train --profile-steps "
                        "more under the backend's profiler, write the trace "
                        "under DIR and add where the step's device time goes "
                        "to the JSON line (`profile`: by category and the "
                        "top kernels, per step; see benchmarks/_profile.py)")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--profile-python", action="store_true",
                        help="PyTorch: the profile also records the Python "
                        "calls (where the host's time between steps goes)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if args.profile_steps < 1:
        parser.error("--profile-steps must be positive. Received: "
                     f"--profile-steps={args.profile_steps}")
    return args


def parse_granularity(text):
    """`--span-granularity`: "auto" or a positive int."""
    if text == "auto":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(
        '`--span-granularity` must be "auto" or a positive integer. '
        f"Received: --span-granularity={text!r}"
    )


def parse_span(text):
    kind, _, tokens = text.partition(":")
    if kind not in ("fixed", "adaptive") or not tokens.isdigit():
        raise ValueError(
            "`--span` must be fixed:S or adaptive:S with S a number of "
            f"tokens. Received: --span={text!r}"
        )
    return kind, int(tokens)


def reset_peak_memory():
    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


def peak_memory_gib():
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        stats = jax.local_devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
    elif backend == "torch":
        import torch

        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    else:
        import tensorflow as tf

        try:
            peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
        except (ValueError, RuntimeError):
            peak = None
    return None if peak is None else round(peak / 2**30, 2)


def synchronize(model):
    keras.ops.convert_to_numpy(model.trainable_weights[0])
    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def flops_per_token(model, spans):
    """Training FLOPs per token (forward x 3), `spans` the mean span."""
    d, n = model.hidden_dim, model.persistent_memory_size
    per_layer = 8 * d * d + 6 * spans * d + 4 * n * d
    if model.feedforward_dim:
        per_layer += 4 * d * model.feedforward_dim
    # The output layer as a full softmax (an upper bound with an adaptive one).
    forward = model.num_layers * per_layer + 2 * d * model.vocabulary_size
    return 3 * forward


def build(args, transformer, optimizer=None):
    """The compiled model; `optimizer` None: the recipe's Adagrad at its
    full rate, no schedule (what the throughput does not depend on)."""
    preset = get_preset(args.preset)
    config = dict(preset["model"])
    kind, span = parse_span(args.span)
    if kind == "fixed":
        config.update(adaptive_span=False, max_span=span)
    if transformer:
        config.update(num_layers=12, feedforward_dim=2048,
                      persistent_memory_size=0)
    for key, value in (("batch_size", args.batch_size),
                       ("block_size", args.block_size),
                       ("num_layers", args.layers),
                       ("hidden_dim", getattr(args, "hidden_dim", None)),
                       ("num_heads", getattr(args, "num_heads", None)),
                       ("persistent_memory_size", getattr(args, "persistent", None)),
                       # (scaling.py and loss_match.py build through here
                       # with arguments of their own, without this one)
                       ("span_granularity", getattr(args, "span_granularity", None))):
        if value is not None:
            config[key] = value
    remat = {"on": "attention", "off": False}.get(args.remat, args.remat)
    dropout = (preset["model"].get("dropout", 0.0) if args.dropout == "recipe"
               else float(args.dropout))
    embedding = (preset["model"].get("embedding_dropout", 0.0)
                 if args.dropout == "recipe" else 0.0)
    config.update(dropout=dropout, embedding_dropout=embedding)
    model = AllAttentionLM(**config, dtype=args.dtype,
                           implementation=args.implementation, remat=remat)
    if kind == "adaptive":
        ratio = (span - model.span_ramp) / model.max_span
        for layer in model.attention_layers:
            layer.span.span_ratio.assign(np.full((model.num_heads,), ratio))
            # Held there: Adagrad's first steps would move every ratio by
            # about the learning rate (0.07 x 8192 tokens) and retrace.
            layer.span.span_ratio.trainable = False
    recipe = preset["recipe"]
    model.compile(
        optimizer=optimizer or AdagradClip(
            recipe["learning_rate"], grad_clip=recipe["clip"]
        ),
        # With an adaptive softmax the model computes its own loss.
        loss=None if model.adaptive_softmax is not None else
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile(args, model),
    )
    return model, config, remat


def jit_compile(args, model):
    """`compile`'s jit_compile for `--jit-compile`: auto compiles, except
    a PyTorch step that would run eagerly anyway (so the row says eager)."""
    if args.jit_compile == "auto":
        return not (
            keras.backend.backend() == "torch"
            and compiling.untraceable_reason(model)
        )
    return args.jit_compile == "on"


def measure(args, transformer=False):
    model, config, _ = build(args, transformer)
    batch, block = config["batch_size"], config["block_size"]
    rng = np.random.default_rng(0)
    profiled = args.profile_steps if getattr(args, "profile", None) else 0
    total = args.warmup_steps + args.steps + profiled
    x = rng.integers(0, config["vocabulary_size"], (total * batch, block), "int32")
    y = np.roll(x, -1, axis=1)
    warm = args.warmup_steps * batch
    # The peak covers the last warm-up step and the timed ones, not the
    # first step (compilation, and on PyTorch inductor's benchmarking of
    # its kernels): a compiled PyTorch step replayed as a CUDA graph
    # allocates its memory (the graph's pool) when it is recorded, at its
    # second call, and none when it replays.
    first = batch if args.warmup_steps > 1 else 0
    if first:
        model.fit(x[:first], y[:first], batch_size=batch, shuffle=False, verbose=0)
        synchronize(model)
    reset_peak_memory()
    model.fit(x[first:warm], y[first:warm], batch_size=batch, shuffle=False,
              verbose=0)
    remat = model.resolved_remat
    synchronize(model)
    start = time.perf_counter()
    timed = slice(warm, warm + args.steps * batch)
    model.fit(x[timed], y[timed], batch_size=batch, shuffle=False, verbose=0)
    synchronize(model)
    elapsed = time.perf_counter() - start
    peak_gib = peak_memory_gib()
    spans = model.current_spans()
    attended = sorted(set(model.attended_spans()))
    profile = None
    if profiled:
        rest = slice(timed.stop, None)

        def run():
            model.fit(x[rest], y[rest], batch_size=batch, shuffle=False, verbose=0)
            synchronize(model)

        profile = _profile.profile(run, args.profile, profiled,
                                   keras.backend.backend(),
                                   python_stacks=getattr(args, "profile_python", False))
    tokens_per_s = args.steps * batch * block / elapsed
    flops = flops_per_token(model, float(spans.mean()))
    device = device_name()
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device), None)
    return {
        "benchmark": "throughput",
        "model": "transformer" if transformer else "all-attention",
        "preset": args.preset,
        "span": args.span,
        "backend": keras.backend.backend(),
        "device": device,
        "dtype_policy": args.dtype,
        "implementation": args.implementation,
        "remat": remat,
        "jit_compile": step_compiled(model),
        "batch_size": batch,
        "block_size": block,
        "num_layers": model.num_layers,
        "hidden_dim": model.hidden_dim,
        "num_heads": model.num_heads,
        "persistent": model.persistent_memory_size,
        "mean_span": round(float(spans.mean()), 1),
        "attended_spans": attended,
        "span_granularity": model.span_granularity,
        "dropout": config["dropout"],
        "memory_budget_gib": args.memory_gib,
        "steps": args.steps,
        "tokens_per_s": round(tokens_per_s),
        "step_ms": round(1000 * elapsed / args.steps, 1),
        "peak_memory_gib": peak_gib,
        "model_flops_per_token": flops,
        "mfu": None if peak is None else round(tokens_per_s * flops / (peak * 1e12), 4),
        "bf16_peak_tflops": peak,
        "kernel_settings": kernel_settings_used(),
        **({"profile": profile} if profile else {}),
    }


def step_compiled(model):
    """Whether the training steps ran compiled: `jit_compile` on TensorFlow
    and JAX; on PyTorch, whether the traced step was built and ran (where it
    cannot be traced it falls back to eager, with a warning, and a row must
    not say it was compiled)."""
    if not model.jit_compile:
        return False
    if keras.backend.backend() != "torch":
        return True
    return bool(model.__dict__.get("_torch_train_steps"))


def kernel_settings_used():
    """The fused kernels' settings this run used (the environment may set
    them): the position-score cap, and on PyTorch the Triton kernels'
    position design, whether a compiled step on CUDA replays as a CUDA
    graph and whether the segment memory is a ring buffer."""
    from keras_allattn.ops import kernel_settings

    used = {"position_bytes": kernel_settings.position_bytes()}
    if keras.backend.backend() == "torch":
        from keras_allattn import compiling
        from keras_allattn.layers.segment_memory import ring_storage

        used["triton_position"] = kernel_settings.triton_position()
        used["cuda_graphs"] = compiling.cuda_graphs_enabled()
        used["torch_ring"] = ring_storage()
    return used


def record(result):
    path = pathlib.Path(__file__).parent / "RESULTS.md"
    row = (
        f"| {datetime.date.today()} | throughput | {result['device']} | "
        f"{result['backend']} | {commit()} | {result['tokens_per_s']:,} tokens/s, "
        f"peak {result['peak_memory_gib']} GiB, MFU {result['mfu']} | "
        f"{result['model']}, preset {result['preset']}, span {result['span']} "
        f"(mean {result['mean_span']}, attended {result['attended_spans']}, "
        f"granularity {result['span_granularity']}), batch {result['batch_size']}, block "
        f"{result['block_size']}, layers {result['num_layers']}, d "
        f"{result['hidden_dim']}, heads {result['num_heads']}, N "
        f"{result['persistent']}, "
        f"{result['dtype_policy']}, implementation {result['implementation']}, "
        f"remat {result['remat']}, jit_compile {result['jit_compile']}, "
        f"dropout {result['dropout']}, "
        + ", ".join(f"{k} {v}" for k, v in result["kernel_settings"].items())
        + (f", planned for {result['memory_budget_gib']:g} GiB"
           if result["memory_budget_gib"] else "")
        + " |\n"
    )
    with open(path, "a") as f:
        f.write(row)


def limit_memory(gib):
    """Acts as a card of `gib` GiB: the remat planning, and the backend."""
    import os

    os.environ["KERAS_ALLATTN_MEMORY_GIB"] = str(gib)
    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))


def main():
    args = parse_args()
    if args.memory_gib:
        limit_memory(args.memory_gib)
    runs = [False, True] if args.compare_transformer else [False]
    for transformer in runs:
        result = measure(args, transformer)
        print(json.dumps(result), flush=True)
        if args.record:
            record(result)


if __name__ == "__main__":
    main()
