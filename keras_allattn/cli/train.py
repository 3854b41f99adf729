"""`keras-allattn train`: the paper's recipes on text8, enwik8, PTB, WikiText-103.

    keras-allattn train --steps 200                      # offline default corpus
    keras-allattn train --corpus text8 --data text8.zip --preset text8_small
    keras-allattn train --corpus ptb --data ptb --output runs/ptb
    keras-allattn train --corpus wikitext103 --data wikitext-103 --output runs/wt

`--corpus` picks the loader and the default preset; with no `--data`,
text8 and enwik8 train on CPython's bundled English documentation
(`pydoc_data`, normalised to text8's alphabet for text8, raw bytes for
enwik8) split 90/5/5, so a run needs no download. `examples/train_*.py`
are this command with the corpus fixed.

Read `train()` top to bottom: it is the whole recipe (model from a preset,
optimizer and schedule from the preset's recipe, stream batching with
memory resets, checkpoints and exact resume, span logging, exact
validation and test). Its progress lines go to the `keras_allattn.cli.train`
logger; the command prints one JSON line of results at the end.
"""

import argparse
import importlib.util
import json
import logging
import lzma
import math
import os
import re
import sys
import time
import zipfile

import keras
import numpy as np

from keras_allattn import AllAttentionLM
from keras_allattn.cli import command_parser
from keras_allattn.data import Corpus
from keras_allattn.data import ResetMemoryOnRestart
from keras_allattn.data import StreamBatcher
from keras_allattn.data import evaluate_stream
from keras_allattn.data import load_enwik8
from keras_allattn.data import load_ptb
from keras_allattn.data import load_text8
from keras_allattn.data import load_wikitext103
from keras_allattn.data.corpora import CHARACTER_CORPUS_SIZE
from keras_allattn.data.corpora import TEXT8_ALPHABET
from keras_allattn.distribution import DataParallelTrainer
from keras_allattn.distribution import plan_data_parallel
from keras_allattn.distribution import use_virtual_cpu_devices
from keras_allattn.presets import get_preset
from keras_allattn.presets import preset_names
from keras_allattn.training import BitsPerByte
from keras_allattn.training import BitsPerCharacter
from keras_allattn.training import Perplexity
from keras_allattn.training import SpanLogger
from keras_allattn.training import StreamValidation
from keras_allattn.training import TrainingCheckpoint
from keras_allattn.training import latest_checkpoint
from keras_allattn.training import optimizer_from_recipe
from keras_allattn.training import restore_training
from keras_allattn.training import save_training
from keras_allattn.training.checkpoint import save_on_first_process
from keras_allattn.training import scale_recipe
from keras_allattn.utils import device_name

__all__ = [
    "CORPORA",
    "build_parser",
    "character_corpus",
    "load_corpus",
    "main",
    "offline_text",
    "train",
]

logger = logging.getLogger(__name__)

# Per corpus: the default preset, the --data help, and whether --data is
# needed (word-level corpora have no offline default).
CORPORA = {
    "enwik8": {
        "preset": "char_small_cpu",
        "data_help": "enwik8 file, enwik8.zip, a folder of splits, or any "
        "file, read as bytes (default: the offline pydoc text)",
        "needs_data": False,
    },
    "text8": {
        "preset": "char_small_cpu",
        "data_help": "text8 file, text8.zip, a folder of splits, or a text "
        "file (default: the offline pydoc text)",
        "needs_data": False,
    },
    "ptb": {
        "preset": "ptb_small_cpu",
        "data_help": "folder of the PTB splits (required), e.g. "
        "../shared/data/ptb",
        "needs_data": True,
    },
    "wikitext103": {
        "preset": "wikitext103",
        "data_help": "folder (or zip archive) of the three splits (required)",
        "needs_data": True,
    },
}
DEFAULT_CORPUS = "enwik8"

# What is reported at each level: the metric name and the training metric.
METRICS = {
    "character": ("bits_per_character", BitsPerCharacter),
    "byte": ("bits_per_byte", BitsPerByte),
    "word": ("perplexity", Perplexity),
}
DIGIT_NAMES = "zero one two three four five six seven eight nine".split()


