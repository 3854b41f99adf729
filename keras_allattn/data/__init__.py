"""Corpora, stream batching and exact evaluation for keras_allattn."""

from keras_allattn.data.corpora import Corpus
from keras_allattn.data.corpora import load_enwik8
from keras_allattn.data.corpora import load_ptb
from keras_allattn.data.corpora import load_text8
from keras_allattn.data.corpora import load_wikitext103
from keras_allattn.data.evaluation import evaluate_stream
from keras_allattn.data.stream import ResetMemoryOnRestart
from keras_allattn.data.stream import StreamBatcher
from keras_allattn.data.stream import StreamDataset
from keras_allattn.data.stream import as_token_array

__all__ = [
    "Corpus",
    "ResetMemoryOnRestart",
    "StreamBatcher",
    "StreamDataset",
    "as_token_array",
    "evaluate_stream",
    "load_enwik8",
    "load_ptb",
    "load_text8",
    "load_wikitext103",
]
