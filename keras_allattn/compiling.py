"""Compiling functions that call a model, and keeping them.

Generation (`keras_allattn.models.generation`) and exact evaluation
(`keras_allattn.data.evaluate_stream`) call the model block by block or
token by token; both compile those calls the same way and keep the
compiled functions on the model, keyed by the attended spans that the
compiled code bakes in: `compile_stateless` (TensorFlow, JAX),
`torch_compile` (PyTorch) and `cached`. `torch_train_step` compiles the
training step of `fit` on PyTorch, `torch_eval_step` those of `evaluate`
and `predict`. This module imports neither keras-hub
nor any backend at import time.
"""

import os
import warnings

import keras
import numpy as np
from keras import ops

from keras_allattn.ops.kernel_settings import env_flag
from keras_allattn.ops.kernel_settings import is_deterministic

# Compiled functions kept per model and cache, at most this many.
MAX_COMPILED = 16

# The `torch.compile` backend of the PyTorch training step (`torch_train_step`):
# inductor, or the value of this environment variable (e.g. "aot_eager" or
# "eager" to check a traced step without inductor's code generation).
TORCH_BACKEND_ENV = "KERAS_ALLATTN_TORCH_COMPILE_BACKEND"
TORCH_TRAIN_BACKEND = os.environ.get(TORCH_BACKEND_ENV) or "inductor"

# Inductor's options for the training step. Its peak-memory reordering moved
# the recomputation of every remat'd layer ahead of the first layer's
# backward (seen on the CPU, torch 2.13), so every layer's recomputed keys
# and values would live at once; without it each layer is recomputed just
# before its backward, in the order the trace wrote. (On an H200, torch
# 2.11, the compiled text8_large step ran out of memory with this option
# too: see `_unmeasured_memory_reason`.)
TORCH_TRAIN_OPTIONS = {"reorder_for_peak_memory": False}

# CUDA graphs for the compiled training step on CUDA (inductor's
# "triton.cudagraphs", what `mode="reduce-overhead"` sets): the whole step
# replays as one graph launch instead of a few thousand kernel launches
# from the host. On unless this environment variable says 0/false/no/off.
CUDA_GRAPHS_ENV = "KERAS_ALLATTN_TORCH_CUDA_GRAPHS"


def cuda_graphs_enabled():
    """Whether the compiled PyTorch training step on CUDA replays as a CUDA
    graph: `KERAS_ALLATTN_TORCH_CUDA_GRAPHS` (1/true/yes/on or
    0/false/no/off, default on). Read when a step is compiled."""
    return env_flag(CUDA_GRAPHS_ENV, True)


def _train_options(values):
    """Inductor's options for a training step whose graph inputs are
    `values` (every tensor, batch included): `TORCH_TRAIN_OPTIONS`, with
    CUDA graphs where the tensors are on CUDA, inductor compiles and
    `cuda_graphs_enabled()`. A CUDA graph replays fixed addresses, so the
    variables' values (whose storage the step updates in place) are marked
    as static inputs: without that, the graph would copy every weight and
    optimizer slot into its own buffers at every step, and inductor skips
    CUDA graphs for a graph that mutates inputs that are not static."""
    on_cuda = bool(values) and all(t.is_cuda for t in values)
    if not (on_cuda and TORCH_TRAIN_BACKEND == "inductor"
            and cuda_graphs_enabled()):
        return TORCH_TRAIN_OPTIONS
    return {**TORCH_TRAIN_OPTIONS, "triton.cudagraphs": True}


def _failure(error):
    """`Type: message` of why a compiled call failed: the first exception of
    its chain (dynamo can fail again while handling an error of the compiled
    code, e.g. "Attempt to trace generator" over an out-of-memory error,
    which would hide the cause)."""
    seen = {id(error)}
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
        if id(error) in seen:
            break
        seen.add(id(error))
    return f"{type(error).__name__}: {error}"


def _fall_back(failed, message, error):
    """Records in `failed` why a compiled call failed and warns that
    `message` (it runs eagerly). The message only, the first error of its
    chain (`_failure`): the exception would keep its traceback's frames,
    and the failed call's tensors, alive."""
    failed.append(_failure(error))
    warnings.warn(f"{message}: {failed[-1][:500]}", stacklevel=3)


