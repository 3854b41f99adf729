"""Exact full evaluation of a language model with segment memory."""

import math

import keras
import numpy as np
from keras import ops

from keras_allattn.compiling import inference_function
from keras_allattn.data.stream import as_token_array
from keras_allattn.data.stream import check_token_range
from keras_allattn.utils import check_positive
from keras_allattn.utils import progress_bar


def evaluate_stream(model, tokens, batch_size=8, block_size=None,
                    verbose="auto"):
    """Scores every token of a split exactly once, carrying memory throughout.

    A split of `n` tokens has `n - 1` predictions: token `t + 1` from tokens
    up to `t`. The `n - 1` (input, target) pairs are cut into `batch_size`
    contiguous streams of `S = (n - 1) // batch_size` pairs, as in training;
    row `r` reads inputs `tokens[r*S : (r+1)*S]` and targets one further.
    The rows advance together block by block, memory carried from each
    block to the next (zero at the start of every row), and a last shorter
    block covers the end of the rows. The `(n - 1) % batch_size` pairs left
    after the last row continue that row's stream: they are scored in a
    batch of one that starts from the last row's memory. So no token is
    dropped and none is scored twice (the reference, in contrast, drops the
    last partial block of every row).

    One call per block: for a Keras model a compiled function of the
    model's weights (`jax.jit` on JAX, `tf.function` with XLA on
    TensorFlow; eager under `torch.no_grad()` on PyTorch), compiled once
    per block shape and attended spans; for any other object an eager call
    of `call_with_memory`. The negative log-likelihood is reduced to one
    number per token on the device, and only those come back to the host,
    where they are summed in float64.

    Args:
        model: an object with `call_with_memory(tokens, memories) ->
            (logits, new_memories)`, taking int32 tokens `(batch, length)`
            of any length and a list of memory arrays with the batch on
            axis 0, returning float logits `(batch, length, vocabulary)`;
            and `initial_memories(batch_size)`, the list of zero memories.
        tokens: 1-D array of the split's token ids, at least 2, every one
            in `[0, vocabulary_size)`: all are checked before scoring
            (against `model.vocabulary_size`, or for a model without it
            the width of the logits of its first call), and a bad id
            raises `ValueError` naming its value and position.
        batch_size: number of streams (the reference uses 8).
        block_size: tokens per block; `None` reads `model.block_size`.
        verbose: 0 (silent), 1 or "auto" (a `keras.utils.Progbar` of the
            tokens scored), 2 (one line at the end).

    Returns:
        A dict with `loss` (mean negative log-likelihood in nats),
        `bits_per_token` (`loss / ln 2`, bits per character or byte at
        those levels), `perplexity` (`exp(loss)`) and `tokens` (the number
        of tokens scored, `n - 1`).

    Example:

    >>> result = evaluate_stream(model, corpus.test, batch_size=8)  # doctest: +SKIP
    >>> result["bits_per_token"]  # doctest: +SKIP
    1.01
    """
    batch_size = check_positive("batch_size", batch_size)
    if block_size is None:
        block_size = getattr(model, "block_size", None)
        if block_size is None:
            raise ValueError(
                "`block_size` must be given when the model has no "
                "`block_size` attribute. Received: block_size=None"
            )
    block_size = check_positive("block_size", block_size)
    tokens = as_token_array(tokens)
    if len(tokens) < 2:
        raise ValueError(
            "`tokens` must hold at least 2 tokens to score one. Received: "
            f"tokens of length {len(tokens)}"
        )
    vocabulary = getattr(model, "vocabulary_size", None)
    if vocabulary is not None:
        check_token_range(tokens, vocabulary, "tokens", _vocabulary(vocabulary))
    inputs, targets = tokens[:-1], tokens[1:]
    progress = _progress(len(inputs), verbose)
    stream_length = len(inputs) // batch_size
    covered = batch_size * stream_length

    total, count = 0.0, 0
    memories = model.initial_memories(batch_size)
    if stream_length:
        input_rows = inputs[:covered].reshape(batch_size, stream_length)
        target_rows = targets[:covered].reshape(batch_size, stream_length)
        total, count, memories = _score_streams(
            model, input_rows, target_rows, memories, block_size, tokens,
            progress,
        )
    if covered < len(inputs):
        last_row_memories = [memory[-1:] for memory in memories]
        tail_total, tail_count, _ = _score_streams(
            model,
            inputs[None, covered:],
            targets[None, covered:],
            last_row_memories,
            block_size,
            tokens,
            progress,
        )
        total += tail_total
        count += tail_count
    loss = total / count
    return {
        "loss": loss,
        "bits_per_token": loss / math.log(2.0),
        "perplexity": math.exp(loss),
        "tokens": count,
    }


