import keras_hub
import numpy as np
import pytest
from keras import ops

from keras_allattn import AllAttentionLM
from keras_allattn.data import Corpus
from keras_allattn.models import generation
from keras_allattn.tokenizers import corpus_tokenizer
from tests import reference
from tests.conftest import backend
from tests.conftest import randomize

V, B, M, L = 23, 2, 4, 10

BASE = dict(
    vocabulary_size=V,
    num_layers=2,
    hidden_dim=16,
    num_heads=4,
    persistent_memory_size=5,
    max_span=L,
    block_size=M,
    batch_size=B,
    adaptive_span=True,
    span_ramp=3,
)


def make_model(rng, **overrides):
    model = AllAttentionLM(**{**BASE, **overrides})
    randomize(model, rng, 0.0, 0.7)
    return model


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def one_pass_logits(model, tokens):
    """Logits of every position, the whole sequence in one call."""
    tokens = np.asarray(tokens, "int32")
    logits, _ = model.call_with_memory(tokens, model.initial_memories(len(tokens)))
    return to_numpy(logits)


def argmax_by_hand(model, prompt, max_length):
    """Greedy decoding that rescores the whole sequence for every token.

    The sequence is zero-padded to `max_length` (one shape, so JAX compiles
    once); causal attention keeps the padding out of earlier positions.
    """
    prompt = np.asarray(prompt, "int32")
    tokens = np.zeros((len(prompt), max_length), "int32")
    tokens[:, : prompt.shape[1]] = prompt
    for t in range(prompt.shape[1], max_length):
        tokens[:, t] = one_pass_logits(model, tokens)[:, t - 1].argmax(-1)
    return tokens


@pytest.mark.parametrize(
    "overrides", [dict(), dict(integration="separate", feedforward_dim=24)],
    ids=["joint", "separate_feedforward"],
)
def test_incremental_logits_equal_one_pass(rng, overrides):
    model = make_model(rng, **overrides)
    tokens = rng.integers(0, V, (B, 2 * L - 3)).astype("int32")
    expected = one_pass_logits(model, tokens)
    # The samplers' `next` (uncompiled), and the compiled length-1 step (on
    # PyTorch through `torch.compile`).
    next = generation.next_function(model)
    compiled_step = generation.compile_function(
        model, generation.step_function(model)
    )
    for compiled in (False, True):
        cache = generation.stack_memories(model.initial_memories(B))
        steps = []
        for t in range(tokens.shape[1]):
            if compiled:
                token = ops.convert_to_tensor(tokens[:, t : t + 1])
                logits, cache = compiled_step(token, cache)
            else:
                index = ops.convert_to_tensor(t + 1, "int32")
                logits, _, cache = next(tokens, cache, index)
            steps.append(to_numpy(logits))
        actual = np.stack(steps, axis=1)
        assert reference.relative_error(actual, expected) < 1e-4, compiled


def test_greedy_generate_equals_argmax_by_hand(rng):
    model = make_model(rng)
    prompt = rng.integers(0, V, (B, 7)).astype("int32")
    expected = argmax_by_hand(model, prompt, 16)
    actual = model.generate(prompt, max_length=16)
    assert actual.dtype == np.int32 and actual.shape == (B, 16)
    np.testing.assert_array_equal(actual, expected)
    # A 1-D prompt gives a 1-D result, the same as its row in a batch.
    np.testing.assert_array_equal(model.generate(prompt[1], 16), expected[1])


def test_prompts_of_different_lengths(rng):
    model = make_model(rng)
    prompts = [rng.integers(0, V, n).tolist() for n in (2, 9, 5)]
    actual = model.generate(prompts, max_length=13)
    for prompt, row in zip(prompts, actual):
        np.testing.assert_array_equal(row, argmax_by_hand(model, [prompt], 13)[0])