def _compile_traced(graph, options=None):
    """`torch.compile` of a traced step on `TORCH_TRAIN_BACKEND`, with
    inductor's `options` where that backend is inductor."""
    import torch

    return torch.compile(
        graph, backend=TORCH_TRAIN_BACKEND, dynamic=False, fullgraph=True,
        options=options if TORCH_TRAIN_BACKEND == "inductor" else None,
    )


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


def inference_function(model, cache_name, fn):
    """`fn`, which calls `model` without training, ready to run repeatedly.

    TensorFlow and JAX: compiled by `compile_stateless` and kept on the
    model under `cache_name` (rebuilt when the attended spans change the
    model's caches). PyTorch: run eagerly under `torch.no_grad()`.
    """
    if keras.backend.backend() == "torch":
        import torch

        def no_grad(*args):
            with torch.no_grad():
                return fn(*args)

        return no_grad
    return cached(
        model, cache_name, (), lambda: compile_stateless(model, fn)
    )


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
    breaks the graph inside Keras' `Layer.__call__`). The attention runs
    as eagerly: the fused Triton kernels where they apply (they are
    PyTorch custom operators, graph nodes of their own), else the portable
    path. Runs under `torch.no_grad()`. Should compiling fail
    (e.g. no C++ compiler for inductor on CPU), it warns and runs eagerly.
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
            graph = make_fx(stateless, tracing_mode="fake")(values, *args)
            compiled = torch.compile(graph, dynamic=False, fullgraph=True)
            try:
                outputs = compiled(values, *args)
            except Exception as error:  # the trace worked: the compiler failed
                _fall_back(
                    failed, "torch.compile failed, generation runs eagerly", error
                )
                return fn(*args)
            if len(graphs) >= MAX_COMPILED:
                graphs.clear()
            graphs[key] = compiled
            return outputs

    return run


