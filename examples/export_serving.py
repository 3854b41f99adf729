"""Export a trained `AllAttentionLM` checkpoint for TensorFlow Serving.

    KERAS_BACKEND=jax python examples/export_serving.py \
        --checkpoint model.keras --output serving --model-name allattn

writes serving/allattn/1/ (a SavedModel with the `serving_default` and
`step` signatures) and serving/models.config, then prints the command that
serves it. Any backend works: from JAX or PyTorch the export runs in a
TensorFlow subprocess. See "Serving with TensorFlow Serving" in README.md.
"""

import argparse
import os

import keras

import keras_allattn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--checkpoint", required=True, help="a .keras file")
parser.add_argument("--output", default="serving", help="model base folder")
parser.add_argument("--model-name", default="all_attention_lm")
parser.add_argument("--version", type=int, default=1)
parser.add_argument("--overwrite", action="store_true")
args = parser.parse_args()

model = keras.saving.load_model(args.checkpoint, compile=False)  # no training here
export_dir = keras_allattn.export_saved_model(
    model,
    args.output,
    model_name=args.model_name,
    version=args.version,
    overwrite=args.overwrite,
)
print(f"exported {export_dir} and {os.path.join(args.output, 'models.config')}")
print("serve it with:")
print(
    f'  docker run --rm -p 8501:8501 -v "{os.path.abspath(args.output)}:/models" '
    "tensorflow/serving --model_config_file=/models/models.config"
)
print(
    f"  curl -d '{{\"inputs\": {{\"tokens\": [[84, 104, 101]]}}}}' "
    f"localhost:8501/v1/models/{args.model_name}:predict"
)
