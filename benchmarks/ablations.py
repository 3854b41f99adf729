"""The paper's ablations, trained and reported by one script.

    python benchmarks/ablations.py run --variants allattn,transformer \\
        --seeds 0,1 --out runs/ablations
    python benchmarks/ablations.py report --runs runs/ablations --out benchmarks/

`run` trains each named variant once per seed on the same data, with the
same recipe and the same number of steps, scores the whole validation and
test splits at the end (every token once, memory carried, batch 8), and
appends one JSON line per run to `OUT/runs.jsonl` (a locked append, so
several processes, e.g. one per GPU, can share OUT). For the variants of
`--stats-variants` (default: the all-attention model) it also saves what
the layers learned, `keras_allattn.analysis.attention_statistics` on the
validation text, as `OUT/stats_<variant>_seed<seed>.json`.

`from-log` rebuilds those JSON lines from the output `run` printed, for
runs whose runs.jsonl was lost (given the same options as the runs, and
the backend, device, commit and date they ran with):

    python benchmarks/ablations.py from-log w_n64.log w_n256.log \\
        --out runs/ablations --backend jax --device "NVIDIA H200" \\
        --commit 1c7fa2b --date 2026-11-30

It takes from the log the summary line (parameters, steps, tokens/s,
seconds, the final valid and test figures) and the learning curve (the
epochs' `val_bits_per_token`, 4 decimals; their seconds are Keras's
whole epoch seconds, the curve scoring included, summed), computes what
follows from the options with `run`'s own functions (description,
settings, geometry, recipe, the splits' sizes from `--data`), checks the
log's description and parameter count against them, and leaves the
learned spans (null; `--max-span` for fixed-span) and the statistics
file out. Each record says `"rebuilt_from_log": true`, its log and the
curve's precision.

`report` reads those files from one or more folders and writes a markdown
section (the table, the questions with their verdicts, the plots' links)
and the PNG plots into `--out`: the learning curves of all variants, the
sweep over the number of persistent vectors, heat maps of the persistent
share and of the learned spans, and the mean attention weight by
distance. `report` needs matplotlib only, not Keras.

Variants (the paper's questions, SPEC §5; N is `--persistent`, 1024):
    allattn      the all-attention model: N persistent vectors per head,
                 one softmax with the context (joint), adaptive span
    n<K>         the same with K persistent vectors (n0, n64, n256, ...);
                 n0 is attention alone, nothing in place of the
                 feed-forward sublayer
    transformer  no persistent vectors, a feed-forward sublayer in every
                 layer whose width gives the parameter count of allattn
                 (adaptive span, as every variant but fixed-span)
    separate     allattn with integration="separate" (two softmaxes)
    both         allattn plus that feed-forward sublayer
    fixed-span   allattn without adaptive span (every head sees
                 --max-span tokens)

Geometry and why: 8 layers, d 512, 8 heads, block 512, batch 32, span up
to 1024 (adaptive), 2,000 steps of the text8 recipe (Adagrad 0.07 with
per-tensor clipping 0.03, dropout 0.3, span loss 1e-7) fitted to that
length by `keras_allattn.training.scale_recipe` (warm-up 6,000 steps:
Adagrad at the full rate before its accumulators have grown stalls). The
paper's width, heads and block are kept, so the attention layer, the
persistent memory (N = 1024) and the span mechanism are the paper's; the
depth and the span are cut so that one run (compilation, 2,000 steps of
16,384 tokens, both 5M-token splits scored) takes about three minutes on
one H200 under JAX with the fused kernels in bf16: the enwik8_small
geometry (18 layers, batch 64) trains at 196k tokens/s at span 1024 with
dropout, so 8 layers at batch 32 should reach roughly 400k tokens/s,
about 0.04 s a step. 2,000 steps (33M characters, a third of an epoch)
take the models well below the unigram plateau, far from convergence:
the comparisons are at equal steps early in training, not the paper's
converged figures. `--layers`, `--hidden-dim`, `--steps` and the other
geometry flags change it (the CPU test runs a toy size).

Same data: every variant and seed reads the training split in the same
order (the stream batcher's seed is fixed); the seed changes the initial
weights and the dropout masks. Spread: the sample standard deviation
over the seeds of a variant; a difference smaller than twice the larger
spread of the two variants compared is reported as "no difference".
"""

import argparse
import datetime
import fcntl
import gc
import json
import math
import os
import pathlib
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # for _common
    sys.path.insert(0, HERE)

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = {
    "wiki-text8": ROOT.parent / "shared" / "data" / "wiki-text8",
    "enwik8-head": ROOT.parent / "shared" / "data" / "enwik8-head"
    / "enwik8-head.txt.xz",
}
# Each corpus: the preset whose recipe (and dropout, span settings) the
# runs use, the unit of its figures, and the paper's numbers (SPEC §5).
CORPORA = {
    "wiki-text8": {
        "preset": "text8_small", "unit": "bpc",
        "paper": "text8 small (18 layers, 38M parameters, 480k steps): "
                 "1.05 / 1.11 bpc (dev / test)",
    },
    "enwik8-head": {
        "preset": "enwik8_small", "unit": "bpb",
        "paper": "enwik8 small (18 layers, 39M parameters, 480k steps): "
                 "1.03 / 1.01 bpb (dev / test)",
    },
}
FIXED_VARIANTS = ("allattn", "transformer", "separate", "both", "fixed-span")
# The paper's word on each variant where SPEC §5 gives no number.
PAPER_CLAIMS = {
    "transformer": "matches all-attention at equal parameters (claim; no "
                   "number in SPEC §5)",
    "separate": "joint beats separate (claim; no number in SPEC §5)",
    "n": "more persistent vectors help, about 1024 per layer suffice, "
         "worse without them (claim; no number in SPEC §5)",
}
# (question, variant A, variant B): A's figure minus B's.
QUESTIONS = (
    ("all-attention vs Transformer (equal parameters)", "allattn",
     "transformer"),
    ("joint vs separate integration", "allattn", "separate"),
    ("N = default vs N = 0 persistent vectors", "allattn", "n0"),
    ("adaptive vs fixed span", "allattn", "fixed-span"),
    ("feed-forward plus persistent (more parameters) vs all-attention",
     "both", "allattn"),
)
STATS_ROWS = 8