def build_parser(corpus=None, prog=None, doc=None):
    """The command line of `keras-allattn train` and `examples/train_*.py`.

    Args:
        corpus: None adds `--corpus` (default enwik8); a name of `CORPORA`
            fixes the corpus (the examples).
        prog: the program name shown in the usage line.
        doc: the description (first line) and epilog (the rest); default
            this module's docstring.
    """
    parser = command_parser(prog, doc or __doc__)
    if corpus is None:
        parser.add_argument(
            "--corpus", choices=sorted(CORPORA), default=DEFAULT_CORPUS,
            help=f"the corpus's loader and default preset (default "
            f"{DEFAULT_CORPUS}, byte level)",
        )
        data_help = "; ".join(
            f"{name}: {spec['data_help']}" for name, spec in CORPORA.items()
        )
        preset_help = ", ".join(
            f"{spec['preset']} for {name}" for name, spec in CORPORA.items()
        )
    else:
        parser.set_defaults(corpus=check_corpus(corpus))
        data_help = CORPORA[corpus]["data_help"]
        preset_help = CORPORA[corpus]["preset"]
    parser.add_argument("--data", help=data_help)
    parser.add_argument(
        "--preset", choices=preset_names(),
        help=f"model and recipe (default {preset_help}); the vocabulary "
        "size always comes from the corpus",
    )
    parser.add_argument(
        "--steps", type=int,
        help="training steps (default: the recipe's, full rate plus lr/10); "
        "the schedule is fitted to the run",
    )
    parser.add_argument(
        "--warmup-steps", type=int,
        help="override the warm-up of the recipe fitted to --steps (see "
        "keras_allattn.training.scale_recipe)",
    )
    parser.add_argument("--learning-rate", type=float,
                        help="override the recipe's peak learning rate")
    parser.add_argument(
        "--optimizer", choices=["adagrad_clip", "adam"],
        help="override the recipe's optimizer (clip: per tensor for "
        "adagrad_clip, global norm for adam)",
    )
    parser.add_argument("--batch-size", type=int, help="override the preset")
    parser.add_argument("--block-size", type=int, help="override the preset")
    parser.add_argument("--max-span", type=int, help="override the preset")
    parser.add_argument(
        "--cutoffs", type=parse_cutoffs,
        help="adaptive softmax cutoffs, e.g. 2000,6000, or 'none' for a "
        "full softmax (default: the preset's)",
    )
    parser.add_argument("--div-val", type=int,
                        help="override the preset's adaptive div_val")
    parser.add_argument(
        "--mixed-precision", action="store_true",
        help='train with dtype "mixed_bfloat16"',
    )
    parser.add_argument(
        "--output",
        help="folder for checkpoints, TensorBoard logs, the span heat map "
        "and the final model (model.keras); a run resumes from the "
        "checkpoint found there",
    )
    parser.add_argument(
        "--eval-every", type=int, default=0,
        help="steps between two exact validations (an epoch of the progress "
        "bar; default: half the run, at most 1000)",
    )
    parser.add_argument(
        "--time-budget", type=float,
        help="stop training after this many seconds of training steps "
        "(compilation and validation not counted); --steps stays the "
        "schedule's length",
    )
    parser.add_argument(
        "--valid-tokens", type=int,
        help="score only the first N validation tokens at each --eval-every "
        "(the learning curve); the final validation and test always score "
        "the whole splits",
    )
    parser.add_argument(
        "--transformer", action="store_true",
        help="train the Transformer baseline of the same size instead: no "
        "persistent vectors, a feed-forward sublayer of width "
        "persistent_memory_size in every layer (same parameter count)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--distribute", action="store_true",
        help="train data parallel on every device (--batch-size is the "
        "global batch; each replica keeps the segment memory of its rows): "
        "JAX keras.distribution, TensorFlow MirroredStrategy (several hosts: "
        "TF_CONFIG), PyTorch DDP under torchrun; see README",
    )
    parser.add_argument(
        "--cpu-devices", type=int,
        help="with --distribute on JAX or TensorFlow: split the CPU into "
        "this many devices (a CPU smoke run)",
    )
    return parser