def torch_train_step(model):
    """`model`'s training step on PyTorch as one compiled graph.

    What `AllAttentionLM.compile(jit_compile=True)` makes the
    `train_function` of `fit` and `train_on_batch` on PyTorch: Keras's
    `train_step` (forward pass, loss, gradients, optimizer update, metrics)
    written statelessly, traced by `torch.fx.experimental.proxy_tensor.make_fx`
    on fake tensors into one graph whose inputs are the batch and the values
    of every variable (weights, segment memory, seed generators, optimizer
    and metric state), which it updates in place as the eager step does,
    and compiled by `torch.compile(dynamic=False, fullgraph=True)`. So the
    segment memory and the dropout seeds move on from step to step exactly
    as in eager training.

    Why not Keras's own `torch.compile` of the step: dynamo traces Keras's
    layer machinery, breaks the graph inside every `Layer.__call__`, and
    recompiles its shared functions (`_setattr_hook`, `forward`, the
    functional `call`) for every layer class and argument signature, and
    the portable attention at every step (a guard on a global name
    counter), until it hits its recompile limit. Tracing below the layer
    machinery gives one graph and no guards at all.

    A graph is compiled per shape and dtype of the batch, per attended
    span of the layers (`compiling.cached`: a span change, rare and
    bounded by the model's `span_granularity`, at most 8 lengths per
    doubling with "auto" and `max_span / s` with an int `s`, compiles once
    more) and per deterministic mode of the fused kernels
    (`set_deterministic`, read when tracing). The attention is the one
    eager training runs: the fused Triton kernels where they apply (CUDA
    tensors; they are PyTorch custom operators, so the graph holds their
    forward and backward as nodes), else the portable path. Where the
    step cannot be traced (Keras's seeded `Dropout`, i.e.
    `embedding_dropout` or the feed-forward sublayer's dropout, seeds a
    `torch.Generator` on the host at every call), on CUDA
    with whole-layer recomputation (`remat="layer"`: compiled, it needed
    more memory than the plan counts, see `_unmeasured_memory_reason`),
    or should tracing, compiling or the compiled call fail (the warning
    names the first error of its chain), a warning says why and the step
    runs eagerly.

    Returns:
        A function `train_function(data)` for Keras's PyTorch training loop.
    """
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    failed = []
    reason = untraceable_reason(model) or _unmeasured_memory_reason(model)
    if reason:
        warnings.warn(
            f"The PyTorch training step runs eagerly, not compiled: {reason}.",
            stacklevel=3,
        )
        failed.append(reason)

    def build():
        trainable = list(model.trainable_variables)
        others = list(model.non_trainable_variables) + list(
            model.metrics_variables
        )
        optimizer = model.optimizer
        optimizer_variables = list(optimizer.variables)
        loss_tracker = next(m for m in model.metrics if m.name == "loss")

        def step(trainable_values, other_values, optimizer_values, batch):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
            leaves = [value.detach().requires_grad_() for value in trainable_values]
            mapping = list(zip(trainable, leaves)) + list(zip(others, other_values))
            with keras.StatelessScope(
                state_mapping=mapping, collect_losses=True
            ) as scope:
                y_pred = model(x, training=True)
                loss = model.compute_loss(
                    x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                    training=True,
                )
                loss_tracker.update_state(
                    loss, sample_weight=keras.tree.flatten(x)[0].shape[0]
                )
                model.compute_metrics(x, y, y_pred, sample_weight)
                scaled = optimizer.scale_loss(loss)
                new_others = [scope.get_current_value(v) for v in others]
                # Inside the scope: with remat, the backward runs the
                # layers' forward again, which must read the traced values
                # (outside, it would read the variables themselves).
                gradients = torch.autograd.grad(
                    scaled, leaves, allow_unused=True
                )
            with torch.no_grad():
                new_trainable, new_optimizer = optimizer.stateless_apply(
                    optimizer_values, list(gradients), leaves
                )
                # The new values go into the variables' own storage (the
                # graph's inputs), as `Variable.assign` does eagerly.
                for olds, news in (
                    (trainable_values, new_trainable),
                    (other_values, new_others),
                    (optimizer_values, new_optimizer),
                ):
                    for old, new in zip(olds, news):
                        if new is not None and new is not old:
                            old.copy_(new)

        graph, held = [], []

        def run(batch):
            if not held:
                # Read once: a Keras PyTorch variable keeps its tensor for
                # life (`assign` copies into it) and the step updates them
                # in place. Reading every value at every step took about a
                # millisecond of host time a step (about 400 variables),
                # time in which the device waited for the next step.
                held.append((
                    [v.value.detach() for v in trainable],
                    [v.value for v in others],
                    [v.value for v in optimizer_variables],
                ))
            values = held[0]
            if not graph:
                with torch.enable_grad():
                    traced = make_fx(step, tracing_mode="fake")(*values, batch)
                variables = [t for group in values for t in group]
                tensors = variables + [
                    t for t in keras.tree.flatten(batch) if t is not None
                ]
                options = _train_options(tensors)
                if options.get("triton.cudagraphs"):
                    for t in variables:
                        torch._dynamo.mark_static_address(t, guard=False)
                graph.append((_compile_traced(traced, options), options))
            compiled, options = graph[0]
            if options.get("triton.cudagraphs"):
                # A new step: the previous replay's buffers may be reused.
                torch.compiler.cudagraph_mark_step_begin()
            compiled(*values, batch)

        return run

    tracked = []

    def train_function(data):
        if not tracked:
            tracked.extend(model.variables)
        batch = _batch_tensors(
            data, tracked[0].value.device if tracked else None
        )
        if not failed:
            # What `build` captures: a new compile (optimizer, metrics) or
            # a change of trainable flags needs a graph of its own. The
            # flags are read from the model's variables listed once
            # (`Layer.trainable` sets its variables' flags): walking the
            # layers for `trainable_variables` at every step took host
            # time while the device waited.
            key = _step_key(
                model, batch, "train", id(model.optimizer),
                tuple(v.trainable for v in tracked),
            )
            run = cached(model, "_torch_train_steps", key, build)
            try:
                run(batch)
                return model.get_metrics_result()
            except Exception as error:
                model.__dict__.pop("_torch_train_steps", None)
                _fall_back(
                    failed,
                    "The PyTorch training step could not be compiled; it "
                    "runs eagerly",
                    error,
                )
        return model.train_step(batch)

    return train_function