def parse_list(text, kind=str):
    """'a,b' -> ['a', 'b'] (with `kind` applied), refusing empty items."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"empty item in the list {text!r}")
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {kind.__name__}. "
            f"Received: {text!r}"
        ) from None


def add_run_options(parser):
    """The options of `run` that fix the data, geometry and recipe (shared
    by `from-log`, which must be given the same ones as the runs it
    rebuilds)."""
    parser.add_argument("--corpus", choices=sorted(CORPORA),
                        default="wiki-text8")
    parser.add_argument("--data", help="the corpus's folder or file (default: "
                        "../shared/data/<corpus> beside the project)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=250,
                        help="steps between two learning-curve points; must "
                        "divide --steps")
    parser.add_argument("--curve-tokens", type=int, default=262_144,
                        help="validation tokens scored at each curve point "
                        "(the first ones of the split)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden-dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--persistent", type=int, default=1024,
                        help="N, persistent vectors per head of allattn")
    parser.add_argument("--max-span", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="mixed_bfloat16",
                        help='the dtype policy (default "mixed_bfloat16"; '
                        '"float32" on a CPU)')
    parser.add_argument("--learning-rate", type=float,
                        help="override the recipe's peak learning rate")
    parser.add_argument("--warmup-steps", type=int,
                        help="override the warm-up fitted to --steps")
    parser.add_argument("--stats-variants", type=parse_list,
                        default=["allattn"],
                        help="variants whose attention statistics are saved "
                        "(default allattn)")
    parser.add_argument("--stats-rows", type=int, default=STATS_ROWS,
                        help="validation streams read for the statistics")
    parser.add_argument("--cap-eval-tokens-for-testing", type=int,
                        help="FOR THE CPU TEST ONLY: score only the first N "
                        "tokens of the validation and test splits at the end. "
                        "Default: the whole splits, as every reported figure "
                        "must be")


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train variants, append JSON lines")
    run.add_argument("--variants", type=parse_list, required=True,
                     help="comma-separated names: allattn, n<K> (e.g. n0, "
                     "n64, n256), transformer, separate, both, fixed-span")
    run.add_argument("--seeds", type=lambda t: parse_list(t, int),
                     default=[0], help="comma-separated seeds (default 0)")
    run.add_argument("--out", required=True,
                     help="folder for runs.jsonl and the statistics")
    add_run_options(run)

    from_log = commands.add_parser(
        "from-log", help="rebuild the JSON lines of runs from their logs")
    from_log.add_argument("logs", nargs="+", metavar="LOG",
                          help="the output `run` printed (one or more runs)")
    from_log.add_argument("--out", required=True,
                          help="folder whose runs.jsonl the records join")
    from_log.add_argument("--backend", required=True,
                          help="the backend the runs used (e.g. jax)")
    from_log.add_argument("--device", required=True,
                          help='the device they ran on (e.g. "NVIDIA H200")')
    from_log.add_argument("--commit", required=True,
                          help="the commit they ran at")
    from_log.add_argument("--date", required=True,
                          help="the date they ran (ISO 8601)")
    add_run_options(from_log)

    report = commands.add_parser("report", help="table and plots")
    report.add_argument("--runs", nargs="+", required=True,
                        help="folders written by `run`")
    report.add_argument("--out", required=True,
                        help="folder for ablations.md and the PNG plots")
    return parser


# === run ===


def matched_feedforward_dim(hidden_dim, persistent):
    """The feed-forward width whose parameters best match N persistent
    vectors per head: 2 N d (keys and values of all heads) against
    2 d f + f + d (two dense layers with biases) + 2 d (its LayerNorm)."""
    if persistent == 0:
        raise ValueError(
            "The Transformer baseline matches the parameters of the "
            "persistent vectors: `--persistent` must be positive. "
            "Received: persistent=0"
        )
    width = (2 * persistent * hidden_dim - 3 * hidden_dim) / (2 * hidden_dim + 1)
    return max(1, min((math.floor(width), math.ceil(width)),
                      key=lambda f: abs(f * (2 * hidden_dim + 1) + 3 * hidden_dim
                                        - 2 * persistent * hidden_dim)))


def variant_settings(name, args):
    """(description, AllAttentionLM arguments) of the variant `name`."""
    n = args.persistent
    base = dict(persistent_memory_size=n, adaptive_span=True,
                integration="joint", feedforward_dim=None)
    match = re.fullmatch(r"n(\d+)", name)
    if match:
        k = int(match.group(1))
        if k == n:
            raise ValueError(
                f"Variant {name!r} is allattn (--persistent={n}): name it "
                f"allattn. Received: variants including {name!r}"
            )
        return (f"all-attention, N = {k}",
                dict(base, persistent_memory_size=k))
    if name in ("transformer", "both"):
        f = matched_feedforward_dim(args.hidden_dim, n)
        if name == "transformer":
            return (f"Transformer: feed-forward {f}, no persistent vectors",
                    dict(base, persistent_memory_size=0, feedforward_dim=f))
        return f"feed-forward {f} and N = {n}", dict(base, feedforward_dim=f)
    settings = {
        "allattn": (f"all-attention, N = {n} (joint, adaptive span)", base),
        "separate": (f"all-attention, N = {n}, separate softmaxes",
                     dict(base, integration="separate")),
        "fixed-span": (f"all-attention, N = {n}, fixed span",
                       dict(base, adaptive_span=False)),
    }
    if name not in settings:
        raise ValueError(
            "Unknown variant. Known: " + ", ".join(FIXED_VARIANTS)
            + f" and n<K> (e.g. n0, n64). Received: variant={name!r}"
        )
    return settings[name]


def count_parameters(args, settings, vocabulary_size):
    """The parameters of a variant, counted from its shapes (the layers'
    weights; the memory is state, not a parameter)."""
    d, heads, layers = args.hidden_dim, args.heads, args.layers
    per_layer = 4 * d * d + 2 * d  # projections, LayerNorm
    per_layer += 2 * settings["persistent_memory_size"] * d
    per_layer += heads if settings["adaptive_span"] else 0
    f = settings["feedforward_dim"]
    per_layer += (2 * d * f + f + 3 * d) if f else 0
    return (vocabulary_size * d + (d // heads) * args.max_span
            + layers * per_layer + d * vocabulary_size + vocabulary_size)


def load_corpus(args):
    """The Corpus of `--corpus`, from `--data` or ../shared/data."""
    from keras_allattn.cli.train import load_corpus as load
    from keras_allattn.data import load_text8

    path = pathlib.Path(args.data) if args.data else DEFAULT_DATA[args.corpus]
    if not path.exists():
        raise SystemExit(
            f"The {args.corpus} data is not at {path}: pass --data (a "
            f"folder of train/valid/test.txt[.xz] for wiki-text8, the "
            f"enwik8-head file for enwik8-head)."
        )
    if args.corpus == "wiki-text8":
        return load_text8(str(path))
    return load("enwik8", str(path))  # one file, split 90/5/5 in order


def append_line(path, record):
    """Appends one JSON line under an exclusive lock (shared folders)."""
    line = json.dumps(record) + "\n"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make_clock():
    """A callback timing every training step (each one waited for)."""
    import keras

    class StepClock(keras.callbacks.Callback):
        """Seconds of every training step, the step waited for at its end.

        Waiting for each step (reading its loss) costs the overlap of the
        host's work with the device's, a few percent; in exchange every
        step's time is its own, so the median is the steady speed and
        the first step (compilation) and the recompilations of adaptive
        span stand apart.
        """

        def __init__(self):
            super().__init__()
            self.seconds = []
            self._begin = None

        def on_train_batch_begin(self, batch, logs=None):
            self._begin = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            keras.ops.convert_to_numpy((logs or {}).get("loss", 0.0))
            self.seconds.append(time.perf_counter() - self._begin)

    return StepClock()


def variant_plan(name, args, vocabulary_size):
    """What a run of the variant `name` is, fixed by the options alone:
    its description, its AllAttentionLM settings, the model's arguments
    and the recipe fitted to `--steps` (shared by `run` and `from-log`)."""
    from keras_allattn.presets import get_preset
    from keras_allattn.training import scale_recipe

    preset = get_preset(CORPORA[args.corpus]["preset"])
    description, settings = variant_settings(name, args)
    model_args = dict(
        preset["model"],
        vocabulary_size=vocabulary_size, num_layers=args.layers,
        hidden_dim=args.hidden_dim, num_heads=args.heads,
        max_span=args.max_span, block_size=args.block_size,
        batch_size=args.batch_size, dtype=args.dtype, **settings,
    )
    recipe = scale_recipe(preset["recipe"], args.steps)
    if args.learning_rate is not None:
        recipe["learning_rate"] = args.learning_rate
    if args.warmup_steps is not None:
        recipe["warmup_steps"] = args.warmup_steps
    return {"description": description, "settings": settings,
            "model_args": model_args, "recipe": recipe}


def record_head(name, seed, plan, args):
    """The first fields of a run's record: what was trained, and how."""
    spec = CORPORA[args.corpus]
    settings, model_args = plan["settings"], plan["model_args"]
    return {
        "variant": name,
        "description": plan["description"],
        "seed": seed,
        "corpus": args.corpus,
        "unit": spec["unit"],
        "preset_recipe": spec["preset"],
        "persistent_memory_size": settings["persistent_memory_size"],
        "feedforward_dim": settings["feedforward_dim"],
        "integration": settings["integration"],
        "adaptive_span": settings["adaptive_span"],
        "geometry": {key: model_args[key] for key in (
            "num_layers", "hidden_dim", "num_heads", "max_span",
            "block_size", "batch_size", "dropout", "span_loss_coeff",
            "dtype")},
        "recipe": plan["recipe"],
    }


