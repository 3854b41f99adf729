"""Print samples from a trained `AllAttentionLM` checkpoint (`.keras` file).

    KERAS_BACKEND=jax python examples/generate.py --checkpoint model.keras \
        --tokenizer byte --prompt "The " --max-length 300 --sampler top_p

--tokenizer picks how text becomes token ids, matching the corpus the model
was trained on: `byte` (enwik8 and `examples/quickstart.py`: ids are byte
values), `text8` (27 symbols: space and a-z), `ptb` or `wikitext103` (word
level; the vocabulary is rebuilt from the training split in --corpus), or
`ids` (the prompt is space-separated token ids, printed back as ids).
"""

import argparse

import keras
import keras_hub
import numpy as np

from keras_allattn.data import load_ptb
from keras_allattn.data import load_wikitext103
from keras_allattn.data.corpora import TEXT8_ALPHABET
from keras_allattn.models import generation

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--checkpoint", required=True, help="a .keras file")
parser.add_argument("--prompt", default="The ")
parser.add_argument("--max-length", type=int, default=200,
                    help="tokens per sample, prompt included")
parser.add_argument("--sampler", default="top_k", choices=generation.SAMPLERS)
parser.add_argument("--tokenizer", default="byte",
                    choices=["byte", "text8", "ptb", "wikitext103", "ids"])
parser.add_argument("--corpus", help="corpus folder for ptb / wikitext103 "
                    "(default ../shared/data/ptb for ptb)")
parser.add_argument("--num-samples", type=int, default=3)
parser.add_argument("--stop-token", help="a token (text) that ends a sample")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

keras.utils.set_random_seed(args.seed)
model = keras.saving.load_model(args.checkpoint, compile=False)  # no training here

if args.tokenizer == "byte":
    tokenizer = keras_hub.tokenizers.ByteTokenizer(lowercase=False)
elif args.tokenizer == "text8":
    tokenizer = generation.CharacterTokenizer(list(TEXT8_ALPHABET))
elif args.tokenizer == "ptb":
    tokenizer = generation.corpus_tokenizer(
        load_ptb(args.corpus or "../shared/data/ptb")
    )
elif args.tokenizer == "wikitext103":
    tokenizer = generation.corpus_tokenizer(load_wikitext103(args.corpus))
else:
    tokenizer = None

if tokenizer is None:
    prompt = np.array([[int(i) for i in args.prompt.split()]] * args.num_samples)
else:
    prompt = [args.prompt] * args.num_samples
stop_token_ids = None
if args.stop_token is not None:
    stop_token_ids = np.asarray(tokenizer(args.stop_token)).reshape(-1)[:1]

samples = model.generate(
    prompt,
    max_length=args.max_length,
    sampler=args.sampler,
    stop_token_ids=stop_token_ids,
    tokenizer=tokenizer,
)
for i, sample in enumerate(samples):
    text = " ".join(map(str, sample.tolist())) if tokenizer is None else sample
    print(f"--- sample {i} ({args.sampler}, {keras.backend.backend()})")
    print(text)
