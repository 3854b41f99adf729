"""Misuse of the public API: every bad input fails early and says so.

Each case calls one public entry point with one bad input and checks the
error type and that the message names the argument (or what was given)
and the value received. The cases are cheap: one tiny model shared by the
module, small arrays, files in a temporary folder.
"""

import zipfile

import keras
import numpy as np
import pytest

from keras_allattn import AllAttentionLM
from keras_allattn.data import StreamBatcher
from keras_allattn.data import evaluate_stream
from keras_allattn.data import load_enwik8
from keras_allattn.data import load_ptb
from keras_allattn.data import load_text8
from keras_allattn.data import load_wikitext103
from keras_allattn.layers.adaptive_embedding import AdaptiveEmbedding
from keras_allattn.layers.adaptive_softmax import AdaptiveSoftmax
from keras_allattn.layers.adaptive_span import AdaptiveSpan
from keras_allattn.layers.feed_forward import FeedForward
from keras_allattn.layers.persistent_memory_attention import (
    PersistentMemoryAttention,
)
from keras_allattn.layers.relative_position import RelativePosition
from keras_allattn.layers.segment_memory import SegmentMemory
from keras_allattn.presets import get_preset
from keras_allattn.training import AdagradClip
from keras_allattn.training import LinearWarmup
from keras_allattn.training import optimizer_from_recipe

TINY = dict(
    vocabulary_size=11, num_layers=2, hidden_dim=16, num_heads=2,
    persistent_memory_size=4, max_span=8, block_size=4, batch_size=2,
    span_ramp=4,
)


@pytest.fixture(scope="module")
def model():
    return AllAttentionLM(**TINY)


@pytest.fixture(scope="module")
def attention():
    """A built `PersistentMemoryAttention`: heads 4, width 32, span 16."""
    layer = PersistentMemoryAttention(
        num_heads=4, max_span=16, persistent_memory_size=2
    )
    layer(
        keras.ops.zeros((2, 5, 32)),
        memory=keras.ops.zeros((2, 16, 32)),
        position_keys=keras.ops.zeros((8, 16)),
    )
    return layer


def zeros(*shape):
    return keras.ops.zeros(shape)


def ids(*values):
    return np.array(values, dtype="int32")


def tiny(**changes):
    return AllAttentionLM(**{**TINY, **changes})


def bad_zip(folder, name):
    path = str(folder / name)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("member", b"abc")
    return path


def recipe(**changes):
    return {**get_preset("char_tiny_cpu")["recipe"], **changes}


def first_layer_memories(model, shape):
    memories = model.initial_memories(2)
    memories[0] = keras.ops.zeros(shape)
    return memories


def run_attention(layer, inputs, memory, position_keys):
    return layer(inputs, memory=memory, position_keys=position_keys)


