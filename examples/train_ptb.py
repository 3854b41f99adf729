"""Train the all-attention network on Penn Treebank and report perplexity.

Word level: the vocabulary (10,000 words with <unk> and <eos>) comes from
the training split and sets the model's vocabulary size. PTB has no offline
default: --data must name a folder holding ptb.{train,valid,test}.txt or
{train,valid,test}.txt (optionally .xz), such as ../shared/data/ptb.

Usage:

    KERAS_BACKEND=jax python examples/train_ptb.py --data ../shared/data/ptb \\
        --steps 200
    KERAS_BACKEND=jax python examples/train_ptb.py --data ../shared/data/ptb \\
        --output runs/ptb

The optimizer and schedule come from the preset's recipe (ptb_small_cpu:
Adam with global-norm clipping and warm-up). With --output the run writes
checkpoints (and resumes from them), TensorBoard logs and a heat map of the
learned spans. The last line printed is a JSON object with validation and
test perplexity and training tokens per second.
"""

import _train_common

from keras_allattn.data import load_ptb

args = _train_common.parse_args(
    __doc__,
    default_preset="ptb_small_cpu",
    data_help="folder of the PTB splits (required), e.g. ../shared/data/ptb",
)
if args.data is None:
    raise SystemExit(
        "train_ptb.py needs --data: a folder of the PTB splits, e.g. "
        "--data ../shared/data/ptb (PTB has no offline default)."
    )
_train_common.train(load_ptb(args.data), args)