def check_corpus(corpus):
    """Returns `corpus` if it names one of `CORPORA`, else raises."""
    if corpus not in CORPORA:
        raise ValueError(
            f"`corpus` must be one of {tuple(sorted(CORPORA))}. "
            f"Received: corpus={corpus!r}"
        )
    return corpus


def parse_cutoffs(text):
    """'20000,40000' -> [20000, 40000]; 'none' -> [] (a full softmax)."""
    if text.strip().lower() == "none":
        return []
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            "cutoffs must be comma-separated integers or 'none'. "
            f"Received: {text!r}"
        ) from None


def load_corpus(corpus, path=None):
    """The `Corpus` that `--corpus` and `--data` name.

    text8 and enwik8 go through `character_corpus` (offline text when
    `path` is None); PTB and WikiText-103 need `path`, a folder or archive
    of their splits, read by their library loaders.
    """
    check_corpus(corpus)
    if path is None and CORPORA[corpus]["needs_data"]:
        raise ValueError(
            f"The {corpus} corpus has no offline default: pass --data, a "
            f"folder of its splits. Received: corpus={corpus!r}, data=None"
        )
    if corpus == "text8":
        return character_corpus("text8", path, load_text8)
    if corpus == "enwik8":
        return character_corpus("enwik8", path, load_enwik8)
    if corpus == "ptb":
        return load_ptb(path)
    return load_wikitext103(path)


def offline_text():
    """CPython's bundled English documentation (`pydoc_data.topics`)."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


def text8_normalise(text):
    """Text8's alphabet: lowercase a-z, digits spelled out, single spaces."""
    text = text.lower()
    text = re.sub(r"\d", lambda m: f" {DIGIT_NAMES[int(m.group())]} ", text)
    return " ".join(re.sub(r"[^a-z]+", " ", text).split())


def split_corpus(name, level, ids, vocabulary):
    """A Corpus of `ids` split 90% / 5% / 5% in order."""
    ids = np.asarray(ids, np.int32)
    a, b = int(len(ids) * 0.90), int(len(ids) * 0.95)
    return Corpus(name, level, ids[:a], ids[a:b], ids[b:], vocabulary)


def character_corpus(kind, path, loader):
    """text8 or enwik8: the canonical data, or any text split 90/5/5.

    `path` None uses `offline_text()`; a folder, a zip archive or a file of
    exactly 10^8 bytes goes to `loader` (the library's loader); any other
    file (`.xz` allowed) is read as UTF-8 text (text8: normalised to its
    alphabet) or raw bytes (enwik8).
    """
    if path is not None and (
        os.path.isdir(path)
        or zipfile.is_zipfile(path)
        or os.path.getsize(path) == CHARACTER_CORPUS_SIZE
    ):
        return loader(path)
    if path is None:
        data, name = offline_text().encode("utf-8"), f"{kind} (pydoc topics)"
    else:
        opener = lzma.open if path.endswith(".xz") else open
        with opener(path, "rb") as f:
            data = f.read()
        name = f"{kind} ({os.path.basename(path)})"
    if kind == "text8":
        text = text8_normalise(data.decode("utf-8", errors="replace"))
        table = np.zeros(128, np.int32)
        table[[ord(c) for c in TEXT8_ALPHABET]] = range(len(TEXT8_ALPHABET))
        ids = table[np.frombuffer(text.encode("ascii"), np.uint8)]
        return split_corpus(name, "character", ids, list(TEXT8_ALPHABET))
    ids = np.frombuffer(data, np.uint8)
    return split_corpus(name, "byte", ids, [bytes([i]) for i in range(256)])


class StopAtStep(keras.callbacks.Callback):
    """Stops `fit` after global step `last_step` (mid-epoch if need be)."""

    def __init__(self, start_step, last_step):
        super().__init__()
        self.start_step, self.last_step = start_step, last_step

    def on_train_begin(self, logs=None):
        self.step = self.start_step

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step >= self.last_step and batch + 1 < self.params["steps"]:
            self.model.stop_training = True


