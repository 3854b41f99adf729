"""Progress bars of long work, and the keras-hub tokenizers' two paths."""

import re

import numpy as np
import pytest

from keras_allattn import AllAttentionLM
from keras_allattn.data import evaluate_stream
from keras_allattn.data import load_wikitext103
from keras_allattn.models import generation
from keras_allattn.tokenizers import CharacterTokenizer
from keras_allattn.tokenizers import WordTokenizer

V = 16


def tiny_model():
    return AllAttentionLM(
        vocabulary_size=V, num_layers=1, hidden_dim=8, num_heads=2,
        persistent_memory_size=2, max_span=8, block_size=4, batch_size=2,
    )


def bar_lines(out):
    """The states a Progbar wrote, colours and backspaces removed."""
    out = re.sub(r"\x1b\[[0-9;]*m|\x08", "", out).replace("\r", "\n")
    return [line.strip() for line in out.splitlines() if "━" in line]


def test_evaluate_stream_progress_bar(capsys):
    model = tiny_model()
    tokens = np.arange(39) % V  # 38 predictions: 2 rows of 19, no tail
    silent = evaluate_stream(model, tokens, batch_size=2, verbose=0)
    assert capsys.readouterr().out == ""
    shown = evaluate_stream(model, tokens, batch_size=2, verbose=1)
    bars = bar_lines(capsys.readouterr().out)
    assert bars and bars[-1].startswith("38/38")
    # The bar's loss is the mean of the blocks' losses weighted by tokens.
    loss = float(bars[-1].split("loss: ")[1].split()[0])
    assert loss == pytest.approx(shown["loss"], abs=1e-4)
    assert shown == silent
    evaluate_stream(model, np.arange(40) % V, batch_size=2, verbose=2)
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert out.count("39/39") == 1 and "━" not in out  # one line, no bar
    with pytest.raises(ValueError, match="`verbose` must be one of"):
        evaluate_stream(model, tokens, verbose=3)


def test_generate_progress_bar(capsys, monkeypatch):
    monkeypatch.setattr(generation, "TORCH_COMPILE", False)
    model = tiny_model()
    prompt = np.array([[1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8]])
    quiet = model.generate(prompt, 9, verbose=0)
    assert capsys.readouterr().out == ""
    shown = model.generate(prompt, 9)  # "auto": a bar
    bars = bar_lines(capsys.readouterr().out)
    # One unit per position read: 5 prompt tokens, then 3 new ones.
    assert bars and bars[-1].startswith("8/8")
    np.testing.assert_array_equal(shown, quiet)
    with pytest.raises(ValueError, match="Received: verbose='yes'"):
        model.generate(prompt, 9, verbose="yes")


def test_corpus_preparation_progress_bar(tmp_path, capsys):
    # A folder of token files (PTB folders are checked against the
    # published files, so these go through the WikiText-103 loader).
    lines = {"train": "a b c\nb c\n", "valid": "a b\n", "test": "c a\n"}
    for split, text in lines.items():
        (tmp_path / f"wiki.{split}.tokens").write_text(text)
    corpus = load_wikitext103(tmp_path, verbose=0)
    assert capsys.readouterr().out == ""
    assert load_wikitext103(tmp_path).vocabulary == corpus.vocabulary
    total = sum(len(text) for text in lines.values())
    bars = bar_lines(capsys.readouterr().out)
    assert bars and bars[-1].startswith(f"{total}/{total}")


def test_character_tokenizer_in_python_and_tf_data():
    tf = pytest.importorskip("tensorflow")
    tokenizer = CharacterTokenizer(list(" abcdefghijklmnopqrstuvwxyz"))
    texts = ["Hi, you", "a  b ", " "]
    ids = [tokenizer(text).tolist() for text in texts]
    assert ids[0] == [8, 9, 0, 0, 25, 15, 21]
    assert [list(row) for row in tokenizer(texts)] == ids
    assert tokenizer.detokenize(ids) == ["hi  you", "a  b ", " "]
    assert tokenizer.detokenize(ids[1]) == "a  b "
    # The same through TensorFlow Text, inside tf.data.
    dataset = tf.data.Dataset.from_tensor_slices(texts).map(tokenizer)
    assert [x.numpy().tolist() for x in dataset] == ids
    ragged = tf.ragged.constant(ids)
    back = tf.data.Dataset.from_tensor_slices(ragged).map(tokenizer.detokenize)
    assert [x.numpy().decode() for x in back] == ["hi  you", "a  b ", " "]
    with pytest.raises(ValueError, match="single characters"):
        CharacterTokenizer(["a", "bc"])


def test_word_tokenizer_in_python_and_tf_data():
    tf = pytest.importorskip("tensorflow")
    tokenizer = WordTokenizer(["<unk>", "<eos>", "the", "n't"])
    texts = ["the cat n't <eos>", "the"]
    ids = [[2, 0, 3, 1], [2]]
    assert [list(row) for row in tokenizer(texts)] == ids
    dataset = tf.data.Dataset.from_tensor_slices(texts).map(tokenizer)
    assert [x.numpy().tolist() for x in dataset] == ids
    assert tokenizer.detokenize(ids[0]) == "the <unk> n't <eos>"
