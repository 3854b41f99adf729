"""Per-step training losses of two setups from the same weights on real text.

Trains AllAttentionLM twice from identical initial weights on the same
contiguous streams of a real corpus (the preset's recipe optimizer, fitted
to the run by `scale_recipe`: Adagrad warms up over three times the run,
Adam over a tenth of it) and compares the loss of every
step. One JSON line per comparison: the largest and mean relative
difference of the step losses, the first and last losses of each run.

- `--compare implementations`: the fused kernels (`implementation="fused"`,
  Pallas on JAX, Triton on PyTorch) against the portable `keras.ops` path,
  one process:

      KERAS_BACKEND=jax python benchmarks/loss_match.py --compare implementations \\
          --data ../shared/data/enwik8-head/enwik8-head.txt.xz --steps 200 --layers 6

- `--compare devices`: one device with the global batch against N devices
  data parallel with the same global batch (the segment memory sharded with
  the rows), with the verdict of the equivalence criterion (below). JAX,
  N devices of one process: all runs in one process (`--devices N`). N
  processes (PyTorch DDP ranks, or JAX processes, one per device or host):
  first the one-device runs, which save the initial weights and the losses,
  then the N-process launch, which loads them and compares:

      KERAS_BACKEND=jax python benchmarks/loss_match.py --compare devices --devices 2
      # or: the one-device runs saved once (below), then 2 devices of one
      # process compared with them (all of its devices)
      KERAS_BACKEND=jax python benchmarks/loss_match.py --compare devices \\
          --reference /tmp/one_gpu
      KERAS_BACKEND=torch python benchmarks/loss_match.py --compare devices \\
          --save /tmp/one_gpu
      KERAS_BACKEND=torch torchrun --nproc_per_node 2 benchmarks/loss_match.py \\
          --compare devices --reference /tmp/one_gpu
      # JAX, 2 processes (on one machine here; on two hosts, host0's address)
      KERAS_BACKEND=jax python benchmarks/loss_match.py --compare devices \\
          --save /tmp/one_gpu
      for i in 0 1; do KERAS_BACKEND=jax KERAS_DISTRIBUTION_JOB_ADDRESSES=localhost:1234 \\
          KERAS_DISTRIBUTION_NUM_PROCESSES=2 KERAS_DISTRIBUTION_PROCESS_ID=$i \\
          CUDA_VISIBLE_DEVICES=$i python benchmarks/loss_match.py --compare devices \\
          --reference /tmp/one_gpu & done; wait

  (`--deterministic` goes on both commands: the saved run records its mode
  and the N-process launch refuses a reference of the other mode; on a CPU
  it changes nothing.)

  The criterion: the same split of the arithmetic cannot be expected to
  give the same loss curve, since training carries last-bit differences
  forward and they grow. So the one-device run is also repeated from its
  initial weights moved by one ulp (`--compare perturbed`, below), K times
  (`--nudges K`, default 3), each from its own draw of the up-or-down
  directions (nudge i from seed `--seed` + i), and the N-device curve must
  stay within twice their spread: its largest relative difference from the
  one-device losses over all steps at most twice the largest of the K
  nudged runs' (JSON: `nudge_max_rel_diffs`, the K values;
  `nudge_max_rel_diff`, their largest; `within_twice_nudge`). K draws,
  not one: the nudged run's difference is one draw of a chaotic divergence
  (on GPUs, in the default mode, the one-device run does not even repeat
  itself), so a single draw is not a spread, and a verdict against it
  passes or fails by chance (on two H200s two of four such verdicts
  failed, by factors 1.09 and 1.22 over the limit). The first
  draw's verdict is still printed (`first_nudge_max_rel_diff`,
  `within_twice_first_nudge`). `--save` keeps all K nudged curves, and
  `--reference` reads them (K = 1 from folders saved with one).

- `--compare repeat`: the same one-device run twice (`--implementation`
  as given): the floor below which the other comparisons cannot go where
  the kernels are not bitwise reproducible (the fused backward adds the
  position-key gradient with atomics; 0 with `--deterministic`).

- `--compare perturbed`: the one-device run, then K more (`--nudges K`),
  each from initial weights moved by one float32 unit in the last place
  (up or down at random per element, a relative change of about 6e-8, a
  draw of its own per run): how far this recipe's training carries
  last-bit differences, such as those of another batch split, in the
  given number of steps. The JSON line compares the first nudged run and
  lists all K (`nudge_max_rel_diffs`). With `--deterministic` any
  difference comes from the nudge alone.

Dropout is off (`--dropout 0`), so the two runs differ only by the
arithmetic (kernel, or the split of the batch and the gradient all-reduce).

`--deterministic` makes each run bitwise reproducible on a GPU (so that
`--compare repeat` gives 0 and the other comparisons show only their own
differences): the kernels' deterministic mode
(`keras_allattn.ops.attention.set_deterministic`), and the backend's own
switches, set before the backend starts: on JAX
`XLA_FLAGS=--xla_gpu_deterministic_ops=true`, on PyTorch
`CUBLAS_WORKSPACE_CONFIG=:4096:8` and
`torch.use_deterministic_algorithms(True, warn_only=True)`. The JSON line
and the recorded row say which mode ran.
`--record` appends a row to benchmarks/RESULTS.md (with K and the K nudged
runs' differences); `--plot PNG` draws the loss curves, the K nudged ones
among them.
"""

