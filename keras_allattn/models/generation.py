"""Text generation for `AllAttentionLM` with keras-hub samplers.

The prompt is read block by block (`block_size` tokens per call of
`call_with_memory`, the segment memory carried from block to block); then
every new token costs one call of `call_with_memory` on a length-1 input
over the memory, never a re-run over the prefix. The decoding loop is a
keras-hub sampler (`keras_hub.samplers`): it calls
`next(prompt, cache, index) -> (logits, hidden_states, cache)`, where
`cache` holds the segment memories of all layers stacked into one tensor
`(B, num_layers, max_span, d)`. Batch comes first so that the beam sampler
can repeat and reorder beams along it.

Prompts of different lengths in one batch are right-padded: decoding starts
after the shortest prompt and the sampler keeps the remaining prompt tokens
of longer rows (its `mask`), so those rows read their own tokens one step
at a time. The result is exact: no padding token ever enters a memory.

Compilation: TensorFlow runs the prompt reading and the whole decoding
loop under `tf.function(jit_compile=True)` (XLA), JAX under `jax.jit` of a
stateless function that takes the weights and the sampler's seed state as
arguments, as keras-hub's `CausalLM.make_generate_function` does. PyTorch
compiles the model's computation with `torch.compile` (inductor, static
shapes, `dynamic=False`, `fullgraph=True`): the prompt reading of a whole
block and the decoding step, `call_with_memory` on one token per row over
the stacked memories. Each is traced once per input shape into one graph
(`make_fx`, with the weights as inputs, so later weight updates are
seen) that is compiled once: decoding N tokens compiles the step once, not
once per token, and a later call with the same shapes compiles nothing. On
PyTorch the sampler's loop itself stays a Python loop (keras' torch
`while_loop` is one, its condition read on the host at every step): per
token it gathers the previous token (`ops.take` with the index tensor),
calls the compiled step, and samples eagerly. The prompt's last partial
block goes through the compiled step token by token, so that only two
shapes per batch size are ever compiled. `TORCH_COMPILE = False` runs
PyTorch eagerly under `torch.no_grad()` instead.
"""

import warnings

import keras
import numpy as np
from keras import ops

from keras_allattn.compiling import MAX_COMPILED
from keras_allattn.compiling import cached
from keras_allattn.compiling import compile_stateless
from keras_allattn.compiling import portable_attention
from keras_allattn.utils import check_verbose
from keras_allattn.utils import progress_bar

SAMPLERS = ("greedy", "top_k", "top_p", "beam", "random")

# On PyTorch the compiled graphs (one per input shape) kept per function.
_MAX_COMPILED = MAX_COMPILED

# Whether PyTorch compiles generation with `torch.compile` (the default);
# False runs it eagerly under `torch.no_grad()`.
TORCH_COMPILE = True


def generate(
    model, prompt, max_length, sampler="greedy", stop_token_ids=None,
    tokenizer=None, verbose="auto",
):
    """Continues prompts with `model`; see `AllAttentionLM.generate`."""
    check_verbose(verbose)
    rows, text, single = _prompt_rows(prompt, tokenizer)
    if not rows:
        raise ValueError("`prompt` must hold at least one prompt. Received: []")
    for i, row in enumerate(rows):
        if not row.size:
            raise ValueError(
                "Every prompt needs at least one token (the model has no "
                f"start token). Received: an empty prompt at index {i}"
            )
        if row.min() < 0 or row.max() >= model.vocabulary_size:
            raise ValueError(
                "Token ids must lie in [0, vocabulary_size="
                f"{model.vocabulary_size}). Received: ids in "
                f"[{row.min()}, {row.max()}] in prompt {i}"
            )
    lengths = [row.size for row in rows]
    if (
        not isinstance(max_length, (int, np.integer))
        or isinstance(max_length, bool)
        or max_length < max(lengths)
    ):
        raise ValueError(
            "`max_length` must be an integer, the length of the prompts "
            f"plus the new tokens, at least the longest prompt "
            f"({max(lengths)} tokens). Received: max_length={max_length!r}"
        )
    sampler = _resolve_sampler(model, sampler)
    stop_token_ids = _check_stop_token_ids(stop_token_ids, model)

    # The places still to generate hold a token that is no stop token: the
    # keras-hub samplers end a row at any stop token outside the prompt,
    # these places included.
    token_ids = np.full((len(rows), max_length), _filler(stop_token_ids), "int32")
    mask = np.zeros((len(rows), max_length), bool)
    for i, row in enumerate(rows):
        token_ids[i, : row.size] = row
        mask[i, : row.size] = True
    start = min(lengths)
    if start < max_length:
        # One unit per position read: the prompt's, then each new token's.
        progress = progress_bar(max_length - 1, verbose)
        token_ids = _decode(
            model, sampler, stop_token_ids, token_ids, mask, start,
            _advance(progress),
        )
        if progress is not None:
            progress.update(max_length - 1, finalize=True)
    ends = _ends(token_ids, lengths, stop_token_ids)
    for row, end in zip(token_ids, ends):
        if end < max_length:
            row[end + 1 :] = row[end]  # after a stop token, repeat it
    if not text:
        return token_ids[0] if single else token_ids
    kept = [row[:end].tolist() for row, end in zip(token_ids, ends)]
    texts = _as_strings(tokenizer.detokenize(kept))
    return texts[0] if single else texts