@pytest.mark.parametrize("torch_compile", [True, False], ids=["compiled", "eager"])
def test_each_new_token_is_one_length_one_call(rng, monkeypatch, torch_compile):
    if not torch_compile and backend() != "torch":
        pytest.skip("TORCH_COMPILE only switches PyTorch")
    monkeypatch.setattr(generation, "TORCH_COMPILE", torch_compile)
    model = make_model(rng)
    shapes = []
    call_with_memory = AllAttentionLM.call_with_memory

    def spy(self, tokens, memories, **kwargs):
        shapes.append(tuple(tokens.shape))
        return call_with_memory(self, tokens, memories, **kwargs)

    monkeypatch.setattr(AllAttentionLM, "call_with_memory", spy)
    prompt = rng.integers(0, V, (B, 7)).astype("int32")
    model.generate(prompt, max_length=12)
    if backend() != "torch":
        # Traced: the prompt but its last token, in blocks; then
        # length-1 steps only.
        assert shapes[:2] == [(B, M), (B, 2)]
        assert set(shapes[2:]) == {(B, 1)}
    elif torch_compile:
        # Traced once each: a whole block of the prompt, and the step that
        # reads the rest of the prompt and every new token.
        assert shapes == [(B, M), (B, 1)]
    else:
        # Eager: one call per block, per remaining prompt token (6 - M of
        # them) and per new token (12 - 7).
        assert shapes == [(B, M)] + [(B, 1)] * (6 - M + 12 - 7)


def test_torch_decoding_compiles_once(rng, monkeypatch):
    """Decoding N tokens compiles the step once, not once per token."""
    if backend() != "torch":
        pytest.skip("torch.compile")
    from torch._dynamo.utils import counters

    model = make_model(rng)
    prompt = rng.integers(0, V, (B, 7)).astype("int32")

    def graphs_compiled_by(*args):
        before = counters["stats"]["unique_graphs"]
        out = model.generate(*args)
        return counters["stats"]["unique_graphs"] - before, out

    compiled, out = graphs_compiled_by(prompt, 16)
    assert compiled == 2  # a whole prompt block and the step, for 9 tokens
    np.testing.assert_array_equal(out, argmax_by_hand(model, prompt, 16))
    # More tokens and another prompt length: the same two graphs.
    assert graphs_compiled_by(prompt[:, :6], 23)[0] == 0
    # The weights are inputs of the graphs, not constants: new values count.
    embeddings = model.token_embedding.embeddings
    embeddings.assign(rng.normal(0.0, 1.0, embeddings.shape))
    compiled, out = graphs_compiled_by(prompt, 16)
    assert compiled == 0
    np.testing.assert_array_equal(out, argmax_by_hand(model, prompt, 16))
    # With the switch off, nothing is compiled.
    monkeypatch.setattr(generation, "TORCH_COMPILE", False)
    compiled, eager = graphs_compiled_by(prompt, 16)
    assert compiled == 0
    np.testing.assert_array_equal(eager, out)


@pytest.mark.parametrize("name", generation.SAMPLERS)
def test_every_sampler_name(rng, name):
    model = make_model(rng)
    prompt = rng.integers(0, V, (B, 5)).astype("int32")
    out = model.generate(prompt, max_length=11, sampler=name)
    assert out.shape == (B, 11)
    np.testing.assert_array_equal(out[:, :5], prompt)
    assert out.min() >= 0 and out.max() < V


def test_sampler_instances(rng):
    model = make_model(rng)
    prompt = rng.integers(0, V, (B, 5)).astype("int32")
    greedy = model.generate(prompt, 10)
    for sampler in (
        keras_hub.samplers.GreedySampler(),
        keras_hub.samplers.TopKSampler(k=1, seed=3),
        keras_hub.samplers.BeamSampler(num_beams=1),
    ):
        np.testing.assert_array_equal(model.generate(prompt, 10, sampler), greedy)
    sampled = model.generate(prompt, 10, keras_hub.samplers.RandomSampler(seed=1))
    assert sampled.shape == (B, 10)


def test_unknown_sampler_raises(rng):
    model = make_model(rng)
    message = r"`sampler` must be one of .*Received: sampler='nucleus'"
    with pytest.raises(ValueError, match=message):
        model.generate([1, 2], 5, sampler="nucleus")
    for bad in (keras_hub.samplers.ContrastiveSampler(), 3,
                keras_hub.samplers.BeamSampler(return_all_beams=True)):
        with pytest.raises(ValueError, match="sampler"):
            model.generate([1, 2], 5, sampler=bad)