import argparse
import datetime
import json
import lzma
import os
import pathlib
import sys

# The JAX GPU client reads XLA_FLAGS, and cuBLAS its workspace setting, when
# they start: `--deterministic` sets them before `keras` imports its backend.
XLA_DETERMINISTIC = "--xla_gpu_deterministic_ops=true"


def deterministic_environment():
    """The backends' determinism switches that must precede their start."""
    flags = os.environ.get("XLA_FLAGS", "")
    if XLA_DETERMINISTIC not in flags.split():
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_DETERMINISTIC}".strip()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _wants_deterministic(argv):
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--deterministic", action="store_true")
    return early.parse_known_args(argv)[0].deterministic


if __name__ == "__main__" and _wants_deterministic(sys.argv[1:]):
    deterministic_environment()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import throughput  # noqa: E402
from _common import commit  # noqa: E402
from _common import device_name  # noqa: E402
from keras_allattn.data import StreamBatcher  # noqa: E402
from keras_allattn.distribution import DataParallelTrainer  # noqa: E402
from keras_allattn.distribution import plan_data_parallel  # noqa: E402
from keras_allattn.distribution import use_virtual_cpu_devices  # noqa: E402
from keras_allattn.ops.attention import set_deterministic  # noqa: E402
from keras_allattn.presets import get_preset  # noqa: E402
from keras_allattn.training import optimizer_from_recipe  # noqa: E402
from keras_allattn.training import scale_recipe  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "RESULTS.md"
DEFAULT_NUDGES = 3


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", required=True,
                        choices=["implementations", "devices", "repeat", "perturbed"])
    parser.add_argument("--data", default="../shared/data/enwik8-head/enwik8-head.txt.xz",
                        help="a byte-level corpus file (.xz allowed)")
    parser.add_argument("--preset", default="enwik8_small")
    parser.add_argument("--span", default="fixed:2048")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dtype", default="mixed_bfloat16")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--implementation", default="auto",
                        choices=["auto", "portable", "fused"],
                        help="--compare devices: the attention path of both runs")
    parser.add_argument("--remat", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--jit-compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--devices", type=int, default=2,
                        help="JAX --compare devices: the device count to compare")
    parser.add_argument("--cpu-devices", type=int,
                        help="split the CPU into this many devices (smoke check)")
    parser.add_argument("--save", help="--compare devices, one process: save the "
                        "weights and the losses of the one-device and nudged runs here")
    parser.add_argument("--reference", help="--compare devices, N processes (or one "
                        "JAX process's devices): the --save folder")
    parser.add_argument("--nudges", type=int, default=None,
                        help="--compare devices and perturbed: one-device runs from "
                        "weights moved by one ulp, each a draw of its own (default "
                        f"{DEFAULT_NUDGES}; with --reference, the folder's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deterministic", action="store_true",
                        help="bitwise reproducible runs (kernels and backend)")
    parser.add_argument("--plot", help="write both loss curves to this PNG")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if args.nudges is not None and args.nudges < 1:
        parser.error(f"`--nudges` must be at least 1. Received: --nudges={args.nudges}")
    if args.nudges is not None and args.compare not in ("devices", "perturbed"):
        parser.error(
            "`--nudges` is for --compare devices or perturbed. Received: "
            f"--nudges={args.nudges} with --compare {args.compare}"
        )
    return args