def _advance(progress):
    """`advance(n)`: moves `progress` on by `n` positions, short of its end
    (`generate` finalises it once, also when stop tokens end rows early)."""
    if progress is None:
        return lambda n: None
    done = [0]

    def advance(n):
        done[0] = min(done[0] + n, progress.target - 1)
        progress.update(done[0])

    return advance


def _decode(
    model, sampler, stop_token_ids, token_ids, mask, start, advance=None
):
    """Reads `token_ids[:, :start - 1]` in blocks, then samples the rest.

    `advance(n)` (see `_advance`) is told of the positions read: per prompt
    block, and per new token where the decoding loop runs in Python
    (PyTorch); a compiled loop reports when it returns.
    """
    advance = advance or (lambda n: None)
    model.update_span_trimming()
    on_torch = keras.backend.backend() == "torch"
    prefill = _compiled(
        model, ("prefill",),
        lambda: compile_function(model, _prefill_function(model)),
    )
    cache = stack_memories(model.initial_memories(token_ids.shape[0]))
    read = start - 1  # the prompt tokens read before sampling starts
    # On PyTorch, whole blocks only: the rest goes through the step.
    blocks = read - read % model.block_size if on_torch else read
    for begin in range(0, blocks, model.block_size):
        block = token_ids[:, begin : min(begin + model.block_size, blocks)]
        cache = prefill(ops.convert_to_tensor(block), cache)
        advance(block.shape[1])
    if on_torch:
        step = _compiled(
            model, ("step",),
            lambda: compile_function(model, step_function(model)),
        )
        for t in range(blocks, read):
            _, cache = step(ops.convert_to_tensor(token_ids[:, t : t + 1]), cache)
            advance(1)

        def counted_step(token, cache):
            advance(1)
            return step(token, cache)

        decode = _eager(
            _decode_function(model, sampler, stop_token_ids, counted_step)
        )
    else:
        decode = _compiled(
            model, ("decode", sampler, stop_token_ids),
            lambda: compile_function(
                model, _decode_function(model, sampler, stop_token_ids),
                sampler,
            ),
        )
    token_ids = decode(
        ops.convert_to_tensor(token_ids),
        ops.convert_to_tensor(mask),
        cache,
        ops.convert_to_tensor(start, "int32"),
    )
    return np.array(ops.convert_to_numpy(token_ids), "int32")


def stack_memories(memories):
    """The list of per-layer memories `(B, L, d)` as one `(B, layers, L, d)`."""
    return ops.stack(memories, axis=1)


def unstack_memories(cache):
    """Inverse of `stack_memories`: a list of `(B, L, d)` per layer."""
    return [cache[:, i] for i in range(cache.shape[1])]


def step_function(model):
    """`step(token, cache) -> (logits, cache)`: one token per row.

    Runs `token` (B, 1) over the memories `cache` (see `stack_memories`)
    and returns the logits of the next position (B, V) and the memories
    after that token. The fixed shapes make it the function to compile.
    """

    def step(token, cache):
        logits, memories = model.call_with_memory(token, unstack_memories(cache))
        return logits[:, 0], stack_memories(memories)

    return step


def next_function(model, step=None):
    """The decoding step handed to keras-hub samplers.

    `next(prompt, cache, index)` reads the token at `index - 1` of `prompt`
    (B, T) as a length-1 input over the memories `cache` (see
    `stack_memories`) and returns the logits for position `index` (B, V),
    no hidden states, and the memories after that token.

    Args:
        model: the `AllAttentionLM`.
        step: the `step_function(model)` to call, e.g. compiled; by default
            the model is called directly.
    """
    if step is None:
        step = step_function(model)

    def next(prompt, cache, index):
        # A gather with the index tensor, not a slice: no host read of it.
        index = ops.reshape(ops.cast(index, "int32") - 1, (1,))
        logits, cache = step(ops.take(prompt, index, axis=1), cache)  # (B, 1)
        return logits, None, cache

    return next