def train_variant(name, seed, corpus, args, out):
    """Trains one variant with one seed; returns its JSON record."""
    import keras
    import numpy as np

    from keras_allattn import AllAttentionLM
    from keras_allattn.data import ResetMemoryOnRestart
    from keras_allattn.data import StreamBatcher
    from keras_allattn.data import evaluate_stream
    from keras_allattn.training import BitsPerCharacter
    from keras_allattn.training import StreamValidation
    from keras_allattn.training import optimizer_from_recipe
    from keras_allattn.utils import device_name
    from _common import commit

    plan = variant_plan(name, args, corpus.vocabulary_size)
    description, settings = plan["description"], plan["settings"]
    model_args, recipe = plan["model_args"], plan["recipe"]
    started = time.perf_counter()
    keras.utils.set_random_seed(seed)
    model = AllAttentionLM(**model_args)
    model.compile(
        optimizer=optimizer_from_recipe(recipe),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[BitsPerCharacter(name="bits")],
    )
    parameters = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    print(f"[{name} seed {seed}] {description}: {parameters:,} parameters",
          flush=True)

    # The same batches for every variant and seed: the batcher's seed is 0.
    batcher = StreamBatcher(corpus.train, args.batch_size, args.block_size,
                            seed=0)
    dataset = batcher.as_dataset()
    curve_tokens = corpus.valid[: args.curve_tokens]
    validation = StreamValidation(curve_tokens, "bits_per_token")
    clock = make_clock()
    model.fit(
        dataset, steps_per_epoch=args.eval_every,
        epochs=args.steps // args.eval_every, verbose=2,
        callbacks=[clock, ResetMemoryOnRestart(dataset), validation],
    )
    train_seconds = sum(clock.seconds)
    elapsed = np.cumsum(clock.seconds)
    curve = [
        {"step": step, "train_seconds": round(float(elapsed[step - 1]), 2),
         "valid_bits": round(result["bits_per_token"], 5)}
        for step, result in validation.results
    ]

    cap = args.cap_eval_tokens_for_testing
    scoring = time.perf_counter()
    valid = evaluate_stream(model, corpus.valid[:cap], batch_size=8, verbose=0)
    test = evaluate_stream(model, corpus.test[:cap], batch_size=8, verbose=0)
    scoring = time.perf_counter() - scoring
    steady = statistics.median(clock.seconds[1:] or clock.seconds)
    tokens_per_step = args.batch_size * args.block_size
    record = {
        **record_head(name, seed, plan, args),
        "parameters": parameters,
        "steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "tokens_per_step": tokens_per_step,
        "train_tokens_per_s": round(tokens_per_step / steady),
        "first_step_seconds": round(clock.seconds[0], 2),
        "train_seconds": round(train_seconds, 2),
        "curve": curve,
        "curve_tokens": len(curve_tokens),
        "final_scoring_seconds": round(scoring, 1),
        "valid_bits": round(valid["bits_per_token"], 5),
        "test_bits": round(test["bits_per_token"], 5),
        "valid_tokens_scored": valid["tokens"],
        "test_tokens_scored": test["tokens"],
        "eval_token_cap": cap,
        "spans": np.asarray(model.current_spans()).tolist(),
        "backend": keras.backend.backend(),
        "device": device_name(),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
    }
    if name in args.stats_variants:
        analysing = time.perf_counter()
        record["stats_file"] = save_statistics(model, corpus, name, seed, args,
                                               out)
        record["stats_seconds"] = round(time.perf_counter() - analysing, 1)
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    del model
    keras.backend.clear_session()
    gc.collect()
    return record


