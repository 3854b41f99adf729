"""keras-hub tokenizers whose ids are the ids of the corpus loaders.

Built on keras-hub's public API (`keras_hub.tokenizers`), so they work
wherever keras-hub tokenizers do: in Python, and inside `tf.data` pipelines
(TensorFlow Text). Install with `pip install keras-allattn[hub]`.

- byte level (enwik8): `keras_hub.tokenizers.ByteTokenizer(lowercase=False)`.
- character level (text8): `CharacterTokenizer`.
- word level (PTB, WikiText-103): `WordTokenizer`.

`corpus_tokenizer(corpus)` picks the one matching a
`keras_allattn.data.Corpus`.
"""

import json
import os
import re

import keras
import keras_hub

__all__ = ["CharacterTokenizer", "WordTokenizer", "corpus_tokenizer"]

# The word-piece detokenizer joins tokens with single spaces; with one
# character per token, every other character of its output is a separator.
_SEPARATED_CHARACTER = "(?s)(.) "


def _is_python_text(inputs):
    """Whether `inputs` is a string or a list/tuple of strings."""
    return isinstance(inputs, str) or (
        isinstance(inputs, (list, tuple))
        and all(isinstance(text, str) for text in inputs)
    )


@keras.saving.register_keras_serializable(package="keras_allattn")
class CharacterTokenizer(keras_hub.tokenizers.WordPieceTokenizer):
    """One token per character from a vocabulary of characters (text8).

    A `keras_hub.tokenizers.WordPieceTokenizer` whose words are the single
    characters of the text: each character maps to its index in
    `vocabulary`; a character outside it maps to `oov_token`. For text8
    (`vocabulary=list(" abcdefghijklmnopqrstuvwxyz")`, lowercased, unknown
    characters to spaces) this is the text8 normalisation, except that
    digits are not spelled out. `detokenize` concatenates the characters.
    Python strings take keras-hub's Python path; TensorFlow string tensors
    (e.g. inside `tf.data.Dataset.map`) its TensorFlow Text path.

    Args:
        vocabulary: list of single characters, the symbol of id `i` at `i`.
        lowercase: bool, lowercase the text first.
        oov_token: the character unknown characters become; must be in the
            vocabulary.
        **kwargs: `WordPieceTokenizer` arguments (`dtype`, `name`, ...).

    Example:

    >>> tokenizer = CharacterTokenizer(list(" abcdefghijklmnopqrstuvwxyz"))
    >>> tokenizer("Hi, you").tolist()
    [8, 9, 0, 0, 25, 15, 21]
    >>> tokenizer.detokenize([8, 9, 0, 1])
    'hi a'
    """

    def __init__(self, vocabulary=None, lowercase=True, oov_token=" ", **kwargs):
        if isinstance(vocabulary, (list, tuple)):
            for symbol in vocabulary:
                if not isinstance(symbol, str) or len(symbol) != 1:
                    raise ValueError(
                        "`vocabulary` must hold single characters. "
                        f"Received: a vocabulary entry {symbol!r}"
                    )
        kwargs["split"] = False
        super().__init__(
            vocabulary=vocabulary, lowercase=lowercase, oov_token=oov_token,
            **kwargs,
        )

    def tokenize(self, inputs):
        if isinstance(inputs, str):
            return super().tokenize(list(inputs))
        if _is_python_text(inputs):
            return super().tokenize([list(text) for text in inputs])
        import tensorflow as tf

        return super().tokenize(tf.strings.unicode_split(inputs, "UTF-8"))

    def detokenize(self, inputs):
        texts = super().detokenize(inputs)
        if isinstance(texts, str):
            return re.sub(_SEPARATED_CHARACTER, r"\1", texts)
        if isinstance(texts, (list, tuple)):
            return [re.sub(_SEPARATED_CHARACTER, r"\1", t) for t in texts]
        import tensorflow as tf

        return tf.strings.regex_replace(texts, _SEPARATED_CHARACTER, r"\1")

    def save_assets(self, dir_path):
        # JSON, since the base class's one token per line loses " ".
        with open(os.path.join(dir_path, "vocabulary.json"), "w") as f:
            json.dump(self.vocabulary, f)

    def load_assets(self, dir_path):
        with open(os.path.join(dir_path, "vocabulary.json")) as f:
            self.set_vocabulary(json.load(f))


@keras.saving.register_keras_serializable(package="keras_allattn")
class WordTokenizer(keras_hub.tokenizers.WordPieceTokenizer):
    """Whitespace-separated words from a fixed vocabulary (PTB, WikiText).

    A `keras_hub.tokenizers.WordPieceTokenizer` over whole words: the text
    is split on whitespace only (punctuation stays inside words, as in the
    corpora: `n't`, `'s`, `<eos>`), each word maps to its index in
    `vocabulary`, and a word outside it maps to `oov_token`. Write `<eos>`
    where a line ends, as the corpus loaders do. `detokenize` joins words
    with single spaces.

    Args:
        vocabulary: list of words, the word of id `i` at `i` (e.g.
            `Corpus.vocabulary`).
        oov_token: the word unknown words become; must be in the vocabulary.
        **kwargs: `WordPieceTokenizer` arguments (`lowercase`, `dtype`, ...).

    Example:

    >>> tokenizer = WordTokenizer(["<unk>", "<eos>", "the", "n't"])
    >>> tokenizer("the cat n't <eos>").tolist()
    [2, 0, 3, 1]
    """

    def __init__(self, vocabulary=None, oov_token="<unk>", **kwargs):
        kwargs["split"] = False
        super().__init__(vocabulary=vocabulary, oov_token=oov_token, **kwargs)

    def tokenize(self, inputs):
        if isinstance(inputs, str):
            return super().tokenize(inputs.split())
        if _is_python_text(inputs):
            return super().tokenize([text.split() for text in inputs])
        import tensorflow as tf

        return super().tokenize(tf.strings.split(inputs))


def corpus_tokenizer(corpus):
    """The keras-hub tokenizer matching a `keras_allattn.data.Corpus`.

    Byte level (enwik8): `keras_hub.tokenizers.ByteTokenizer(lowercase=False)`
    (ids are the byte values). Character level (text8): `CharacterTokenizer`
    over the corpus alphabet, unknown characters to spaces. Word level (PTB,
    WikiText-103): `WordTokenizer` over the corpus vocabulary, unknown words
    to `<unk>`.

    Args:
        corpus: a `Corpus` (anything with `level` and `vocabulary`).

    Returns:
        A keras-hub tokenizer whose ids are the corpus ids.

    Example:

    >>> from keras_allattn.data import load_ptb
    >>> tokenizer = corpus_tokenizer(load_ptb("ptb"))  # doctest: +SKIP
    >>> tokenizer("the market <eos>")  # doctest: +SKIP
    """
    if corpus.level == "byte":
        return keras_hub.tokenizers.ByteTokenizer(lowercase=False)
    vocabulary = list(corpus.vocabulary)
    if corpus.level == "character":
        return CharacterTokenizer(
            vocabulary,
            lowercase=all(c == c.lower() for c in vocabulary),
            oov_token=" " if " " in vocabulary else vocabulary[0],
        )
    if corpus.level == "word":
        return WordTokenizer(vocabulary)
    raise ValueError(
        "`corpus.level` must be 'byte', 'character' or 'word'. "
        f"Received: level={corpus.level!r}"
    )
