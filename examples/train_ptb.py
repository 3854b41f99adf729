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
checkpoints (and resumes from them), TensorBoard logs, a heat map of the
learned spans and the trained model (model.keras). The last line printed is
a JSON object with validation and test perplexity and training tokens per
second.

This script is `keras-allattn train --corpus ptb` (installed with the package).
"""

import sys

from keras_allattn.cli import train

if __name__ == "__main__":
    sys.exit(train.main(corpus="ptb", doc=__doc__))
