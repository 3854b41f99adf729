"""Export a trained `AllAttentionLM` checkpoint for TensorFlow Serving.

    KERAS_BACKEND=jax python examples/export_serving.py \
        --checkpoint model.keras --output serving --model-name allattn

writes serving/allattn/1/ (a SavedModel with the `serving_default` and
`step` signatures) and serving/models.config, then prints the command that
serves it. Any backend works: from JAX or PyTorch the export runs in a
TensorFlow subprocess. See "Serving with TensorFlow Serving" in README.md.

This script is `keras-allattn export` (installed with the package).
"""

import sys

from keras_allattn.cli import export

if __name__ == "__main__":
    sys.exit(export.main(doc=__doc__))
