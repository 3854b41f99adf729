"""Train the all-attention network on WikiText-103 and report perplexity.

Word level with adaptive input embeddings and an adaptive softmax (cutoffs
20000 / 40000 / 200000, div_val 4, tied), as in the paper's WikiText-103
model (`--preset wikitext103`: 36 layers, d 512, 2048 persistent vectors;
Adam 2.5e-4, 8k warm-up steps, global-norm clip 1.0). The vocabulary comes
from the training split, most frequent word first, and sets the model's
vocabulary size. There is no offline default: --data names a folder with
train.txt / valid.txt / test.txt (or wiki.{train,valid,test}.tokens,
optionally .xz) or the wikitext-103-v1.zip archive.

Usage:

    KERAS_BACKEND=jax python examples/train_wikitext103.py \\
        --data wikitext-103 --output runs/wt103
    # a small word-level run on a CPU (PTB's splits, adaptive softmax):
    KERAS_BACKEND=jax python examples/train_wikitext103.py \\
        --data ../shared/data/ptb --preset ptb_small_cpu \\
        --cutoffs 2000,6000 --steps 200

The optimizer and schedule come from the preset's recipe, fitted to
--steps. With an adaptive softmax the model computes its own loss (see
`AllAttentionLM`): the progress bar shows the loss, perplexity is
exp(loss). With --output the run writes checkpoints (and resumes from
them) and the final model (`model.keras`). Validation and test are exact
(`evaluate_stream`: every token once, memory carried, batch 8). The last
line printed is a JSON object with validation and test perplexity.
"""

import argparse
import json
import math
import os

import _train_common
import keras
import numpy as np

from keras_allattn import AllAttentionLM
from keras_allattn.data import ResetMemoryOnRestart
from keras_allattn.data import StreamBatcher
from keras_allattn.data import evaluate_stream
from keras_allattn.data import load_wikitext103
from keras_allattn.presets import get_preset
from keras_allattn.presets import preset_names
from keras_allattn.training import Perplexity
from keras_allattn.training import SpanLogger
from keras_allattn.training import StreamValidation
from keras_allattn.training import TrainingCheckpoint
from keras_allattn.training import latest_checkpoint
from keras_allattn.training import optimizer_from_recipe
from keras_allattn.training import restore_training
from keras_allattn.training import scale_recipe


def parse_cutoffs(text):
    """'20000,40000' -> [20000, 40000]; 'none' -> None (a full softmax)."""
    if text.lower() == "none":
        return None
    return [int(part) for part in text.split(",") if part.strip()]


parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    epilog="\n".join(__doc__.splitlines()[1:]),
    formatter_class=argparse.RawDescriptionHelpFormatter,
)
parser.add_argument("--data", required=True,
                    help="folder (or zip archive) of the three splits")
parser.add_argument("--preset", default="wikitext103", choices=preset_names())
parser.add_argument("--cutoffs",
                    help="adaptive cutoffs, e.g. 2000,6000, or 'none' for a "
                    "full softmax (default: the preset's)")
parser.add_argument("--div-val", type=int, help="override the preset's div_val")
parser.add_argument("--steps", type=int,
                    help="training steps (default: the recipe's); the "
                    "schedule is fitted to the run")
parser.add_argument("--batch-size", type=int, help="override the preset")
parser.add_argument("--block-size", type=int, help="override the preset")
parser.add_argument("--max-span", type=int, help="override the preset")
parser.add_argument("--mixed-precision", action="store_true",
                    help='train with dtype "mixed_bfloat16"')