def _prefill_function(model):
    def prefill(tokens, cache):
        _, memories = model.call_with_memory(tokens, unstack_memories(cache))
        return stack_memories(memories)

    return prefill


def _decode_function(model, sampler, stop_token_ids, step=None):
    next = next_function(model, step)

    def decode(token_ids, mask, cache, index):
        return sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=mask,
            stop_token_ids=stop_token_ids,
            model=model,
        )

    return decode


def _eager(fn):
    """`fn` run under `torch.no_grad()` (PyTorch)."""
    import torch

    def run(*args):
        with torch.no_grad():
            return fn(*args)

    return run


def compile_function(model, fn, sampler=None):
    """Compiles `fn`, which calls `model` (and `sampler`), for the backend.

    TensorFlow: `tf.function(jit_compile=True)`. JAX: `jax.jit` of a
    stateless version whose weights and sampler seed state are arguments
    (the seed state is written back after each call). PyTorch: see
    `torch_compile`; `fn` must then be free of data-dependent Python
    control flow (no sampler loop), and with `TORCH_COMPILE = False` it
    runs eagerly under `torch.no_grad()`.
    """
    if keras.backend.backend() != "torch":
        seeds = sampler.variables if sampler is not None else ()
        return compile_stateless(model, fn, seeds)
    if not TORCH_COMPILE:
        return _eager(fn)
    return torch_compile(model, fn)