def read_tokens(path):
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8).astype(np.int32)


def build(args, implementation, batch_size, weights):
    """The model and optimizer; `weights` None keeps the seeded init."""
    keras.utils.set_random_seed(args.seed)
    run_args = argparse.Namespace(
        **{**vars(args), "batch_size": batch_size, "implementation": implementation}
    )
    recipe = scale_recipe(get_preset(args.preset)["recipe"], args.steps)
    model, config, _ = throughput.build(
        run_args, transformer=False, optimizer=optimizer_from_recipe(recipe)
    )
    if weights is not None:  # the trainable ones: the memory is per replica
        for variable, value in zip(model.trainable_weights, weights):
            variable.assign(value)
    return model, config


def train(model, plan, batcher, steps):
    """The loss of every step (the global mean over the replicas)."""
    if plan is not None and not plan.uses_fit or keras.backend.backend() == "torch":
        return DataParallelTrainer(model, plan).train(batcher, steps)
    # One step per epoch: the logged loss of an epoch is that step's.
    history = model.fit(batcher.as_dataset(), steps_per_epoch=1, epochs=steps,
                        verbose=0)
    return [float(v) for v in history.history["loss"]]


def run(args, tokens, implementation, devices=None, weights=None):
    """(losses, initial weights, settings) of one training run."""
    config = dict(get_preset(args.preset)["model"], batch_size=args.batch_size)
    plan = None
    if devices is not None or args.reference or keras.backend.backend() == "torch":
        plan = plan_data_parallel(config, devices=devices)
        plan.activate()
    batch = plan.model_batch_size if plan else args.batch_size
    model, config = build(args, implementation, batch, weights)
    if plan:
        plan.check_model(model)
    # (Several JAX processes: every weight spans them; the N-process runs
    # start from saved weights anyway.)
    initial = None if plan and plan.process_count > 1 else [
        keras.ops.convert_to_numpy(v) for v in model.trainable_weights
    ]
    batcher = StreamBatcher(tokens, args.batch_size, config["block_size"], seed=args.seed)
    if plan:
        batcher = plan.shard(batcher)
    losses = train(model, plan, batcher, args.steps)
    replicas = plan.num_replicas if plan else 1
    del model
    keras.backend.clear_session()
    return losses, initial, replicas, config