def _score_streams(model, input_rows, target_rows, memories, block_size, tokens,
                   progress=None):
    """Runs the rows block by block; returns (nll sum, count, memories).

    `tokens` is the whole split, for the messages about bad ids;
    `progress(nll)`, if given, is called with each block's losses.
    """
    total, count = 0.0, 0
    score = _block_scorer(model, tokens)
    for start in range(0, input_rows.shape[1], block_size):
        block_inputs = input_rows[:, start : start + block_size]
        block_targets = target_rows[:, start : start + block_size]
        nll, memories = score(
            ops.convert_to_tensor(block_inputs, "int32"),
            ops.convert_to_tensor(block_targets, "int32"),
            list(memories),
        )
        nll = ops.convert_to_numpy(nll)
        total += float(np.sum(nll, dtype=np.float64))
        count += nll.size
        if progress is not None:
            progress(nll)
    return total, count, memories


def _vocabulary(size):
    return f"vocabulary_size={size}"


def _progress(target, verbose):
    """None, or `report(nll)`: a Progbar of the tokens scored and their
    running mean loss."""
    bar = progress_bar(target, verbose, stateful_metrics=["loss"])
    if bar is None:
        return None
    seen = {"total": 0.0, "count": 0}

    def report(nll):
        seen["total"] += float(np.sum(nll, dtype=np.float64))
        seen["count"] += nll.size
        bar.update(seen["count"], [("loss", seen["total"] / seen["count"])])

    return report


def _block_scorer(model, split):
    """`score(tokens, targets, memories) -> (nll per token, new memories)`.

    Compiled for a Keras model (see `evaluate_stream`), kept per model and
    attended spans (compiled code bakes the attended lengths in). For a
    model without `vocabulary_size`, the whole `split` is checked against
    the width of the first logits.
    """

    def score(tokens, targets, memories):
        logits, memories = model.call_with_memory(tokens, memories)
        return _token_nll(logits, targets), list(memories)

    checked = []

    def eager(tokens, targets, memories):
        logits, memories = model.call_with_memory(tokens, memories)
        if not checked:
            width = logits.shape[-1]
            check_token_range(split, width, "tokens", _vocabulary(width))
            checked.append(width)
        return _token_nll(logits, targets), list(memories)

    if not isinstance(model, keras.Model) or getattr(
        model, "vocabulary_size", None
    ) is None:
        return eager
    return inference_function(model, "_evaluation_functions", score)


def _token_nll(logits, targets):
    """Negative log-likelihood of each target under float32 logits.

    Args:
        logits: `(batch, length, vocabulary)` tensor.
        targets: `(batch, length)` int32 tensor.

    Returns:
        A float32 tensor of shape `(batch, length)`.
    """
    shape = tuple(logits.shape)
    expected = tuple(targets.shape)
    if len(shape) != 3 or shape[:2] != expected:
        raise ValueError(
            "`model.call_with_memory` must return logits of shape "
            f"(batch, length, vocabulary) = {expected + ('V',)}. "
            f"Received: logits with shape {shape}"
        )
    logits = ops.cast(logits, "float32")
    picked = ops.take_along_axis(logits, targets[..., None], axis=-1)
    return ops.logsumexp(logits, axis=-1) - picked[..., 0]