class TrainingClock(keras.callbacks.Callback):
    """Training time, the learning curve, and an optional time budget.

    Only the time inside training steps counts (from a step's start to its
    end, the first step, which compiles, excluded), so that two models
    compared "for equal time" get the same time to learn whatever their
    compilation and validation cost. At every epoch end (after
    `StreamValidation`, which must come first in the callback list) it
    appends `{"step", "train_seconds", <validation metric>}` to `curve`.

    Args:
        budget: None, or seconds of training after which `fit` stops.
        metric: the validation log to record (e.g. "val_bits_per_character").
    """

    def __init__(self, budget=None, metric=None):
        super().__init__()
        self.budget, self.metric = budget, metric
        self.elapsed, self.steps, self.curve = 0.0, 0, []
        self._begin = None

    def on_train_batch_begin(self, batch, logs=None):
        self._begin = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps > 1:
            self.elapsed += time.perf_counter() - self._begin
        if self.budget is not None and self.elapsed >= self.budget:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if logs and self.metric in logs:
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            self.curve.append({
                "step": step,
                "train_seconds": round(self.elapsed, 1),
                self.metric: float(logs[self.metric]),
            })


class Throughput(keras.callbacks.Callback):
    """Training tokens per second, from one step's start to the next's.

    The first step of the run (compilation) and the last step of every
    epoch (followed by validation and checkpointing) are not timed.
    """

    def __init__(self, tokens_per_step):
        super().__init__()
        self.tokens_per_step = tokens_per_step
        self.seconds, self.steps, self._started = 0.0, 0, 0
        self._last = None

    def on_epoch_begin(self, epoch, logs=None):
        self._last = None

    def on_train_batch_begin(self, batch, logs=None):
        now = time.perf_counter()
        if self._last is not None and self._started >= 2:
            self.seconds += now - self._last
            self.steps += 1
        self._last = now
        self._started += 1

    def tokens_per_second(self):
        if not self.steps:
            return None
        return self.steps * self.tokens_per_step / self.seconds