def torch_eval_step(model, kind):
    """`model`'s evaluation (`kind="test"`) or prediction (`"predict"`) step
    on PyTorch as one compiled graph.

    What `AllAttentionLM.compile(jit_compile=True)` makes the
    `test_function` of `evaluate` and the `predict_function` of `predict`
    on PyTorch, as `torch_train_step` does for `fit`: Keras's `test_step`
    (forward pass, loss, metrics) or `predict_step` (forward pass) written
    statelessly under `torch.no_grad()`, traced by `make_fx` on fake tensors
    into one graph whose inputs are the batch and the values of every
    variable, which it updates in place as the eager step does (the segment
    memory moves on from batch to batch; `evaluate` and `predict` keep the
    training memory aside around the call), and compiled by
    `torch.compile(dynamic=False, fullgraph=True)`. Keras's own
    `torch.compile` of these steps recompiles its layer machinery for every
    layer class until it hits its recompile limit (two minutes for a
    two-layer model on a CPU before the first batch). A graph is kept per
    shape and dtype of the batch and per attended span; should tracing or
    compiling fail, a warning says why and the step runs eagerly.

    Returns:
        A function `fn(data)` for Keras's PyTorch evaluation or prediction
        loop.
    """
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    if kind not in ("test", "predict"):
        raise ValueError(f"`kind` must be 'test' or 'predict'. Received: kind={kind!r}")
    failed = []

    def build():
        weights = list(model.trainable_variables)
        others = list(model.non_trainable_variables) + list(
            model.metrics_variables
        )
        loss_tracker = next(
            (m for m in model.metrics if m.name == "loss"), None
        )

        def step(weight_values, other_values, batch):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
            mapping = list(zip(weights, weight_values)) + list(
                zip(others, other_values)
            )
            with keras.StatelessScope(
                state_mapping=mapping, collect_losses=kind == "test"
            ) as scope:
                y_pred = model(x, training=False)
                if kind == "test":
                    loss = model.compute_loss(
                        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                        training=False,
                    )
                    if loss_tracker is not None:
                        loss_tracker.update_state(
                            loss, sample_weight=keras.tree.flatten(x)[0].shape[0]
                        )
                    model.compute_metrics(x, y, y_pred, sample_weight)
            for old, variable in zip(other_values, others):
                new = scope.get_current_value(variable)
                if new is not None and new is not old:
                    old.copy_(new)
            return y_pred if kind == "predict" else None

        graph = []

        def run(batch):
            values = (
                [v.value.detach() for v in weights],
                [v.value for v in others],
            )
            with torch.no_grad():
                if not graph:
                    traced = make_fx(step, tracing_mode="fake")(*values, batch)
                    graph.append(_compile_traced(traced))
                return graph[0](*values, batch)

        return run

    def eager(batch):
        with torch.no_grad():
            if kind == "test":
                return model.test_step(batch)
            return model.predict_step(batch)

    def function(data):
        batch = _batch_tensors(data)
        if kind == "predict":
            # Keras's predict_step reads `x` out of the batch as it comes.
            batch = batch[:1]
        if not failed:
            key = _step_key(model, batch, kind)
            run = cached(model, f"_torch_{kind}_steps", key, build)
            try:
                outputs = run(batch)
                return outputs if kind == "predict" else model.get_metrics_result()
            except Exception as error:
                model.__dict__.pop(f"_torch_{kind}_steps", None)
                _fall_back(
                    failed,
                    f"The PyTorch {kind} step could not be compiled; it runs "
                    "eagerly",
                    error,
                )
        return eager(batch)

    return function


def _batch_tensors(data, device=None):
    """The batch of a Keras PyTorch loop's `data` (a list of one batch) as
    a tuple of tensors (None kept). With a CUDA `device`, CPU tensors go
    there without blocking the host (`non_blocking`): from pinned memory
    (`pinned_batches`) the copy is queued behind the step in flight and
    the host goes on to launch the next step."""
    import torch

    (batch,) = data

    def move(t):
        if t is None:
            return None
        if (
            device is not None and device.type == "cuda"
            and isinstance(t, torch.Tensor) and t.device.type == "cpu"
        ):
            return t.to(device, non_blocking=True)
        return keras.ops.convert_to_tensor(t)

    return keras.tree.map_structure(
        move, tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)
    )