# (id, call(model, attention, tmp_path), error type, strings the message
# must hold: the argument's name and the value received).
CASES = [
    # === Constructor and from_preset ===
    ("misspelled_constructor_argument",
     lambda m, a, t: tiny(dropuot=0.1),
     TypeError, ["`dropuot` (did you mean `dropout`?)", "dropuot=0.1"]),
    ("misspelled_from_preset_arguments",
     lambda m, a, t: AllAttentionLM.from_preset(
         "char_tiny_cpu", hiden_dim=32, batchsize=4),
     TypeError, ["`hiden_dim` (did you mean `hidden_dim`?)",
                 "`batchsize` (did you mean `batch_size`?)",
                 "hiden_dim=32", "batchsize=4"]),
    ("unknown_from_preset_argument",
     lambda m, a, t: AllAttentionLM.from_preset("char_tiny_cpu", colour=3),
     TypeError, ["`colour`", "colour=3"]),
    ("unknown_preset",
     lambda m, a, t: AllAttentionLM.from_preset("enwik9_huge"),
     ValueError, ["preset='enwik9_huge'"]),
    ("zero_heads",
     lambda m, a, t: tiny(num_heads=0),
     ValueError, ["`num_heads`", "num_heads=0"]),
    ("width_not_divisible_by_heads",
     lambda m, a, t: tiny(hidden_dim=15),
     ValueError, ["`hidden_dim`", "hidden_dim=15"]),
    ("dropout_of_one",
     lambda m, a, t: tiny(dropout=1.0),
     ValueError, ["`dropout`", "dropout=1.0"]),
    ("span_granularity_neither_auto_nor_an_int",
     lambda m, a, t: tiny(span_granularity="fine"),
     ValueError, ["`span_granularity`", "span_granularity='fine'"]),
    ("zero_span_granularity",
     lambda m, a, t: tiny(span_granularity=0),
     ValueError, ["`span_granularity`", "span_granularity=0"]),
    ("unknown_integration",
     lambda m, a, t: tiny(integration="both"),
     ValueError, ["`integration`", "integration='both'"]),
    ("cutoffs_beyond_vocabulary",
     lambda m, a, t: tiny(adaptive_cutoffs=[5, 20]),
     ValueError, ["adaptive_cutoffs", "[5, 20]"]),
    # === call and call_with_memory ===
    ("call_token_out_of_vocabulary",
     lambda m, a, t: m(np.full((2, 4), 11, "int32")),
     ValueError, ["`tokens`", "token id 11", "vocabulary_size=11"]),
    ("call_with_memory_1d_tokens",
     lambda m, a, t: m.call_with_memory(ids(1, 2, 3), m.initial_memories(1)),
     ValueError, ["`tokens`", "tokens.shape=(3,)"]),
    ("call_with_memory_missing_layer",
     lambda m, a, t: m.call_with_memory(
         np.zeros((2, 3), "int32"), m.initial_memories(2)[:1]),
     ValueError, ["`memories`", "num_layers=2", "Received: 1 tensors"]),
    ("call_with_memory_wrong_memory_shape",
     lambda m, a, t: m.call_with_memory(
         np.zeros((2, 3), "int32"), first_layer_memories(m, (2, 7, 16))),
     ValueError, ["`memories[0]`", "(2, 8, 16)", "shape=(2, 7, 16)"]),
    # === generate ===
    ("generate_prompt_out_of_vocabulary",
     lambda m, a, t: m.generate(ids(1, 30), max_length=4),
     ValueError, ["prompt 0", "30", "vocabulary_size=11"]),
    ("generate_max_length_below_prompt",
     lambda m, a, t: m.generate(ids(1, 2, 3), max_length=2),
     ValueError, ["`max_length`", "max_length=2"]),
    ("generate_unknown_sampler",
     lambda m, a, t: m.generate(ids(1, 2), max_length=4, sampler="nucleus"),
     ValueError, ["`sampler`", "sampler='nucleus'"]),
    ("generate_stop_token_out_of_vocabulary",
     lambda m, a, t: m.generate(ids(1, 2), max_length=4, stop_token_ids=[99]),
     ValueError, ["`stop_token_ids`", "stop_token_ids=[99]"]),
    # === evaluate_stream ===
    ("evaluate_first_token_out_of_vocabulary",
     lambda m, a, t: evaluate_stream(m, ids(11, 1, 2, 3, 4), batch_size=2),
     ValueError, ["`tokens`", "tokens[0]=11", "vocabulary_size=11"]),
    ("evaluate_negative_token_inside",
     lambda m, a, t: evaluate_stream(m, ids(1, 2, 3, -1, 4), batch_size=2),
     ValueError, ["`tokens`", "tokens[3]=-1"]),
    ("evaluate_zero_batch",
     lambda m, a, t: evaluate_stream(m, ids(1, 2, 3), batch_size=0),
     ValueError, ["`batch_size`", "batch_size=0"]),
    ("evaluate_2d_tokens",
     lambda m, a, t: evaluate_stream(m, np.zeros((2, 3), "int32")),
     ValueError, ["`tokens`", "shape (2, 3)"]),
    # === StreamBatcher ===
    ("batcher_zero_block",
     lambda m, a, t: StreamBatcher(np.arange(100), 2, 0),
     ValueError, ["`block_size`", "block_size=0"]),
    ("batcher_too_short",
     lambda m, a, t: StreamBatcher(np.arange(10), 2, 4),
     ValueError, ["`tokens` is too short", "tokens of length 10"]),
    ("batcher_float_tokens",
     lambda m, a, t: StreamBatcher(np.linspace(0, 1, 100), 2, 4),
     ValueError, ["`tokens`", "dtype float64"]),
    ("batcher_negative_token",
     lambda m, a, t: StreamBatcher(np.arange(100) - 3, 2, 4),
     ValueError, ["`tokens`", "tokens[0]=-3", "3 ids out of range"]),
    ("batcher_negative_seed",
     lambda m, a, t: StreamBatcher(np.arange(100), 2, 4, seed=-1),
     ValueError, ["`seed`", "seed=-1"]),
    # === Corpus loaders ===
    ("loader_missing_path",
     lambda m, a, t: load_text8(str(t / "nowhere")),
     FileNotFoundError, ["nowhere"]),
    ("loader_malformed_sha256",
     lambda m, a, t: load_enwik8(bad_zip(t, "enwik8.zip"), sha256="abc"),
     ValueError, ["`sha256`", "sha256='abc'"]),
    ("loader_not_the_canonical_archive",
     lambda m, a, t: load_wikitext103(bad_zip(t, "wikitext-103-v1.zip")),
     ValueError, ["wikitext-103-v1.zip is not the expected", "instead of"]),
    ("loader_url_with_a_path",
     lambda m, a, t: load_text8(str(t), url="https://example.org/t.zip"),
     ValueError, ["`url`", "url='https://example.org/t.zip'"]),
    ("loader_sha256_with_a_folder",
     lambda m, a, t: load_text8(str(t), sha256="0" * 64),
     ValueError, ["`sha256`", "sha256='" + "0" * 64 + "'"]),
    ("ptb_url_not_a_folder",
     lambda m, a, t: load_ptb(url="https://example.org/ptb"),
     ValueError, ["`url`", "url='https://example.org/ptb'"]),
    # === Optimizer factory and optimizer ===
    ("recipe_missing_keys",
     lambda m, a, t: optimizer_from_recipe({"optimizer": "adam"}),
     ValueError, ["`recipe`", "'learning_rate'", "recipe={'optimizer': 'adam'}"]),
    ("recipe_unknown_optimizer",
     lambda m, a, t: optimizer_from_recipe(recipe(optimizer="sgd")),
     ValueError, ["`optimizer`", "optimizer='sgd'"]),
    ("recipe_zero_total_steps",
     lambda m, a, t: optimizer_from_recipe(recipe(), total_steps=0),
     ValueError, ["`total_steps`", "total_steps=0"]),
    ("adagrad_negative_clip",
     lambda m, a, t: AdagradClip(0.07, grad_clip=-1),
     ValueError, ["`grad_clip`", "grad_clip=-1"]),
    ("warmup_negative_steps",
     lambda m, a, t: LinearWarmup(0.07, warmup_steps=-5),
     ValueError, ["`warmup_steps`", "warmup_steps=-5"]),
    # === Layers ===
    ("attention_position_keys_transposed",
     lambda m, a, t: run_attention(a, zeros(2, 5, 32), zeros(2, 16, 32),
                                   zeros(16, 8)),
     ValueError, ["`position_keys`", "(8, 16)",
                  "position_keys.shape=(16, 8)"]),
    ("attention_memory_too_short",
     lambda m, a, t: run_attention(a, zeros(2, 5, 32), zeros(2, 8, 32),
                                   zeros(8, 16)),
     ValueError, ["`memory`", "max_span=16", "memory.shape=(2, 8, 32)"]),
    ("attention_memory_other_batch",
     lambda m, a, t: run_attention(a, zeros(2, 5, 32), zeros(3, 16, 32),
                                   zeros(8, 16)),
     ValueError, ["`memory`", "(2, max_span=16 or more, 32)",
                  "memory.shape=(3, 16, 32)"]),
    ("attention_inputs_other_width",
     lambda m, a, t: run_attention(a, zeros(2, 5, 16), zeros(2, 16, 32),
                                   zeros(8, 16)),
     ValueError, ["`inputs`", "(batch, length, 32)", "inputs.shape=(2, 5, 16)"]),
    ("attention_inputs_rank_2",
     lambda m, a, t: PersistentMemoryAttention(num_heads=2, max_span=4)(
         zeros(2, 8), memory=zeros(2, 4, 8), position_keys=zeros(4, 4)),
     ValueError, ["`inputs`", "(batch, length, width)", "inputs.shape=(2, 8)"]),
    ("attention_zero_heads",
     lambda m, a, t: PersistentMemoryAttention(num_heads=0, max_span=4),
     ValueError, ["`num_heads`", "num_heads=0"]),
    ("feed_forward_other_width",
     lambda m, a, t: (lambda f: (f(zeros(2, 3, 16)), f(zeros(2, 3, 8))))(
         FeedForward(32)),
     ValueError, ["`inputs`", "(..., 16)", "inputs.shape=(2, 3, 8)"]),
    ("adaptive_span_other_head_count",
     lambda m, a, t: AdaptiveSpan(num_heads=4, max_span=8)(zeros(2, 3, 5, 8)),
     ValueError, ["`inputs`", "num_heads=4", "inputs.shape=(2, 3, 5, 8)"]),
    ("adaptive_span_longer_than_max_span",
     lambda m, a, t: AdaptiveSpan(num_heads=4, max_span=8)(zeros(2, 4, 5, 9)),
     ValueError, ["`inputs`", "max_span=8", "inputs.shape=(2, 4, 5, 9)"]),
    ("adaptive_softmax_targets_other_shape",
     lambda m, a, t: AdaptiveSoftmax(50, 16, [10, 30])(
         zeros(2, 3, 16), targets=np.zeros((2, 4), "int32")),
     ValueError, ["`targets`", "(2, 3)", "targets.shape=(2, 4)"]),
    ("adaptive_softmax_other_width",
     lambda m, a, t: AdaptiveSoftmax(50, 16, [10, 30])(zeros(2, 3, 8)),
     ValueError, ["`inputs`", "(..., 16)", "inputs.shape=(2, 3, 8)"]),
    ("adaptive_embedding_float_ids",
     lambda m, a, t: AdaptiveEmbedding(50, 16, [10, 30])(zeros(2, 3)),
     ValueError, ["`inputs`", "dtype float32"]),
    ("segment_memory_other_width",
     lambda m, a, t: (lambda s: (s(zeros(2, 3, 8)), s(zeros(2, 3, 4))))(
         SegmentMemory(batch_size=2, memory_length=4)),
     ValueError, ["`inputs`", "(batch_size, length, 8)",
                  "inputs.shape=(2, 3, 4)"]),
    ("relative_position_zero_head_dim",
     lambda m, a, t: RelativePosition(head_dim=0, max_span=4),
     ValueError, ["`head_dim`", "head_dim=0"]),
]


