"""`keras-allattn generate`: samples from a trained `AllAttentionLM`.

    keras-allattn generate --checkpoint runs/text8/model.keras \\
        --tokenizer text8 --prompt "the " --max-length 300 --sampler top_p

--checkpoint is a `model.save()` file (`keras-allattn train --output DIR`
writes DIR/model.keras). --tokenizer picks how text becomes token ids,
matching the corpus the model was trained on: `byte` (enwik8 and the
offline default corpus: ids are byte values), `text8` (27 symbols: space
and a-z), `ptb` or `wikitext103` (word level; the vocabulary is rebuilt
from the training split in --corpus), or `ids` (the prompt is
space-separated token ids, printed back as ids). Needs keras-hub
(`pip install keras-allattn[hub]`).
"""

import sys

import keras
import numpy as np

from keras_allattn.cli import command_parser
from keras_allattn.data import load_ptb
from keras_allattn.data import load_wikitext103
from keras_allattn.data.corpora import TEXT8_ALPHABET
from keras_allattn.models.generation import SAMPLERS

__all__ = ["build_parser", "main", "make_tokenizer"]

TOKENIZERS = ("byte", "text8", "ptb", "wikitext103", "ids")


def build_parser(prog=None, doc=None):
    """The command line of `keras-allattn generate` and `examples/generate.py`."""
    parser = command_parser(prog, doc or __doc__)
    parser.add_argument("--checkpoint", required=True, help="a .keras file")
    parser.add_argument("--prompt", default="The ")
    parser.add_argument("--max-length", type=int, default=200,
                        help="tokens per sample, prompt included")
    parser.add_argument("--sampler", default="top_k", choices=SAMPLERS)
    parser.add_argument("--tokenizer", default="byte", choices=TOKENIZERS)
    parser.add_argument("--corpus", help="corpus folder for ptb / wikitext103 "
                        "(default ../shared/data/ptb for ptb)")
    parser.add_argument("--num-samples", type=int, default=3)
    parser.add_argument("--stop-token", help="a token (text) that ends a sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                        help="0: no progress bar")
    return parser


def make_tokenizer(name, corpus=None):
    """The tokenizer `--tokenizer name` means (None for "ids")."""
    import keras_hub

    from keras_allattn import tokenizers

    if name == "byte":
        return keras_hub.tokenizers.ByteTokenizer(lowercase=False)
    if name == "text8":
        return tokenizers.CharacterTokenizer(list(TEXT8_ALPHABET))
    if name == "ptb":
        return tokenizers.corpus_tokenizer(load_ptb(corpus or "../shared/data/ptb"))
    if name == "wikitext103":
        return tokenizers.corpus_tokenizer(load_wikitext103(corpus))
    if name == "ids":
        return None
    raise ValueError(
        f"`tokenizer` must be one of {TOKENIZERS}. Received: tokenizer={name!r}"
    )


def main(argv=None, prog=None, doc=None):
    """Runs `keras-allattn generate`; prints the samples, returns 0."""
    args = build_parser(prog, doc).parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    model = keras.saving.load_model(args.checkpoint, compile=False)  # no training here
    tokenizer = make_tokenizer(args.tokenizer, args.corpus)
    if tokenizer is None:
        prompt = np.array(
            [[int(i) for i in args.prompt.split()]] * args.num_samples
        )
    else:
        prompt = [args.prompt] * args.num_samples
    stop_token_ids = None
    if args.stop_token is not None:
        if tokenizer is None:
            stop_token_ids = [int(args.stop_token)]
        else:
            ids = np.asarray(tokenizer(args.stop_token)).reshape(-1)
            stop_token_ids = ids[:1]
    samples = model.generate(
        prompt,
        max_length=args.max_length,
        sampler=args.sampler,
        stop_token_ids=stop_token_ids,
        tokenizer=tokenizer,
        verbose=args.verbose,
    )
    for i, sample in enumerate(samples):
        if tokenizer is None:
            sample = " ".join(map(str, sample.tolist()))
        print(f"--- sample {i} ({args.sampler}, {keras.backend.backend()})")
        print(sample)
    return 0


if __name__ == "__main__":
    sys.exit(main())
