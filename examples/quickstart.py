"""Train a small all-attention byte-level model and report bits per byte.

With no --data it trains on the English documentation text that ships with
CPython (`pydoc_data.topics`, about 470 KB), so it runs offline anywhere:

    KERAS_BACKEND=jax python examples/quickstart.py
    KERAS_BACKEND=torch python examples/quickstart.py --data my_text.txt

The last 5% of the text is held out and scored exactly (every byte once,
segment memory carried) at the end.
"""

import argparse
import json
import math
import time

import keras
import numpy as np

import keras_allattn
from keras_allattn.training import BitsPerByte
from keras_allattn.data import ResetMemoryOnRestart
from keras_allattn.data import StreamBatcher
from keras_allattn.data import evaluate_stream

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", help="a UTF-8 text file (default: pydoc topics)")
parser.add_argument("--steps", type=int, default=400)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--block-size", type=int, default=64)
parser.add_argument("--max-span", type=int, default=128)
parser.add_argument("--layers", type=int, default=3)
parser.add_argument("--hidden-dim", type=int, default=128)
parser.add_argument("--heads", type=int, default=4)
parser.add_argument("--persistent", type=int, default=64)
parser.add_argument("--learning-rate", type=float, default=2e-3)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()


def english_text():
    if args.data:
        with open(args.data, "rb") as f:
            return f.read()
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics)).encode("utf-8")


data = np.frombuffer(english_text(), dtype=np.uint8).astype("int32")
split = int(len(data) * 0.95)
train, valid = data[:split], data[split:]
print(f"corpus: {len(data):,} bytes ({len(train):,} train, {len(valid):,} valid)")

keras.utils.set_random_seed(args.seed)
model = keras_allattn.AllAttentionLM(
    vocabulary_size=256,
    num_layers=args.layers,
    hidden_dim=args.hidden_dim,
    num_heads=args.heads,
    persistent_memory_size=args.persistent,
    max_span=args.max_span,
    block_size=args.block_size,
    batch_size=args.batch_size,
    adaptive_span=True,
    span_loss_coeff=1e-6,
    dropout=0.1,
)
model.compile(
    optimizer=keras.optimizers.Adam(args.learning_rate),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=[BitsPerByte()],
    jit_compile=True,
)
dataset = StreamBatcher(
    train, args.batch_size, args.block_size, seed=args.seed
).as_dataset()
start = time.time()
model.fit(
    dataset,
    steps_per_epoch=args.steps // 5,
    epochs=5,
    callbacks=[ResetMemoryOnRestart(dataset)],
)
elapsed = time.time() - start
result = evaluate_stream(model, valid, batch_size=8)
print(f"learned spans per layer: {model.current_spans().max(axis=1).tolist()}")
print(
    json.dumps(
        {
            "backend": keras.backend.backend(),
            "train_steps": args.steps // 5 * 5,
            "train_tokens_per_s": round(
                args.steps // 5 * 5 * args.batch_size * args.block_size / elapsed
            ),
            "valid_bits_per_byte": round(result["loss"] / math.log(2), 4),
        }
    )
)
