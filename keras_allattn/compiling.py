"""Compiling functions that call a model outside `fit`, and keeping them.

Generation (`keras_allattn.models.generation`) and exact evaluation
(`keras_allattn.data.evaluate_stream`) call the model block by block or
token by token; both compile those calls the same way and keep the
compiled functions on the model, keyed by the attended spans that the
compiled code bakes in: `compile_stateless` (TensorFlow, JAX),
`torch_compile` (PyTorch) and `cached`. This module imports neither
keras-hub nor any backend at import time.
"""

import contextlib
import warnings

import keras
from keras import ops

# Compiled functions kept per model and cache, at most this many.
MAX_COMPILED = 16


def compile_stateless(model, fn, state_variables=()):
    """`fn`, which calls `model`, compiled on TensorFlow or JAX.

    TensorFlow: `tf.function(jit_compile=True)` (XLA). JAX: `jax.jit` of a
    stateless version of `fn` whose inputs include the values of
    `state_variables` and of the model's variables; the new values of
    `state_variables` (e.g. a sampler's seed) are written back after each
    call. Other backends raise ValueError: the caller chooses there.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    if backend != "jax":
        raise ValueError(
            "compile_stateless compiles for TensorFlow and JAX. Received: "
            f"the {backend} backend"
        )
    import jax

    state = list(state_variables)
    variables = state + list(model.variables)

    @jax.jit
    def stateless(values, *args):
        with keras.StatelessScope(state_mapping=zip(variables, values)) as scope:
            outputs = fn(*args)
        new_state = [scope.get_current_value(v) for v in state]
        return outputs, [
            old if new is None else new
            for old, new in zip(values[: len(state)], new_state)
        ]

    def run(*args):
        outputs, new_state = stateless([v.value for v in variables], *args)
        for variable, value in zip(state, new_state):
            variable.assign(value)
        return outputs

    return run


def cached(model, cache_name, key, build):
    """The function `key` of `model`'s cache `cache_name`, built once.

    Kept in a private attribute (not tracked by Keras, not saved), at most
    `MAX_COMPILED` per cache. The model's attended spans, when it has them,
    join the key: compiled code bakes the attended lengths in.
    """
    functions = model.__dict__.get(cache_name)
    if functions is None:
        functions = {}
        object.__setattr__(model, cache_name, functions)
    spans = getattr(model, "attended_spans", None)
    key = tuple(key) + (tuple(spans()) if spans else (),)
    if key not in functions:
        if len(functions) >= MAX_COMPILED:
            functions.clear()
        functions[key] = build()
    return functions[key]


def torch_compile(model, fn):
    """`fn(*tensors)`, which calls `model`, compiled with `torch.compile`.

    Per shape (and dtype and device) of the arguments, `fn` is traced once
    into a graph by `torch.fx.experimental.proxy_tensor.make_fx` on fake
    tensors, with the model's weights as graph inputs (read again at every
    call, as `compile_stateless` hands them to `jax.jit`), and that graph
    is compiled by `torch.compile(dynamic=False, fullgraph=True)`. Tracing below Keras'
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
            with _portable_attention(model):
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
            if len(graphs) >= MAX_COMPILED:
                graphs.clear()
            graphs[key] = compiled
            return outputs

    return run


@contextlib.contextmanager
def _portable_attention(model):
    """Sets every attention layer of `model` to the portable path for a while."""
    layers = model.attention_layers
    saved = [layer.implementation for layer in layers]
    try:
        for layer in layers:
            layer.implementation = "portable"
        yield
    finally:
        for layer, implementation in zip(layers, saved):
            layer.implementation = implementation