def save_statistics(model, corpus, name, seed, args, out):
    """`attention_statistics` on the start of the validation split, read
    as `--stats-rows` streams of `max_span` warm-up tokens and four blocks
    each, saved as JSON; returns the file's name."""
    length = args.max_span + 4 * args.block_size
    rows = min(args.stats_rows, len(corpus.valid) // length)
    if rows < 1:
        raise SystemExit(
            f"The validation split ({len(corpus.valid):,} tokens) is too "
            f"short for the statistics ({length:,} tokens per stream)."
        )
    tokens = corpus.valid[: rows * length].reshape(rows, length)
    stats = model.attention_statistics(tokens)
    path = out / f"stats_{name}_seed{seed}.json"
    with open(path, "w") as f:
        json.dump({
            "variant": name, "seed": seed, "corpus": args.corpus,
            **{key: value.tolist() if hasattr(value, "tolist") else value
               for key, value in stats.items()},
        }, f)
    return path.name


def run(args):
    names = list(dict.fromkeys(args.variants))
    if args.steps % args.eval_every:
        raise SystemExit(
            f"--steps must be a multiple of --eval-every. Received: "
            f"steps={args.steps}, eval_every={args.eval_every}"
        )
    for name in names + list(args.stats_variants):
        try:
            variant_settings(name, args)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(args)
    if args.persistent:
        # The Transformer baseline and allattn, counted from their shapes.
        counts = {
            name: count_parameters(args, variant_settings(name, args)[1],
                                   corpus.vocabulary_size)
            for name in ("allattn", "transformer")
        }
        print(
            f"parameters: allattn {counts['allattn']:,}, transformer "
            f"{counts['transformer']:,} (feed-forward "
            f"{matched_feedforward_dim(args.hidden_dim, args.persistent)})",
            flush=True,
        )
    for seed in args.seeds:
        for name in names:
            record = train_variant(name, seed, corpus, args, out)
            append_line(out / "runs.jsonl", record)
            print(json.dumps({k: record.get(k) for k in (
                "variant", "seed", "parameters", "steps", "train_tokens_per_s",
                "first_step_seconds", "train_seconds", "final_scoring_seconds",
                "stats_seconds", "valid_bits", "test_bits", "wall_seconds")}),
                flush=True)


# === from-log ===

RUN_HEADER = re.compile(
    r"\[(?P<variant>\S+) seed (?P<seed>-?\d+)\] (?P<description>.*): "
    r"(?P<parameters>[\d,]+) parameters"
)
EPOCH_HEADER = re.compile(r"Epoch (?P<epoch>\d+)/(?P<epochs>\d+)")
# Keras's line at the end of an epoch (fit's verbose=2).
EPOCH_LINE = re.compile(
    r"\s*(?P<done>\d+)/(?P<target>\d+) - (?P<seconds>\d+)s - .*"
    r"val_bits_per_token: (?P<bits>[-+0-9.eE]+)(?: - .*)?"
)
CURVE_PRECISION = (
    "rebuilt from the log: curve valid_bits to the 4 decimals Keras prints; "
    "curve train_seconds the cumulative epoch seconds Keras prints (whole "
    "seconds, each epoch's learning-curve scoring included), not the "
    "summed step times of a record written by `run`"
)


def parse_log(text, source="log"):
    """The runs in the output of `run`: for each, the header line's
    variant, seed, description and parameters, the epochs' (epoch,
    seconds, val_bits_per_token) and the summary JSON line."""
    runs, current, epoch = [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.rstrip()
        where = f"{source}:{number}"
        header = RUN_HEADER.fullmatch(line)
        if header:
            if current is not None:
                raise SystemExit(f"{where}: a run starts before the run of "
                                 f"line {current['line']} printed its summary")
            current = {**header.groupdict(), "line": number, "epochs": []}
            current["seed"] = int(current["seed"])
            current["parameters"] = int(current["parameters"].replace(",", ""))
            epoch = None
            continue
        if current is None:
            continue
        match = EPOCH_HEADER.fullmatch(line)
        if match:
            epoch = int(match.group("epoch"))
            continue
        match = EPOCH_LINE.fullmatch(line)
        if match:
            if match.group("done") != match.group("target"):
                continue  # not an epoch's final line
            if epoch is None or epoch != len(current["epochs"]) + 1:
                raise SystemExit(f"{where}: an epoch's line out of order "
                                 f"(epoch {epoch} after "
                                 f"{len(current['epochs'])} epochs)")
            current["epochs"].append((epoch, int(match.group("seconds")),
                                      float(match.group("bits"))))
            epoch = None
            continue
        if line.startswith("{"):
            try:
                summary = json.loads(line)
            except json.JSONDecodeError as error:
                raise SystemExit(f"{where}: {error}") from None
            if (summary.get("variant"), summary.get("seed")) != (
                    current["variant"], current["seed"]):
                raise SystemExit(
                    f"{where}: the summary of {summary.get('variant')!r} "
                    f"seed {summary.get('seed')} ends the run of "
                    f"{current['variant']!r} seed {current['seed']}")
            current["summary"] = summary
            runs.append(current)
            current = None
    if current is not None:
        raise SystemExit(f"{source}: the run of {current['variant']!r} seed "
                         f"{current['seed']} (line {current['line']}) has no "
                         f"summary line: it did not finish")
    if not runs:
        raise SystemExit(f"{source}: no run of `run` in it")
    return runs


def record_from_log(run, args, corpus, log_name, out):
    """The record `run` would have written for one parsed run: every
    field the log carries taken from it, the ones that follow from the
    options computed by the same functions as `run`, the rest null."""
    name, seed, summary = run["variant"], run["seed"], run["summary"]
    try:
        plan = variant_plan(name, args, corpus.vocabulary_size)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    settings = plan["settings"]
    label = f"{log_name}: {name} seed {seed}"
    if plan["description"] != run["description"]:
        raise SystemExit(
            f"{label} is described in the log as {run['description']!r}, "
            f"with these options as {plan['description']!r}: pass the "
            f"options the run was given (e.g. --persistent, --hidden-dim)")
    counted = count_parameters(args, settings, corpus.vocabulary_size)
    if not run["parameters"] == summary["parameters"] == counted:
        raise SystemExit(
            f"{label} has {run['parameters']:,} parameters in the log, "
            f"{counted:,} with these options and this corpus: pass the "
            f"options and --corpus/--data the run was given")
    if summary["steps"] != args.steps:
        raise SystemExit(f"{label} trained {summary['steps']} steps. "
                         f"Received: steps={args.steps}")
    epochs = args.steps // args.eval_every
    if len(run["epochs"]) != epochs:
        raise SystemExit(
            f"{label}: {len(run['epochs'])} epoch lines in the log, "
            f"{epochs} expected (steps={args.steps}, "
            f"eval_every={args.eval_every})")
    elapsed = 0
    curve = []
    for epoch, seconds, bits in run["epochs"]:
        elapsed += seconds
        curve.append({"step": epoch * args.eval_every,
                      "train_seconds": elapsed, "valid_bits": bits})
    cap = args.cap_eval_tokens_for_testing
    record = {
        **record_head(name, seed, plan, args),
        "parameters": summary["parameters"],
        "steps": summary["steps"],
        "tokens_per_step": args.batch_size * args.block_size,
        "train_tokens_per_s": summary["train_tokens_per_s"],
        "first_step_seconds": summary["first_step_seconds"],
        "train_seconds": summary["train_seconds"],
        "curve": curve,
        "curve_tokens": len(corpus.valid[: args.curve_tokens]),
        "final_scoring_seconds": summary["final_scoring_seconds"],
        "valid_bits": summary["valid_bits"],
        "test_bits": summary["test_bits"],
        # evaluate_stream predicts every token of a split but the first.
        "valid_tokens_scored": len(corpus.valid[:cap]) - 1,
        "test_tokens_scored": len(corpus.test[:cap]) - 1,
        "eval_token_cap": cap,
        # The learned spans are not in the log; without adaptive span
        # every head attends --max-span tokens.
        "spans": None if settings["adaptive_span"] else
        [[args.max_span] * args.heads for _ in range(args.layers)],
        "backend": args.backend,
        "device": args.device,
        "commit": args.commit,
        "date": args.date,
    }
    if summary.get("stats_seconds") is not None:
        stats_name = f"stats_{name}_seed{seed}.json"
        if (out / stats_name).is_file():
            record["stats_file"] = stats_name
        else:
            print(f"{label}: its statistics were saved as {stats_name}, "
                  f"not in {out}: the record names no statistics file",
                  flush=True)
        record["stats_seconds"] = summary["stats_seconds"]
    record["wall_seconds"] = summary["wall_seconds"]
    record["rebuilt_from_log"] = True
    record["log_file"] = log_name
    record["curve_precision"] = CURVE_PRECISION
    return record


def from_log(args):
    """Rebuilds the records of the runs in the logs (their runs.jsonl
    lost) and appends them to OUT/runs.jsonl, refusing a run already
    there (same corpus, variant, seed and commit)."""
    if args.steps % args.eval_every:
        raise SystemExit(
            f"--steps must be a multiple of --eval-every. Received: "
            f"steps={args.steps}, eval_every={args.eval_every}"
        )
    parsed = []
    for path in map(pathlib.Path, args.logs):
        if not path.is_file():
            raise SystemExit(f"no log at {path}")
        parsed += [(path.name, run)
                   for run in parse_log(path.read_text(), str(path))]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    existing = set()
    if (out / "runs.jsonl").is_file():
        for line in (out / "runs.jsonl").read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                existing.add((r["corpus"], r["variant"], r["seed"],
                              r["commit"]))
    corpus = load_corpus(args)
    records = [record_from_log(run, args, corpus, name, out)
               for name, run in parsed]
    for record in records:
        key = (record["corpus"], record["variant"], record["seed"],
               record["commit"])
        if key in existing:
            raise SystemExit(f"{out / 'runs.jsonl'} already holds {key}: "
                             f"nothing appended")
        existing.add(key)
    for record in records:
        append_line(out / "runs.jsonl", record)
        print(f"rebuilt {record['corpus']} {record['variant']} seed "
              f"{record['seed']} from {record['log_file']}", flush=True)


# === report ===


def load_runs(folders):
    """The records of runs.jsonl in every folder, and the statistics."""
    runs, stats = [], {}
    for folder in map(pathlib.Path, folders):
        path = folder / "runs.jsonl"
        if not path.is_file():
            raise SystemExit(f"no runs.jsonl in {folder}: run `run` first")
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise SystemExit(f"{path}:{number}: {error}") from None
                runs.append(record)
                if record.get("stats_file"):
                    stats_path = folder / record["stats_file"]
                    with open(stats_path) as f:
                        stats[(record["corpus"], record["variant"],
                               record["seed"])] = json.load(f)
    if not runs:
        raise SystemExit(f"no runs in {', '.join(map(str, folders))}")
    return runs, stats


def summarise(values):
    """(mean, sample standard deviation or None for one value, count)."""
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else None
    return mean, spread, len(values)


def figure(mean, spread, digits=3):
    if spread is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def verdict(name_a, a, name_b, b, key, others=()):
    """The difference of `key` between two variants' runs (A minus B),
    the spread it is judged against (the larger of the two variants' and
    of the variants in `others`, lists of runs), and the verdict."""
    mean_a, spread_a, _ = summarise([r[key] for r in a])
    mean_b, spread_b, _ = summarise([r[key] for r in b])
    spreads = [s for s in (spread_a, spread_b) if s is not None]
    spreads += [s for s in (summarise([r[key] for r in group])[1]
                            for group in others) if s is not None]
    difference = mean_a - mean_b
    if not spreads:
        return difference, None, "undecided: one seed on each side, no spread"
    spread = max(spreads)
    if abs(difference) < 2 * spread:
        return difference, spread, "no difference"
    better = name_a if difference < 0 else name_b
    return difference, spread, f"{better} better (beyond twice the spread)"


def variant_order(name):
    """allattn first, the N sweep by N, then the others."""
    match = re.fullmatch(r"n(\d+)", name)
    if name == "allattn":
        return (0, 0, name)
    if match:
        return (1, int(match.group(1)), name)
    known = FIXED_VARIANTS.index(name) if name in FIXED_VARIANTS else 99
    return (2, known, name)


def paper_column(name, corpus):
    if name == "allattn":
        return CORPORA[corpus]["paper"]
    if re.fullmatch(r"n\d+", name):
        return PAPER_CLAIMS["n"]
    return PAPER_CLAIMS.get(name, "")


def report(args):
    import matplotlib

    matplotlib.use("Agg")
    runs, stats = load_runs(args.runs)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for corpus in dict.fromkeys(r["corpus"] for r in runs):  # as given
        chosen = [r for r in runs if r["corpus"] == corpus]
        sections.append(corpus_section(corpus, chosen, stats, out))
    text = "\n\n".join(sections) + "\n"
    (out / "ablations.md").write_text(text)
    print(text)


def corpus_section(corpus, runs, stats, out):
    """The markdown section of one corpus, its plots written to `out`."""
    unit = runs[0]["unit"]
    by_variant = {}
    for record in runs:
        by_variant.setdefault(record["variant"], []).append(record)
    names = sorted(by_variant, key=variant_order)
    slug = re.sub(r"[^a-z0-9]+", "_", corpus.lower()).strip("_")
    geometry = runs[0]["geometry"]
    steps = sorted({r["steps"] for r in runs})
    lines = [
        f"## Ablations on {corpus}",
        "",
        f"{geometry['num_layers']} layers, d {geometry['hidden_dim']}, "
        f"{geometry['num_heads']} heads, span up to {geometry['max_span']}, "
        f"block {geometry['block_size']}, batch {geometry['batch_size']}, "
        f"{'/'.join(map(str, steps))} steps of the {runs[0]['preset_recipe']} "
        f"recipe (dropout {geometry['dropout']}, {geometry['dtype']}); "
        f"backend {', '.join(sorted({r['backend'] for r in runs}))} on "
        f"{', '.join(sorted({r['device'] for r in runs}))}; commit "
        f"{', '.join(sorted({r['commit'] for r in runs}))}. Figures: "
        f"mean ± sample standard deviation over the seeds (one seed shows "
        f"no spread), the whole validation and test splits scored once at "
        f"the end; tokens/s: training tokens over the median step time, "
        f"every step waited for.",
    ]
    caps = sorted({r["eval_token_cap"] for r in runs if r["eval_token_cap"]})
    if caps:
        lines += ["", f"**Test runs: only the first "
                  f"{' / '.join(map(str, caps))} tokens of the "
                  "validation and test splits were scored; these figures "
                  "are not full-split results.**"]
    rebuilt = [r for r in runs if r.get("rebuilt_from_log")]
    if rebuilt:
        lines += ["", "Rebuilt from their logs (`ablations.py from-log`; "
                  "the records did not come back): "
                  + ", ".join(f"{r['variant']} seed {r['seed']} "
                              f"(`{r.get('log_file')}`)" for r in rebuilt)
                  + ". Their final figures are the logs' summary lines; "
                  "their learning curves have the 4 decimals of Keras's "
                  "epoch lines and whole epoch seconds (the curve scoring "
                  "included); the spans they learned (adaptive span) are "
                  "not known."]
    if len({(json.dumps(r["geometry"], sort_keys=True), r["steps"])
            for r in runs}) > 1:
        lines += ["", "**The runs differ in geometry or steps: compare "
                  "with care.**"]
    lines += [
        "",
        f"| variant | model | N | feed-forward | parameters | steps | "
        f"tokens/s | valid {unit} | test {unit} | seeds | paper (SPEC §5) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        group = by_variant[name]
        first = group[0]
        valid = summarise([r["valid_bits"] for r in group])
        test = summarise([r["test_bits"] for r in group])
        speed = statistics.fmean(r["train_tokens_per_s"] for r in group)
        lines.append(
            f"| {name} | {first['description']} | "
            f"{first['persistent_memory_size']} | "
            f"{first['feedforward_dim'] or '—'} | {first['parameters']:,} | "
            f"{'/'.join(str(s) for s in sorted({r['steps'] for r in group}))}"
            f" | {speed:,.0f} | {figure(*valid[:2])} | {figure(*test[:2])} | "
            f"{', '.join(str(r['seed']) for r in group)} | "
            f"{paper_column(name, corpus)} |"
        )
    question_rows = []
    sweep = [name for name in by_variant
             if name == "allattn" or re.fullmatch(r"n\d+", name)]
    for question, a, b in QUESTIONS + sweep_questions(by_variant):
        if a in by_variant and b in by_variant:
            # Within the N sweep, where some N have one seed, a difference
            # is judged against the largest spread of any N.
            others = ([by_variant[name] for name in sweep]
                      if a in sweep and b in sweep else [])
            cells = []
            for key in ("valid_bits", "test_bits"):
                difference, spread, word = verdict(
                    a, by_variant[a], b, by_variant[b], key, others
                )
                spread_text = "—" if spread is None else f"{spread:.3f}"
                cells.append(f"{difference:+.3f} | {spread_text} | {word}")
            question_rows.append(f"| {question} | {a} | {b} | "
                                 + " | ".join(cells) + " |")
    if question_rows:
        lines += [
            "",
            f"Questions: A minus B in {unit} (negative: A is better); a "
            "difference smaller than twice the larger spread of the two (in "
            "the N sweep: the largest spread of any N) is no difference.",
            "",
            f"| question | A | B | valid A − B | spread | verdict (valid) | "
            f"test A − B | spread | verdict (test) |",
            "|---|---|---|---|---|---|---|---|---|",
            *question_rows,
        ]
    plots = [(f"ablations_{slug}_curves.png", "learning curves",
              plot_curves(by_variant, names, unit, out
                          / f"ablations_{slug}_curves.png"))]
    sweep = plot_sweep(by_variant, unit, out / f"ablations_{slug}_n_sweep.png")
    if sweep:
        plots.append((f"ablations_{slug}_n_sweep.png",
                      "validation and test against N", True))
    stat = pick_statistics(stats, corpus)
    if stat is not None:
        what = f"{stat['variant']}, seed {stat['seed']}"
        plot_heatmap(stat["persistent_share"], "share of attention on the "
                     f"persistent vectors\n({what})", "persistent share",
                     out / f"ablations_{slug}_persistent_share.png", vmax=1.0)
        plot_heatmap(stat["spans"], f"learned span in tokens\n({what})",
                     "span (tokens)", out / f"ablations_{slug}_spans.png",
                     vmax=stat["max_span"])
        plot_distance(stat, out / f"ablations_{slug}_mass_by_distance.png")
        plots += [
            (f"ablations_{slug}_persistent_share.png",
             "persistent share per layer and head", True),
            (f"ablations_{slug}_spans.png", "learned spans per layer and head",
             True),
            (f"ablations_{slug}_mass_by_distance.png",
             "mean attention weight by distance", True),
        ]
        share = summary_of_shares(stat)
        lines += ["", share]
    lines.append("")
    lines += [f"![{alt}]({path})" for path, alt, written in plots if written]
    return "\n".join(lines)


def sweep_questions(by_variant):
    """The N sweep's comparisons among the variants present: the default
    N against every other N, and every N > 0 against N = 0."""
    sweep = sorted(
        (int(name[1:]), name) for name in by_variant
        if re.fullmatch(r"n\d+", name)
    )
    questions = []
    if "allattn" in by_variant:
        n = by_variant["allattn"][0]["persistent_memory_size"]
        questions += [(f"N = {n} vs N = {k}", "allattn", name)
                      for k, name in sweep if k != 0]
    if "n0" in by_variant:
        questions += [(f"N = {k} vs N = 0", name, "n0")
                      for k, name in sweep if k != 0]
    return tuple(questions)


def pick_statistics(stats, corpus):
    """The statistics of allattn (else any variant) with the lowest seed."""
    keys = sorted((k for k in stats if k[0] == corpus),
                  key=lambda k: (k[1] != "allattn", k[2], k[1]))
    return stats[keys[0]] if keys else None


def summary_of_shares(stat):
    import numpy as np

    share = np.asarray(stat["persistent_share"])
    spans = np.asarray(stat["spans"])
    per_layer = ", ".join(f"{v:.2f}" for v in share.mean(axis=1))
    return (
        f"What the layers learned ({stat['variant']}, seed {stat['seed']}, "
        f"{stat['queries']:,} validation queries after {stat['warmup_tokens']:,} "
        f"warm-up tokens per stream, integration {stat['integration']}): "
        f"mean persistent share per layer {per_layer} (overall "
        f"{share.mean():.2f}); learned spans from {spans.min()} to "
        f"{spans.max()} tokens (median {int(np.median(spans))})."
    )


def plot_curves(by_variant, names, unit, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, name in enumerate(names):
        colour = colours[index % len(colours)]
        for number, record in enumerate(by_variant[name]):
            curve = record["curve"]
            ax.plot([p["step"] for p in curve], [p["valid_bits"] for p in curve],
                    color=colour, marker=".", alpha=0.9 if number == 0 else 0.5,
                    label=name if number == 0 else None)
    ax.set_xlabel("optimizer step")
    tokens = sorted({r.get("curve_tokens") for group in by_variant.values()
                     for r in group} - {None})
    ax.set_ylabel(f"validation {unit} (first "
                  f"{' / '.join(f'{t:,}' for t in tokens) or '?'} tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("learning curves, one line per seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_sweep(by_variant, unit, path):
    """Final figures against N for allattn and the n<K> variants (joint,
    adaptive span, no feed-forward); False when fewer than two N."""
    import matplotlib.pyplot as plt

    points = []
    for name, group in by_variant.items():
        if name == "allattn" or re.fullmatch(r"n\d+", name):
            points.append((group[0]["persistent_memory_size"], group))
    if len(points) < 2:
        return False
    points.sort(key=lambda p: p[0])
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("valid_bits", "validation"), ("test_bits", "test")):
        means, errors = [], []
        for _, group in points:
            mean, spread, _ = summarise([r[key] for r in group])
            means.append(mean)
            errors.append(spread or 0.0)
        ax.errorbar([p[0] for p in points], means, yerr=errors, marker="o",
                    capsize=3, label=label)
    ax.set_xscale("symlog", linthresh=64)
    ax.set_xticks([p[0] for p in points])
    ax.set_xticklabels([str(p[0]) for p in points])
    ax.set_xlabel("persistent vectors per head, N")
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("number of persistent vectors (bars: seed spread)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_heatmap(values, title, label, path, vmax):
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.asarray(values, dtype=float)
    layers, heads = values.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * heads + 2.5),
                                    max(3.0, 0.4 * layers + 1.5)))
    image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0,
                      vmax=vmax, interpolation="nearest")
    for (layer, head), value in np.ndenumerate(values):
        text = f"{value:.2f}" if vmax == 1.0 else f"{value:g}"
        ax.text(head, layer, text, ha="center", va="center", fontsize=7,
                color="white" if value < 0.6 * vmax else "black")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_distance(stat, path):
    import matplotlib.pyplot as plt
    import numpy as np

    # (layers, L): heads averaged. Distances beyond every head's span
    # have weight 0, left out of the log scale.
    mass = np.asarray(stat["mass_by_distance"]).mean(axis=1)
    distance = np.arange(1, mass.shape[-1] + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layer, values in enumerate(mass):
        shown = values > 0
        ax.plot(distance[shown], values[shown], label=f"layer {layer}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("distance (tokens back; 1: the previous token)")
    ax.set_ylabel("mean attention weight (heads averaged)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"attention by distance ({stat['variant']}, seed "
                 f"{stat['seed']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "run":
        run(args)
    elif args.command == "from-log":
        from_log(args)
    else:
        report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