def train(corpus, args):
    """Trains on `corpus` as `args` (from `build_parser`) say.

    Returns:
        The results (validation and test figures, speed, sizes) as a dict,
        which the command prints as its last line; None on processes other
        than the first of a multi-process run. With `args.output` it also
        writes `curve.json` and the trained model, `model.keras`.
    """
    metric, metric_class = METRICS[corpus.level]
    logger.info(
        "corpus: %s, %s symbols, %s / %s / %s tokens (train / valid / test)",
        corpus.name, f"{corpus.vocabulary_size:,}", f"{len(corpus.train):,}",
        f"{len(corpus.valid):,}", f"{len(corpus.test):,}",
    )
    if args.cpu_devices:
        use_virtual_cpu_devices(args.cpu_devices)
    keras.utils.set_random_seed(args.seed)

    # === Model: the preset's geometry, the corpus's vocabulary ===
    overrides = {"vocabulary_size": corpus.vocabulary_size}
    for flag, key in (("batch_size", "batch_size"), ("block_size", "block_size"),
                      ("max_span", "max_span"), ("div_val", "adaptive_div_val")):
        if getattr(args, flag):
            overrides[key] = getattr(args, flag)
    if args.cutoffs is not None:
        overrides["adaptive_cutoffs"] = args.cutoffs or None
    cutoffs = overrides.get(
        "adaptive_cutoffs", get_preset(args.preset)["model"].get("adaptive_cutoffs")
    )
    if cutoffs and cutoffs[-1] >= corpus.vocabulary_size:
        raise ValueError(
            f"The adaptive cutoffs {cutoffs} do not fit a vocabulary of "
            f"{corpus.vocabulary_size:,} symbols: pass --cutoffs (e.g. "
            f"{corpus.vocabulary_size // 5},{corpus.vocabulary_size // 2}) or "
            f"--cutoffs none. Received: cutoffs={cutoffs}"
        )
    if args.mixed_precision:
        overrides["dtype"] = "mixed_bfloat16"
    plan = None
    if args.distribute:
        # The memory is sharded with the rows: build under the plan, with
        # the per-replica batch where the backend wants it.
        plan = plan_data_parallel({**get_preset(args.preset)["model"], **overrides})
        plan.activate()
        overrides["batch_size"] = plan.model_batch_size
        logger.info("%s", plan)
        if args.output and plan.backend == "tensorflow" and plan.process_count > 1:
            raise ValueError(
                "--output with --distribute needs JAX, PyTorch or one "
                "TensorFlow worker: a checkpoint of a TensorFlow multi-worker "
                "run would miss the segment memory of the other workers. "
                f"Received: output={args.output!r} on {plan.backend} with "
                f"{plan.process_count} process(es)"
            )
    if args.transformer:
        persistent = get_preset(args.preset)["model"]["persistent_memory_size"]
        overrides.update(persistent_memory_size=0, feedforward_dim=persistent)
    model = AllAttentionLM.from_preset(args.preset, **overrides)
    # With an adaptive softmax the model outputs hidden states and computes
    # the targets' negative log-likelihood itself (`compute_loss`).
    adaptive = model.adaptive_softmax is not None
    if plan:
        plan.check_model(model)
    global_batch_size = plan.global_batch_size if plan else model.batch_size

    # === Optimizer and schedule: the preset's recipe, fitted to --steps ===
    recipe = get_preset(args.preset)["recipe"]
    full_steps = recipe["steps"] + recipe["final_steps"]
    steps = args.steps or full_steps
    run_recipe = scale_recipe(recipe, steps)
    for flag in ("warmup_steps", "learning_rate", "optimizer"):
        if getattr(args, flag) is not None:
            run_recipe[flag] = getattr(args, flag)
    if steps != full_steps:
        drop = (
            f", lr/10 from step {run_recipe['steps']}"
            if run_recipe["final_steps"]
            else ""
        )
        logger.info(
            "schedule: %s steps instead of the recipe's %s: warm-up %s -> %s "
            "steps%s%s", steps, full_steps, recipe["warmup_steps"],
            run_recipe["warmup_steps"],
            "" if args.warmup_steps is not None else " (see scale_recipe)",
            drop,
        )
    model.compile(
        optimizer=optimizer_from_recipe(run_recipe),
        loss=None if adaptive else keras.losses.SparseCategoricalCrossentropy(
            from_logits=True),
        metrics=None if adaptive else [metric_class()],
    )
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    output = (f"adaptive softmax {model.adaptive_cutoffs}" if adaptive
              else "full softmax")
    logger.info(
        "model: %s with %s parameters, %s, batch %s x block %s, span up to "
        "%s; %s lr %s, clip %s", args.preset, f"{trainable:,}", output,
        model.batch_size, model.block_size, model.max_span,
        run_recipe["optimizer"], run_recipe["learning_rate"], run_recipe["clip"],
    )

    # === Data: contiguous streams; resume where a checkpoint left off ===
    batcher = StreamBatcher(
        corpus.train, global_batch_size, model.block_size, seed=args.seed
    )
    if plan:
        batcher = plan.shard(batcher)
    checkpoints = args.output and os.path.join(args.output, "checkpoints")
    start_step = 0
    if checkpoints and latest_checkpoint(checkpoints):
        start_step = restore_training(model, checkpoints, batcher, plan=plan)
        logger.info(
            "resumed from %s: step %s", latest_checkpoint(checkpoints), start_step
        )

    # === Training: one progress-bar epoch per validation ===
    epoch_steps = args.eval_every or max(1, min(1000, steps // 2))
    curve_tokens = (
        corpus.valid[: args.valid_tokens] if args.valid_tokens else corpus.valid
    )
    validation = StreamValidation(curve_tokens, metric)
    throughput = Throughput(global_batch_size * model.block_size)
    clock = TrainingClock(args.time_budget, f"val_{metric}")
    trainer = None
    writes = not (plan and plan.process_index)  # the first process writes
    if plan and not plan.uses_fit:
        # torch DDP, TF multi-worker: `fit` cannot run there. With --output,
        # a checkpoint every `epoch_steps` (tokens/s: of the last of them).
        trainer = DataParallelTrainer(model, plan)
        step = start_step
        while step < steps:
            count = steps - step
            if checkpoints:
                count = min(count, epoch_steps - step % epoch_steps)
            trainer.train(batcher, count, step)
            step += count
            if checkpoints:
                save_training(model, checkpoints, step, batcher, plan=plan)
    elif start_step < steps:
        dataset = batcher.as_dataset(start_step=start_step)
        callbacks = [
            ResetMemoryOnRestart(dataset),
            StopAtStep(start_step, steps),
            validation,
            throughput,
        ]
        callbacks.append(clock)
        if args.output:
            callbacks.append(
                TrainingCheckpoint(checkpoints, epoch_steps, dataset, plan=plan)
            )
        if args.output and writes:
            callbacks += [
                SpanLogger(
                    epoch_steps,
                    log_dir=os.path.join(args.output, "tensorboard", "spans"),
                    heatmap_path=os.path.join(args.output, "spans.png"),
                ),
            ]
            if all(map(importlib.util.find_spec, ("tensorflow", "tensorboard"))):
                callbacks.append(
                    keras.callbacks.TensorBoard(
                        os.path.join(args.output, "tensorboard"),
                        write_graph=False,
                    )
                )
        else:
            callbacks.append(SpanLogger(epoch_steps))
        first_epoch = start_step // epoch_steps
        model.fit(
            dataset,
            steps_per_epoch=epoch_steps,
            initial_epoch=first_epoch,
            epochs=first_epoch + math.ceil((steps - start_step) / epoch_steps),
            callbacks=callbacks,
        )

    # === Exact evaluation: every token once, memory carried ===
    iterations = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    if (
        validation.results
        and validation.results[-1][0] == iterations
        and not args.valid_tokens
    ):
        valid = validation.results[-1][1]
    else:
        valid = evaluate_stream(model, corpus.valid, batch_size=8)
    test = evaluate_stream(model, corpus.test, batch_size=8)
    spans = model.current_spans()
    logger.info("largest learned span per layer: %s", spans.max(axis=1).tolist())
    key = "perplexity" if metric == "perplexity" else "bits_per_token"
    digits = 2 if metric == "perplexity" else 4
    tokens_per_s = (
        trainer.tokens_per_second if trainer else throughput.tokens_per_second()
    )
    if plan and plan.process_index:
        if args.output:  # every JAX process takes part in saving
            save_on_first_process(plan, model.save, "model.keras")
        return None
    result = {
        "corpus": corpus.name,
        "backend": keras.backend.backend(),
        "device": device_name(),
        "preset": args.preset,
        "model": "transformer" if args.transformer else "all-attention",
        "adaptive_cutoffs": model.adaptive_cutoffs if adaptive else None,
        "parameters": trainable,
        "steps": iterations,
        "train_seconds": round(clock.elapsed, 1),
        "devices": plan.num_replicas if plan else 1,
        "global_batch_size": global_batch_size,
        f"valid_{metric}": round(valid[key], digits),
        f"test_{metric}": round(test[key], digits),
        "train_tokens_per_s": (
            None if tokens_per_s is None else round(tokens_per_s)
        ),
    }
    if args.output:
        # The learning curve for benchmarks/plot_curves.py, and the model
        # for `keras-allattn generate` and `keras-allattn export`.
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "curve.json"), "w") as f:
            json.dump({"metric": metric, "result": result, "curve": clock.curve}, f)
        model_path = os.path.join(args.output, "model.keras")
        model.save(model_path)
        logger.info("saved the trained model to %s", model_path)
    return result


def main(argv=None, corpus=None, prog=None, doc=None):
    """Runs `keras-allattn train` (or an example) with `argv`.

    Prints the results as one JSON line and returns 0. A bad argument or
    corpus ends it with a usage error (exit status 2).

    Args:
        argv: the arguments, default `sys.argv[1:]`.
        corpus, prog, doc: see `build_parser`.
    """
    parser = build_parser(corpus, prog=prog, doc=doc)
    args = parser.parse_args(argv)
    if args.preset is None:
        args.preset = CORPORA[args.corpus]["preset"]
    try:
        corpus_data = load_corpus(args.corpus, args.data)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    result = train(corpus_data, args)
    if result is not None:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
