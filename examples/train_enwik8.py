"""Train the all-attention network on enwik8 and report bits per byte.

enwik8 is read as raw bytes (256 symbols). With no --data the script trains
offline on the UTF-8 bytes of CPython's bundled English documentation
(pydoc_data), split 90/5/5; --data takes the canonical enwik8 file or
enwik8.zip, a folder of train/valid/test splits (e.g.
../shared/data/wiki-bytes), or any other file, split the same way.

Usage:

    KERAS_BACKEND=jax python examples/train_enwik8.py --steps 200
    KERAS_BACKEND=jax python examples/train_enwik8.py \\
        --data ../shared/data/wiki-bytes --steps 3000 --output runs/enwik8
    python examples/train_enwik8.py --data enwik8.zip --preset enwik8_small \\
        --output runs/enwik8_small    # the paper's recipe (needs GPUs)

The optimizer and schedule come from the preset's recipe. With --output the
run writes checkpoints (and resumes from them), TensorBoard logs and a heat
map of the learned spans and the trained model (model.keras). The last line
printed is a JSON object with validation and test bits per byte and training
tokens per second.

This script is `keras-allattn train --corpus enwik8` (installed with the
package)."""

import sys

from keras_allattn.cli import train

if __name__ == "__main__":
    sys.exit(train.main(corpus="enwik8", doc=__doc__))