def torch_compile(model, fn):
    """`fn(*tensors)`, which calls `model`, compiled with `torch.compile`.

    Per shape (and dtype and device) of the arguments, `fn` is traced once
    into a graph by `torch.fx.experimental.proxy_tensor.make_fx` on fake
    tensors, with the model's weights as graph inputs (read again at every
    call, as `jax.jit` gets them above), and that graph is compiled by
    `torch.compile(dynamic=False, fullgraph=True)`. Tracing below Keras'
    layer machinery gives one graph with no graph breaks (dynamo itself
    breaks the graph inside Keras' `Layer.__call__`). The attention is
    traced through its portable path: fused kernels launch outside the
    trace. Runs under `torch.no_grad()`. Should compiling fail (e.g. no
    C++ compiler for inductor on CPU), it warns and runs eagerly.
    """
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    variables = list(model.variables)

    def stateless(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(*args)

    graphs = {}
    failed = []

    def run(*args):
        args = [ops.convert_to_tensor(a) for a in args]
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        values = [v.value for v in variables]
        with torch.no_grad():
            if failed:
                return fn(*args)
            if key in graphs:
                return graphs[key](values, *args)
            with portable_attention(model):
                graph = make_fx(stateless, tracing_mode="fake")(values, *args)
            compiled = torch.compile(graph, dynamic=False, fullgraph=True)
            try:
                outputs = compiled(values, *args)
            except Exception as error:  # the trace worked: the compiler failed
                warnings.warn(
                    "torch.compile failed, generation runs eagerly: "
                    f"{type(error).__name__}: {str(error)[:500]}",
                    stacklevel=2,
                )
                failed.append(error)
                return fn(*args)
            if len(graphs) >= _MAX_COMPILED:
                graphs.clear()
            graphs[key] = compiled
            return outputs

    return run


def _compiled(model, key, build):
    """The compiled function `key` of `model`, built once per span trimming
    (see `keras_allattn.compiling.cached`)."""
    return cached(model, "_generation_functions", key + (TORCH_COMPILE,), build)


def _keras_hub():
    """`keras_hub`, or an ImportError saying how to install it."""
    try:
        import keras_hub
    except ImportError as error:
        raise ImportError(
            "Generation uses keras-hub's samplers: install them with "
            "`pip install keras-allattn[hub]`."
        ) from error
    return keras_hub


def get_sampler(sampler):
    """A keras-hub sampler from its name (see `SAMPLERS`) or an instance.

    Raises:
        ValueError: for an unknown name, or a sampler that needs more than
            the logits (contrastive: the last hidden states; speculative: a
            draft model; beam with `return_all_beams`).
    """
    keras_hub = _keras_hub()
    if isinstance(sampler, str):
        if sampler not in SAMPLERS:
            raise ValueError(
                f"`sampler` must be one of {SAMPLERS} or a "
                "`keras_hub.samplers.Sampler` instance. "
                f"Received: sampler={sampler!r}"
            )
        return keras_hub.samplers.get(sampler)
    unsupported = (
        keras_hub.samplers.ContrastiveSampler,
        keras_hub.samplers.SpeculativeSampler,
    )
    if isinstance(sampler, unsupported) or not isinstance(
        sampler, keras_hub.samplers.Sampler
    ):
        raise ValueError(
            f"`sampler` must be one of {SAMPLERS} or an instance of their "
            "keras-hub classes (GreedySampler, TopKSampler, TopPSampler, "
            f"BeamSampler, RandomSampler). Received: sampler={sampler!r}"
        )
    if getattr(sampler, "return_all_beams", False):
        raise ValueError(
            "`BeamSampler(return_all_beams=True)` is not supported: generate "
            "returns one sequence per prompt. Received: sampler="
            f"{sampler!r}"
        )
    return sampler


def _resolve_sampler(model, sampler):
    """`get_sampler`, reusing one instance per name and model.

    Reusing it keeps the compiled functions, and random samplers advance
    their seed from call to call instead of restarting.
    """
    if not isinstance(sampler, str):
        return get_sampler(sampler)
    samplers = model.__dict__.get("_generation_samplers")
    if samplers is None:
        samplers = {}
        object.__setattr__(model, "_generation_samplers", samplers)
    if sampler not in samplers:
        samplers[sampler] = get_sampler(sampler)
    return samplers[sampler]


def _check_stop_token_ids(stop_token_ids, model):
    if stop_token_ids is None:
        return None
    ids = np.asarray(stop_token_ids).reshape(-1)
    if (
        not ids.size
        or not np.issubdtype(ids.dtype, np.integer)
        or ids.min() < 0
        or ids.max() >= model.vocabulary_size
    ):
        raise ValueError(
            "`stop_token_ids` must be None or token ids in [0, "
            f"vocabulary_size={model.vocabulary_size}). "
            f"Received: stop_token_ids={stop_token_ids!r}"
        )
    return tuple(int(i) for i in ids)


def _filler(stop_token_ids):
    """The smallest token id that is not a stop token."""
    stops = set(stop_token_ids or ())
    return next(i for i in range(len(stops) + 1) if i not in stops)


def _ends(token_ids, lengths, stop_token_ids):
    """Per row, the position of the first generated stop token, else length."""
    ends = []
    for row, length in zip(token_ids, lengths):
        end = row.size
        if stop_token_ids:
            hits = np.flatnonzero(np.isin(row[length:], stop_token_ids))
            end = length + int(hits[0]) if hits.size else end
        ends.append(end)
    return ends


def _prompt_rows(prompt, tokenizer):
    """Prompts as a list of 1-D int arrays, whether text, and whether single."""
    texts = None
    if isinstance(prompt, str):
        texts, single = [prompt], True
    elif (
        isinstance(prompt, (list, tuple))
        and prompt
        and all(isinstance(p, str) for p in prompt)
    ):
        texts, single = list(prompt), False
    if texts is not None:
        if tokenizer is None:
            raise ValueError(
                "Text prompts need a tokenizer: pass `tokenizer=` (e.g. "
                "`keras_hub.tokenizers.ByteTokenizer(lowercase=False)`) or set "
                "`model.tokenizer`. Received: a text prompt and no tokenizer"
            )
        ids = tokenizer(texts)
        if hasattr(ids, "to_list"):
            ids = ids.to_list()
        return [np.asarray(row, "int64").reshape(-1) for row in ids], True, single
    if hasattr(prompt, "to_list"):
        prompt = prompt.to_list()
    if keras.ops.is_tensor(prompt):
        prompt = keras.ops.convert_to_numpy(prompt)
    try:
        array = np.asarray(prompt)
    except ValueError:
        array = None  # ragged: a list of prompts of different lengths
    if array is None or array.dtype == object:
        rows = [np.asarray(row) for row in prompt]
        single = False
    elif array.ndim in (1, 2):
        single = array.ndim == 1
        rows = [array] if single else list(array)
    else:
        raise ValueError(
            "`prompt` must be token ids of shape (length,) or (batch, length), "
            "a list of token id lists, or text with a tokenizer. Received: "
            f"prompt with shape {array.shape}"
        )
    for row in rows:
        if row.ndim != 1 or (row.size and not np.issubdtype(row.dtype, np.integer)):
            raise ValueError(
                "`prompt` must hold integer token ids (or text, with a "
                f"tokenizer). Received: an array of dtype {row.dtype} and "
                f"shape {row.shape}"
            )
    return [row.astype("int64") for row in rows], False, single


def _as_strings(texts):
    """Detokenizer output (list, NumPy or TensorFlow strings) as `str`s."""
    if not isinstance(texts, (list, tuple)):
        texts = np.asarray(texts).tolist()
    if isinstance(texts, (str, bytes)):
        texts = [texts]
    return [
        t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t
        for t in texts
    ]