def nudge(weights, seed):
    """Each element moved by one float32 ulp, up or down at random (the
    directions drawn from seed `seed + 1`)."""
    rng = np.random.default_rng(seed + 1)
    moved = []
    for w in weights:
        w = np.asarray(w, np.float32)
        direction = np.where(rng.random(w.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
        moved.append(np.nextafter(w, direction))
    return moved


def nudges(weights, seed, count):
    """`count` nudged copies of `weights`, independent draws: copy i
    (0-based) is `nudge(weights, seed + i)`, its directions drawn from seed
    `seed + 1 + i` (the first is the single nudge of earlier runs)."""
    return [nudge(weights, seed + i) for i in range(count)]


def compare(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rel = np.abs(a - b) / np.abs(a)
    over = np.nonzero(rel >= 1e-3)[0]
    leading = int(over[0]) if over.size else len(rel)
    return float(rel.max()), float(rel.mean()), leading


def spread(reference, nudged):
    """How far the one-ulp nudged runs `nudged` (a list of K loss curves)
    part from `reference`: each one's largest and mean relative step
    difference, and the spread, the largest of the K."""
    if not nudged:
        raise ValueError("`nudged` must hold at least one loss curve. Received: nudged=[]")
    for curve in nudged:
        if len(curve) != len(reference):
            raise ValueError(
                "Each nudged curve must have as many steps as `reference`. "
                f"Received: {len(curve)} steps, reference of {len(reference)}"
            )
    differences = [compare(reference, curve) for curve in nudged]
    worst = [d[0] for d in differences]
    return {
        "nudges": len(nudged),
        "nudge_max_rel_diffs": worst,
        "nudge_mean_rel_diffs": [d[1] for d in differences],
        "nudge_max_rel_diff": max(worst),
        "first_nudge_max_rel_diff": worst[0],
    }


def verdict(reference, losses, nudged):
    """The equivalence criterion: the largest relative difference of
    `losses` from `reference` over all steps is at most twice the spread
    of the K one-ulp nudged runs `nudged` (a list of loss curves): the
    largest of their own largest differences. Also the verdict against
    the first nudged run alone (one draw)."""
    result = spread(reference, nudged)
    worst = compare(reference, losses)[0]
    limit = result["nudge_max_rel_diff"]
    result.update(
        criterion=(
            f"max rel. diff <= 2 x the largest of {len(nudged)} one-ulp nudged runs'"
        ),
        ratio_to_nudge_spread=worst / limit if limit > 0 else None,
        within_twice_nudge=worst <= 2 * limit,
        within_twice_first_nudge=worst <= 2 * result["first_nudge_max_rel_diff"],
    )
    return result


def report(args, names, runs, config, nudged=None, judge=True):
    """Prints the JSON line (and records, plots). `nudged`: the K loss
    curves of the first run repeated from weights moved by one ulp; with
    `judge`, the verdict of the second run against their spread (without,
    `--compare perturbed`: the second run is the first nudged one, and
    the line lists the K differences)."""
    (name_a, losses_a), (name_b, losses_b) = zip(names, runs)
    worst, mean, leading = compare(losses_a, losses_b)
    extra = {}
    if nudged is not None:
        extra = verdict(losses_a, losses_b, nudged) if judge else spread(losses_a, nudged)
    result = {
        "benchmark": "loss_match",
        "compare": f"{name_a} vs {name_b}",
        "backend": keras.backend.backend(),
        "device": device_name(),
        "steps": args.steps,
        "max_rel_diff": worst,
        "mean_rel_diff": mean,
        "leading_steps_within_1e-3": leading,
        "first_losses": [round(losses_a[0], 4), round(losses_b[0], 4)],
        "last_losses": [round(losses_a[-1], 4), round(losses_b[-1], 4)],
        "deterministic": args.deterministic,
        **extra,
        "settings": (
            f"preset {args.preset}, layers {config['num_layers']}, span "
            f"{args.span}, global batch {args.batch_size}, block "
            f"{config['block_size']}, {args.dtype}, dropout {args.dropout}, "
            f"deterministic {'on' if args.deterministic else 'off'}, "
            f"{os.path.basename(args.data)}"
        ),
    }
    print(json.dumps(result), flush=True)
    # The row first: a failed plot must not lose it.
    if args.record:
        record(args, result)
    if args.plot:
        plot(args.plot, result, names, runs, nudged, judge)


def record(args, result):
    """Appends `result`'s row to RESULTS.md."""
    criterion = ""
    if "nudges" in result:
        diffs = ", ".join(f"{d:.2e}" for d in result["nudge_max_rel_diffs"])
        criterion = (
            f"; {result['nudges']} one-ulp nudged runs, max rel. diffs {diffs}"
        )
    if "within_twice_nudge" in result:
        ratio = result["ratio_to_nudge_spread"]
        criterion += (
            f" (spread {result['nudge_max_rel_diff']:.2e}"
            + ("" if ratio is None else f", ratio {ratio:.2f}")
            + "): "
            + ("within" if result["within_twice_nudge"] else "NOT within")
            + " twice the spread; against the first nudged run alone: "
            + ("within" if result["within_twice_first_nudge"] else "NOT within")
        )
    with open(RESULTS, "a") as f:
        f.write(
            f"| {datetime.date.today()} | loss_match {result['compare']} | "
            f"{result['device']} | {result['backend']} | {commit()} | step "
            f"losses over {args.steps} steps: max rel. diff "
            f"{result['max_rel_diff']:.2e}, mean {result['mean_rel_diff']:.2e}, "
            f"first {result['leading_steps_within_1e-3']} steps within 1e-3; last "
            f"{result['last_losses'][0]} / "
            f"{result['last_losses'][1]}{criterion} | {result['settings']} |\n"
        )


def plot(path, result, names, runs, nudged, judge):
    """The loss curves (the K nudged ones among them) and their relative
    differences from the first run, to the PNG `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (name_a, losses_a), (name_b, losses_b) = zip(names, runs)
    fig, (ax, ax_rel) = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.arange(1, len(losses_a) + 1)
    # Without `judge` the second run is the first nudged one.
    drawn = [] if nudged is None else list(enumerate(nudged, 1))[0 if judge else 1 :]
    extra = [(f"{name_a}, weights +-1 ulp, draw {i}", c) for i, c in drawn]
    for name, losses in [(name_a, losses_a), (name_b, losses_b)] + extra:
        ax.plot(steps, losses, label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats)")
    ax.set_title(f"{result['backend']}, max rel. diff {result['max_rel_diff']:.1e}")
    ax.legend(fontsize="small")
    a = np.asarray(losses_a, np.float64)
    relative = [(f"{name_b} vs {name_a}", losses_b)] + [
        (f"+-1 ulp, draw {i} vs {name_a}", c) for i, c in drawn
    ]
    for name, losses in relative:
        b = np.asarray(losses, np.float64)
        # Steps with equal losses sit at the bottom of the log axis.
        ax_rel.semilogy(steps, np.maximum(np.abs(b - a) / np.abs(a), 1e-9), ".-",
                        markersize=2, linewidth=0.8, label=name)
    ax_rel.axhline(1e-3, color="gray", linestyle="--", label="1e-3")
    ax_rel.set_xlabel("step")
    ax_rel.set_ylabel("relative difference of the step losses")
    title = f"first {result['leading_steps_within_1e-3']} steps within 1e-3"
    if "within_twice_nudge" in result:
        title += (", within twice the spread" if result["within_twice_nudge"]
                  else ", NOT within twice the spread")
    ax_rel.set_title(title)
    ax_rel.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    args = parse_args()
    if args.deterministic:
        deterministic_environment()  # (done at start when run as a script)
        set_deterministic(True)
        if keras.backend.backend() == "torch":
            import torch

            torch.use_deterministic_algorithms(True, warn_only=True)
    if args.cpu_devices:
        use_virtual_cpu_devices(args.cpu_devices)
    tokens = read_tokens(args.data)
    backend = keras.backend.backend()
    count = DEFAULT_NUDGES if args.nudges is None else args.nudges

    def nudged_runs(initial, devices=None):
        """The one-device run repeated from `count` nudged copies."""
        return [
            run(args, tokens, args.implementation, devices, weights=moved)[0]
            for moved in nudges(initial, args.seed, count)
        ]

    if args.compare == "repeat":
        first, initial, _, config = run(args, tokens, args.implementation)
        second, _, _, _ = run(args, tokens, args.implementation, weights=initial)
        report(args, ["run 1", "run 2"], [first, second], config)
    elif args.compare == "perturbed":
        first, initial, _, config = run(args, tokens, args.implementation)
        nudged = nudged_runs(initial)
        report(args, ["run 1", "run 2 (weights +-1 ulp)"], [first, nudged[0]], config,
               nudged, judge=False)
    elif args.compare == "implementations":
        first, initial, _, config = run(args, tokens, "portable")
        second, _, _, _ = run(args, tokens, "fused", weights=initial)
        report(args, ["portable", "fused"], [first, second], config)
    elif args.save is not None:
        # One device: the reference and its K one-ulp nudged repeats.
        losses, initial, _, _ = run(args, tokens, args.implementation)
        nudged = nudged_runs(initial)
        save_reference(args.save, initial, losses, nudged, args.deterministic)
        print(json.dumps({"saved": args.save, "losses": losses[:3] + losses[-3:],
                          "deterministic": args.deterministic,
                          **spread(losses, nudged)}))
    elif args.reference is not None:
        initial, reference, nudged = load_reference(args)
        # JAX: every device of every process (KERAS_DISTRIBUTION_* set, the
        # plan initialises them); torch: the torchrun ranks.
        losses, _, n, config = run(args, tokens, args.implementation,
                                   weights=initial)
        if process_index() == 0:
            processes = process_count()
            where = f" ({processes} processes)" if processes > 1 else " of 1 process"
            report(args, ["1 device", f"{n} devices{where}"],
                   [reference, losses], config, nudged)
    elif backend == "jax":
        pool = keras.distribution.list_devices()
        if len(pool) < args.devices:
            raise SystemExit(f"--devices {args.devices}: only {len(pool)} devices")
        first, initial, _, config = run(args, tokens, args.implementation, pool[:1])
        nudged = nudged_runs(initial, pool[:1])
        second, _, n, _ = run(args, tokens, args.implementation,
                              pool[: args.devices], weights=initial)
        report(args, ["1 device", f"{n} devices"], [first, second], config, nudged)
    else:
        raise SystemExit(
            "--compare devices on PyTorch: pass --save (one process) or "
            "--reference (under torchrun); TensorFlow is not compared here"
        )


def process_index():
    """This process's index in a multi-process run (0 otherwise)."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.process_index()
    return int(os.environ.get("RANK", "0"))


def process_count():
    """The processes of a multi-process run (1 otherwise)."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.process_count()
    return int(os.environ.get("WORLD_SIZE", "1"))


def save_reference(folder, initial, losses, nudged, deterministic):
    """Writes the one-device runs for `--reference`: the initial weights,
    the losses, the K nudged runs' losses (a list of K curves) and the
    mode."""
    os.makedirs(folder, exist_ok=True)
    np.savez(os.path.join(folder, "weights.npz"), *initial)
    with open(os.path.join(folder, "losses.json"), "w") as f:
        json.dump(losses, f)
    with open(os.path.join(folder, "nudged_losses.json"), "w") as f:
        json.dump(nudged, f)
    with open(os.path.join(folder, "settings.json"), "w") as f:
        json.dump({"deterministic": deterministic, "nudges": len(nudged)}, f)


def load_reference(args):
    """`(initial weights, losses, nudged losses)` of a `--save` folder,
    checked for the same deterministic mode, steps and (where `--nudges`
    is given) nudged runs. The nudged losses are a list of K curves (K = 1
    from folders saved with a single nudged run; None from folders saved
    before it)."""
    with np.load(os.path.join(args.reference, "weights.npz")) as f:
        initial = [f[f"arr_{i}"] for i in range(len(f.files))]
    with open(os.path.join(args.reference, "losses.json")) as f:
        reference = json.load(f)
    nudged = None  # folders saved before the nudged run was added
    path = os.path.join(args.reference, "nudged_losses.json")
    if os.path.exists(path):
        with open(path) as f:
            nudged = json.load(f)
        if nudged and not isinstance(nudged[0], list):
            nudged = [nudged]  # saved with one nudged run, a single curve
    saved = os.path.join(args.reference, "settings.json")
    saved_mode = False  # folders saved before the flag existed
    if os.path.exists(saved):
        with open(saved) as f:
            saved_mode = json.load(f)["deterministic"]
    if saved_mode != args.deterministic:
        raise SystemExit(
            f"--reference {args.reference} was saved with deterministic="
            f"{saved_mode}; this run has deterministic={args.deterministic}: "
            "pass --deterministic to both runs or to neither"
        )
    if len(reference) != args.steps:
        raise SystemExit(
            f"--reference {args.reference} holds {len(reference)} steps; this "
            f"run has --steps {args.steps}: pass the same --steps to both"
        )
    held = 0 if nudged is None else len(nudged)
    if args.nudges is not None and args.nudges != held:
        raise SystemExit(
            f"--reference {args.reference} holds {held} nudged runs; this run "
            f"has --nudges {args.nudges}: pass the same --nudges to both, or "
            "leave it out here"
        )
    return initial, reference, nudged


if __name__ == "__main__":
    main()