@pytest.mark.parametrize(
    "call, error, expected",
    [pytest.param(c, e, x, id=name) for name, c, e, x in CASES],
)
def test_misuse_raises_a_clear_error(
    call, error, expected, model, attention, tmp_path
):
    with pytest.raises(error) as raised:
        call(model, attention, tmp_path)
    message = str(raised.value)
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"


def test_cases_are_distinct_and_many():
    names = [name for name, *_ in CASES]
    assert len(set(names)) == len(names) >= 30


def test_keras_model_arguments_still_work():
    built = AllAttentionLM.from_preset(
        "char_tiny_cpu", name="lm", trainable=False, dtype="float32",
        hidden_dim=32, batch_size=4,
    )
    assert (built.name, built.trainable, built.hidden_dim, built.batch_size) == (
        "lm", False, 32, 4
    )
    restored = AllAttentionLM.from_config(built.get_config())
    assert restored.name == "lm" and restored.hidden_dim == 32


def test_first_token_out_of_range_is_caught_before_scoring(model):
    """The issue's case: an out-of-range first id gave NaN (JAX) or a wrong
    finite loss (TensorFlow) instead of an error."""
    tokens = np.array([11] + [1, 2, 3] * 5, "int32")
    with pytest.raises(ValueError, match=r"Received: tokens\[0\]=11"):
        evaluate_stream(model, tokens, batch_size=2)
    # In range everywhere, the same split scores a finite loss.
    tokens[0] = 10
    assert np.isfinite(evaluate_stream(model, tokens, batch_size=2)["loss"])


def test_shape_errors_leave_the_layer_usable(attention):
    out = attention(
        zeros(2, 5, 32), memory=zeros(2, 16, 32), position_keys=zeros(8, 16)
    )
    assert tuple(out.shape) == (2, 5, 32)
