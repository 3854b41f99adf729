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

This script is `keras-allattn train --corpus wikitext103` (installed with
the package)."""

import sys

from keras_allattn.cli import train

if __name__ == "__main__":
    sys.exit(train.main(corpus="wikitext103", doc=__doc__))
