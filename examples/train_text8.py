"""Train the all-attention network on text8 and report bits per character.

text8 is 27 symbols: lowercase a-z and space. With no --data the script
trains offline on CPython's bundled English documentation (pydoc_data),
normalised to text8's alphabet and split 90/5/5; --data takes the
canonical text8 file or text8.zip, a folder of train/valid/test splits
(e.g. ../shared/data/wiki-text8), or any other text file, normalised and
split the same way.

Usage:

    KERAS_BACKEND=jax python examples/train_text8.py --steps 200
    KERAS_BACKEND=jax python examples/train_text8.py \\
        --data ../shared/data/wiki-text8 --steps 3000 --output runs/text8
    python examples/train_text8.py --data text8.zip --preset text8_small \\
        --output runs/text8_small     # the paper's recipe (needs GPUs)

The optimizer and schedule come from the preset's recipe. With --output the
run writes checkpoints (and resumes from them), TensorBoard logs and a heat
map of the learned spans and the trained model (model.keras). The last line
printed is a JSON object with validation and test bits per character and
training tokens per second.

This script is `keras-allattn train --corpus text8` (installed with the
package)."""

import sys

from keras_allattn.cli import train

if __name__ == "__main__":
    sys.exit(train.main(corpus="text8", doc=__doc__))