def pinned_batches(arrays, batch_size, pin_memory=True):
    """A PyTorch `DataLoader` of the rows of NumPy `arrays`, `batch_size`
    at a time, in order, in pinned host memory.

    What `AllAttentionLM.fit` trains from on CUDA where it is given
    arrays: Keras's own loader converts each batch to a CUDA tensor with
    a blocking copy from pageable memory, which waits for the step in
    flight, so the host prepared every step while the device waited (3.5
    to 7 ms a step of idle GPU on an H200 at enwik8_small, RESULTS.md).
    From pinned memory the compiled step's copy (`_batch_tensors`) does
    not block.

    Args:
        arrays: a tuple of NumPy arrays with the same number of rows.
        batch_size: int, rows a batch (the last batch may be shorter).
        pin_memory: whether to pin the batches (False on a CPU).

    Returns:
        A `torch.utils.data.DataLoader` yielding a list of tensors a
        batch, one per array.
    """
    import torch

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(arrays[0])

        def __getitems__(self, indices):
            # The loader's batches are consecutive rows (no shuffling):
            # one slice an array, not a row at a time.
            start, stop = indices[0], indices[-1] + 1
            if list(indices) != list(range(start, stop)):
                raise ValueError(
                    f"Expected consecutive rows. Received: {indices[:8]}"
                )
            return [torch.from_numpy(np.ascontiguousarray(a[start:stop]))
                    for a in arrays]

    return torch.utils.data.DataLoader(
        Rows(), batch_size=batch_size, shuffle=False, drop_last=False,
        collate_fn=lambda batch: batch, pin_memory=pin_memory,
    )


def pinned_stream(dataset, pin_memory=True):
    """A PyTorch `DataLoader` of the batches of an endless
    `keras_allattn.data.StreamDataset`, item 0, 1, 2, ... in order, in
    pinned host memory: `pinned_batches` for the streams (what
    `AllAttentionLM.fit` trains from on CUDA where it is given one).

    Args:
        dataset: the `StreamDataset`.
        pin_memory: whether to pin the batches (False on a CPU).

    Returns:
        A `torch.utils.data.DataLoader` yielding a list of tensors a
        batch (inputs, targets), endlessly.
    """
    import itertools

    import torch

    class Items(torch.utils.data.IterableDataset):
        def __iter__(self):
            for index in itertools.count():
                yield [torch.from_numpy(np.ascontiguousarray(a))
                       for a in dataset[index]]

    return torch.utils.data.DataLoader(
        Items(), batch_size=None, pin_memory=pin_memory
    )


def _step_key(model, batch, *extra):
    """The key of a traced step's graph: `extra`, the model's metrics, the
    shape, dtype and device of every batch tensor and the kernels'
    deterministic mode (read when tracing)."""
    return (
        tuple(extra)
        + tuple(id(m) for m in model.metrics)
        + tuple(
            (tuple(t.shape), str(t.dtype), str(t.device))
            for t in keras.tree.flatten(batch)
        )
        + (is_deterministic(),)
    )


def _unmeasured_memory_reason(model):
    """Why the compiled step should not run on this device for its memory,
    or None: on CUDA, whole-layer recomputation (`remat="layer"`, what
    `remat="auto"` picks for the large presets). The compiled text8_large
    step at full span ran out of 80 GiB on an H200 (torch 2.11), where the
    eager step peaks at 48 GiB and the memory plan counts 49; so it runs
    eagerly until a compiled step is measured to fit the plan."""
    import torch

    layers = getattr(model, "attention_layers", ())
    if not torch.cuda.is_available() or not any(
        layer.remat == "layer" for layer in layers
    ):
        return None
    return (
        "remat='layer' on a CUDA device: the compiled step with whole-layer "
        "recomputation needs more memory than the plan counts (text8_large "
        "at full span ran out of 80 GiB on an H200, where the eager step "
        "uses 48)"
    )


def untraceable_reason(model):
    """Why `torch_train_step` cannot trace `model`'s step, or None.

    Keras's `Dropout` with a seed draws its mask on PyTorch from a
    `torch.Generator` seeded on the host from the seed generator's state,
    which a graph traced on fake tensors cannot do (a seed frozen at
    tracing would repeat one mask at every step). The attention dropout
    (a counter-based hash of the seed) traces.
    """
    rates = {"embedding_dropout": model.embedding_dropout}
    if model.feedforward_dim is not None:
        rates["dropout"] = model.dropout
    active = [f"{name}={rate}" for name, rate in rates.items() if rate > 0]
    if not active:
        return None
    return (
        f"Keras's seeded Dropout on PyTorch ({', '.join(active)}) seeds a "
        "torch.Generator on the host at every call, which a traced graph "
        "cannot do; set it to 0 to compile the step"
    )
