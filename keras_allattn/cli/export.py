"""`keras-allattn export`: a trained model as a TensorFlow Serving SavedModel.

    keras-allattn export --checkpoint model.keras --output serving \\
        --model-name allattn

writes serving/allattn/1/ (a SavedModel with the `serving_default` and
`step` signatures) and serving/models.config, then prints the command that
serves it. Any backend works: from JAX or PyTorch the export runs in a
TensorFlow subprocess (TensorFlow must be installed:
`pip install keras-allattn[tensorflow]`). See "Serving with TensorFlow
Serving" in the README.
"""

import os
import sys

import keras

from keras_allattn.cli import command_parser
from keras_allattn.export import export_saved_model

__all__ = ["build_parser", "main"]


def build_parser(prog=None, doc=None):
    """The command line of `keras-allattn export` and `examples/export_serving.py`."""
    parser = command_parser(prog, doc or __doc__)
    parser.add_argument("--checkpoint", required=True, help="a .keras file")
    parser.add_argument("--output", default="serving", help="model base folder")
    parser.add_argument("--model-name", default="all_attention_lm")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    return parser


def main(argv=None, prog=None, doc=None):
    """Runs `keras-allattn export`; prints where the model went, returns 0."""
    args = build_parser(prog, doc).parse_args(argv)
    model = keras.saving.load_model(args.checkpoint, compile=False)  # no training here
    export_dir = export_saved_model(
        model,
        args.output,
        model_name=args.model_name,
        version=args.version,
        overwrite=args.overwrite,
    )
    config = os.path.join(args.output, "models.config")
    print(f"exported {export_dir} and {config}")
    print("serve it with:")
    print(
        f'  docker run --rm -p 8501:8501 -v "{os.path.abspath(args.output)}:'
        '/models" tensorflow/serving --model_config_file=/models/models.config'
    )
    print(
        f"  curl -d '{{\"inputs\": {{\"tokens\": [[84, 104, 101]]}}}}' "
        f"localhost:8501/v1/models/{args.model_name}:predict"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