def test_stop_token_ids(rng):
    model = make_model(rng)
    prompt = rng.integers(0, V, (B, 4)).astype("int32")
    greedy = model.generate(prompt, 12)
    stop = int(greedy[0, 6])
    out = model.generate(prompt, 12, stop_token_ids=[stop])
    first = 4 + int(np.flatnonzero(greedy[0, 4:] == stop)[0])
    np.testing.assert_array_equal(out[0, : first + 1], greedy[0, : first + 1])
    assert (out[0, first:] == stop).all()
    # Token 0 as the stop token: the places still to generate must not
    # read as stops (they once held zeros, which ended decoding at once).
    out = model.generate(prompt, 12, stop_token_ids=[0])
    for row, want in zip(out, greedy):
        hits = np.flatnonzero(want[4:] == 0)
        end = 4 + int(hits[0]) + 1 if hits.size else 12
        np.testing.assert_array_equal(row[:end], want[:end])


def test_generate_leaves_the_memory_variables_alone(rng):
    model = make_model(rng)
    model(rng.integers(0, V, (B, M)).astype("int32"))
    before = [to_numpy(m.memory) for m in model.segment_memories]
    model.generate(rng.integers(0, V, (B, 6)).astype("int32"), 10)
    for memory, layer in zip(before, model.segment_memories):
        np.testing.assert_array_equal(to_numpy(layer.memory), memory)


def test_text_prompts_with_byte_tokenizer(rng):
    model = make_model(rng, vocabulary_size=256)
    tokenizer = keras_hub.tokenizers.ByteTokenizer(lowercase=False)
    text = model.generate("Hi", max_length=8, tokenizer=tokenizer)
    ids = model.generate(np.array([72, 105]), max_length=8)
    assert isinstance(text, str) and text.startswith("Hi")
    assert text == tokenizer.detokenize(ids)
    texts = model.generate(["Hi", "Hello"], 8, tokenizer=tokenizer)
    assert texts[0] == text and texts[1].startswith("Hello")
    model.tokenizer = tokenizer  # the attribute is the default tokenizer
    assert model.generate("Hi", 8) == text


def test_corpus_tokenizers(rng):
    text8 = Corpus("text8", "character", *[np.zeros(1, "int32")] * 3,
                   vocabulary=list(" abcdefghijklmnopqrstuvwxyz"))
    tokenizer = corpus_tokenizer(text8)
    assert isinstance(tokenizer, keras_hub.tokenizers.WordPieceTokenizer)
    assert tokenizer("Hi, yo").tolist() == [8, 9, 0, 0, 25, 15]
    assert tokenizer.detokenize([[8, 9, 0, 1]]) == ["hi a"]
    model = make_model(rng, vocabulary_size=27)
    out = model.generate(["a cat", "the"], 12, tokenizer=tokenizer)
    assert out[0].startswith("a cat") and len(out[0]) == 12

    ptb = Corpus("ptb", "word", *[np.zeros(1, "int32")] * 3,
                 vocabulary=["the", "<unk>", "<eos>", "n't", "'s", "$"] + [
                     f"w{i}" for i in range(21)])
    tokenizer = corpus_tokenizer(ptb)
    assert tokenizer("the dog 's n't <eos>").tolist() == [0, 1, 4, 3, 2]
    out = model.generate("the dog 's", 6, tokenizer=tokenizer, sampler="top_p")
    assert out.startswith("the <unk> 's") and len(out.split()) == 6

    bytes_corpus = Corpus("enwik8", "byte", *[np.zeros(1, "int32")] * 3,
                          vocabulary=[bytes([i]) for i in range(256)])
    tokenizer = corpus_tokenizer(bytes_corpus)
    assert isinstance(tokenizer, keras_hub.tokenizers.ByteTokenizer)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(prompt="hello"), ValueError, "Text prompts need a tokenizer"),
        (dict(prompt=np.ones((2, 3), "float32")), ValueError, "integer token ids"),
        (dict(prompt=np.ones((1, 2, 3), "int32")), ValueError, "shape"),
        (dict(prompt=[[1, 2], []]), ValueError, "at least one token"),
        (dict(prompt=[1, V]), ValueError,
         r"Token ids must lie in \[0, vocabulary_size=23\)"),
        (dict(prompt=[1, 2, 3], max_length=2), ValueError, "`max_length` must be"),
        (dict(stop_token_ids=[-1]), ValueError, "`stop_token_ids` must be"),
    ],
)
def test_bad_generate_arguments(rng, kwargs, error, message):
    model = make_model(rng)
    arguments = {"prompt": [1, 2], "max_length": 5, **kwargs}
    with pytest.raises(error, match=message):
        model.generate(**arguments)