parser.add_argument("--output", help="folder for checkpoints and the model")
parser.add_argument("--eval-every", type=int, default=0,
                    help="steps between two exact validations (default: "
                    "half the run, at most 1000)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

corpus = load_wikitext103(args.data)
print(
    f"corpus: {args.data}, {corpus.vocabulary_size:,} words, "
    f"{len(corpus.train):,} / {len(corpus.valid):,} / {len(corpus.test):,} "
    "tokens (train / valid / test)"
)
keras.utils.set_random_seed(args.seed)

# === Model: the preset's geometry, the corpus's vocabulary ===
preset = get_preset(args.preset)
overrides = {"vocabulary_size": corpus.vocabulary_size}
for flag, key in (("batch_size", "batch_size"), ("block_size", "block_size"),
                  ("max_span", "max_span"), ("div_val", "adaptive_div_val")):
    if getattr(args, flag):
        overrides[key] = getattr(args, flag)
if args.cutoffs is not None:
    overrides["adaptive_cutoffs"] = parse_cutoffs(args.cutoffs)
cutoffs = overrides.get("adaptive_cutoffs", preset["model"].get("adaptive_cutoffs"))
if cutoffs and cutoffs[-1] >= corpus.vocabulary_size:
    raise SystemExit(
        f"The adaptive cutoffs {cutoffs} do not fit a vocabulary of "
        f"{corpus.vocabulary_size:,} words: pass --cutoffs (e.g. "
        f"{corpus.vocabulary_size // 5},{corpus.vocabulary_size // 2}) or "
        "--cutoffs none."
    )
if args.mixed_precision:
    overrides["dtype"] = "mixed_bfloat16"
model = AllAttentionLM.from_preset(args.preset, **overrides)
adaptive = model.adaptive_softmax is not None

# === Optimizer and schedule: the preset's recipe, fitted to --steps ===
recipe = preset["recipe"]
steps = args.steps or recipe["steps"] + recipe["final_steps"]
run_recipe = scale_recipe(recipe, steps)
model.compile(
    optimizer=optimizer_from_recipe(run_recipe),
    # With an adaptive softmax the model outputs hidden states and computes
    # the targets' negative log-likelihood itself (`compute_loss`).
    loss=None if adaptive else keras.losses.SparseCategoricalCrossentropy(
        from_logits=True),
    metrics=None if adaptive else [Perplexity()],
)
parameters = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
output = (f"adaptive softmax {model.adaptive_cutoffs}" if adaptive
          else "full softmax")
print(
    f"model: {args.preset} with {parameters:,} parameters, {output}"
    f", batch {model.batch_size} x block {model.block_size}, span up to "
    f"{model.max_span}; {run_recipe['optimizer']} lr "
    f"{run_recipe['learning_rate']}, warm-up {run_recipe['warmup_steps']}, "
    f"clip {run_recipe['clip']}, {steps} steps"
)

# === Data: contiguous streams; resume where a checkpoint left off ===
batcher = StreamBatcher(corpus.train, model.batch_size, model.block_size,
                        seed=args.seed)
checkpoints = args.output and os.path.join(args.output, "checkpoints")
start_step = 0
if checkpoints and latest_checkpoint(checkpoints):
    start_step = restore_training(model, checkpoints, batcher)
    print(f"resumed from {latest_checkpoint(checkpoints)}: step {start_step}")

# === Training: one progress-bar epoch per exact validation ===
epoch_steps = args.eval_every or max(1, min(1000, steps // 2))
validation = StreamValidation(corpus.valid, "perplexity")
throughput = _train_common.Throughput(model.batch_size * model.block_size)
if start_step < steps:
    dataset = batcher.as_dataset(start_step=start_step)
    callbacks = [
        ResetMemoryOnRestart(dataset),
        _train_common.StopAtStep(start_step, steps),
        validation,
        throughput,
        SpanLogger(epoch_steps),
    ]
    if checkpoints:
        callbacks.append(TrainingCheckpoint(checkpoints, epoch_steps, dataset))
    first_epoch = start_step // epoch_steps
    model.fit(
        dataset,
        steps_per_epoch=epoch_steps,
        initial_epoch=first_epoch,
        epochs=first_epoch + math.ceil((steps - start_step) / epoch_steps),
        callbacks=callbacks,
    )
if args.output:
    model.save(os.path.join(args.output, "model.keras"))

# === Exact evaluation: every token once, memory carried ===
iterations = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
if validation.results and validation.results[-1][0] == iterations:
    valid = validation.results[-1][1]
else:
    valid = evaluate_stream(model, corpus.valid, batch_size=8)
test = evaluate_stream(model, corpus.test, batch_size=8)
tokens_per_s = throughput.tokens_per_second()
print(
    json.dumps(
        {
            "corpus": args.data,
            "backend": keras.backend.backend(),
            "preset": args.preset,
            "adaptive_cutoffs": model.adaptive_cutoffs,
            "parameters": parameters,
            "steps": steps,
            "valid_perplexity": round(valid["perplexity"], 2),
            "test_perplexity": round(test["perplexity"], 2),
            "train_tokens_per_s": (
                None if tokens_per_s is None else round(tokens_per_s)
            ),
        }
    )
)
