"""JAX: data parallelism through `keras.distribution` (GSPMD).

`data_parallel_distribution` builds a `ModelParallel` over a ("batch",
"model") mesh whose `LayoutMap` shards the memory variables on "batch"
(and, with `model_parallel > 1`, the attention projections, persistent
vectors and feed-forward weights on "model"); the model keeps the global
`batch_size` and `fit` runs as is. Set it before the model is built.
Several hosts: `keras.distribution.initialize()` (the
`KERAS_DISTRIBUTION_*` variables), then each process feeds its own rows.
"""

import os

import keras
import numpy as np

from keras_allattn.distribution.common import BATCH_AXIS
from keras_allattn.distribution.common import MODEL_AXIS
from keras_allattn.distribution.common import model_geometry
from keras_allattn.distribution.common import row_range
from keras_allattn.utils import check_positive
from keras_allattn.utils import sync_jax_state


def memory_variable_paths(model_or_config):
    """The full variable paths of the segment memories, one per layer.

    These are the keys a `keras.distribution.LayoutMap` must match exactly
    (it uses `re.fullmatch`): a key that misses leaves the variable
    silently replicated.

    Args:
        model_or_config: an `AllAttentionLM` (its actual paths) or its
            constructor arguments (the paths a model built from them at
            top level gets, `memory_{i}/memory`).

    Returns:
        A list of `num_layers` strings.
    """
    if isinstance(model_or_config, keras.Model):
        return [layer.memory.path for layer in model_or_config.segment_memories]
    num_layers = model_geometry(model_or_config)["num_layers"]
    return [f"memory_{i}/memory" for i in range(num_layers)]


def memory_layout_map(model_or_config, device_mesh, shard_model=False):
    """A `keras.distribution.LayoutMap` for `AllAttentionLM` (JAX).

    The memory of every layer, `(batch_size, max_span, hidden_dim)`, is
    sharded on the mesh's "batch" axis. With `shard_model`, the weights
    that grow with the width are split over the "model" axis by heads
    (Megatron style: query, key and value kernels by output columns, the
    output kernel by input rows, persistent keys and values by heads) and
    the feed-forward sublayer likewise; all other variables are replicated.

    Args:
        model_or_config: an `AllAttentionLM` or its constructor arguments.
        device_mesh: a `keras.distribution.DeviceMesh` with axes
            ("batch", "model").
        shard_model: bool, also shard the weights on "model".

    Returns:
        A `keras.distribution.LayoutMap` keyed by full variable paths.
    """
    geometry = model_geometry(model_or_config)
    layout_map = keras.distribution.LayoutMap(device_mesh)
    for path in memory_variable_paths(model_or_config):
        layout_map[path] = (BATCH_AXIS, None, None)
    if not shard_model:
        return layout_map
    for i in range(geometry["num_layers"]):
        for name in ("query", "key", "value"):
            layout_map[f"attention_{i}/{name}/kernel"] = (None, MODEL_AXIS)
        layout_map[f"attention_{i}/output/kernel"] = (MODEL_AXIS, None)
        for name in ("persistent_keys", "persistent_values"):
            layout_map[f"attention_{i}/{name}"] = (MODEL_AXIS, None, None)
        if geometry["feedforward_dim"]:
            layout_map[f"feedforward_{i}/inner/kernel"] = (None, MODEL_AXIS)
            layout_map[f"feedforward_{i}/inner/bias"] = (MODEL_AXIS,)
            layout_map[f"feedforward_{i}/outer/kernel"] = (MODEL_AXIS, None)
    return layout_map


def data_parallel_distribution(model_or_config, devices=None, model_parallel=1):
    """The `keras.distribution` set-up for data-parallel training on JAX.

    A `ModelParallel` distribution over a `(len(devices) // model_parallel,
    model_parallel)` mesh with axes ("batch", "model"): every batch is
    split along its rows over "batch", and so is the segment memory of
    every layer (`memory_layout_map`), so each device keeps the memory of
    its own rows. The model keeps the global `batch_size`.

    Set it before the model is built (variables take their layout when
    they are created) and keep it set while training:

        keras.distribution.set_distribution(data_parallel_distribution(config))
        model = AllAttentionLM(**config)

    or build and train inside `distribution.scope()`. For several hosts
    call `keras.distribution.initialize()` first on every host; each
    process then feeds its own rows, `batcher.shard(process_id,
    num_processes)`, and the global `batch_size` is unchanged.

    Args:
        model_or_config: an `AllAttentionLM` or its constructor arguments
            (only the geometry is read; build a new model under the
            distribution).
        devices: the devices to use (`keras.distribution.list_devices()`
            by default: every device of every process).
        model_parallel: int, devices per model replica; > 1 also shards
            the attention and feed-forward weights over them.

    Returns:
        A `keras.distribution.ModelParallel`.

    Example:

    >>> config = dict(vocabulary_size=256, num_layers=2, hidden_dim=64,
    ...     num_heads=4, persistent_memory_size=8, max_span=64,
    ...     block_size=32, batch_size=8)
    >>> distribution = data_parallel_distribution(config)  # doctest: +SKIP
    >>> with distribution.scope():  # doctest: +SKIP
    ...     model = AllAttentionLM(**config)
    """
    if keras.backend.backend() != "jax":
        raise ValueError(
            "`keras.distribution` shards variables on the JAX backend only; "
            "use plan_data_parallel() for TensorFlow and PyTorch. Received: "
            f"backend={keras.backend.backend()!r}"
        )
    geometry = model_geometry(model_or_config)
    model_parallel = check_positive("model_parallel", model_parallel)
    devices = list(devices or keras.distribution.list_devices())
    if len(devices) % model_parallel:
        raise ValueError(
            "`model_parallel` must divide the number of devices. Received: "
            f"model_parallel={model_parallel}, {len(devices)} devices"
        )
    replicas = len(devices) // model_parallel
    if geometry["batch_size"] % replicas:
        raise ValueError(
            "`batch_size` must be a multiple of the number of model replicas "
            f"(each keeps the memory of whole rows). Received: batch_size="
            f"{geometry['batch_size']}, {replicas} replicas"
        )
    for key in ("num_heads", "hidden_dim", "feedforward_dim"):
        if model_parallel > 1 and geometry[key] and geometry[key] % model_parallel:
            raise ValueError(
                f"`{key}` must be a multiple of model_parallel. Received: "
                f"{key}={geometry[key]}, model_parallel={model_parallel}"
            )
    mesh = keras.distribution.DeviceMesh(
        shape=(replicas, model_parallel),
        axis_names=(BATCH_AXIS, MODEL_AXIS),
        devices=devices,
    )
    layout_map = memory_layout_map(
        model_or_config, mesh, shard_model=model_parallel > 1
    )
    # Each process reads its own rows (`StreamBatcher.shard`): no dataset
    # auto-sharding, which would also refuse a `PyDataset`.
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name=BATCH_AXIS,
        auto_shard_dataset=False,
    )


def plan_fields(config, global_batch_size, devices=None, model_parallel=1):
    """The `DataParallelPlan` fields of a JAX run: `fit` under a
    distribution over every device (none for a single device); with
    several processes (`KERAS_DISTRIBUTION_*` set) it first calls
    `keras.distribution.initialize()`."""
    import jax

    if os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES") and not (
        jax.distributed.is_initialized()
    ):
        keras.distribution.initialize()
    devices = list(devices or keras.distribution.list_devices())
    # One device needs no distribution (a 1-device mesh would only add
    # recompilations between `fit` calls).
    distribution = (
        data_parallel_distribution(config, devices, model_parallel)
        if len(devices) > 1 else None
    )
    return dict(
        num_replicas=distribution.device_mesh.shape[0] if distribution else 1,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        model_batch_size=global_batch_size,
        uses_fit=True,
        distribution=distribution,
    )


def activate(plan):
    """`keras.distribution.set_distribution` (None for one device)."""
    keras.distribution.set_distribution(plan.distribution)


def memory_placement(variable):
    """`(spec, shards)`: the `PartitionSpec` and this process's shards,
    rows in global numbering."""
    value = variable.value
    shards = sorted(
        {
            (str(shard.device), row_range(shard.index[0], variable.shape[0]))
            for shard in value.addressable_shards
        },
        key=lambda item: (item[1], item[0]),
    )
    spec = getattr(value.sharding, "spec", None)
    spec = "single device" if spec is None else tuple(spec)
    return spec, shards


def local_rows(variable):
    """The rows this process holds, in global row order, as NumPy."""
    shards = {}
    for shard in variable.value.addressable_shards:
        start = row_range(shard.index[0], variable.shape[0])[0]
        shards.setdefault(start, np.asarray(shard.data))
    return np.concatenate([shards[k] for k in sorted(shards)])


def check_checkpoints(plan):
    """Nothing to refuse: every process takes part in gathering the rows."""


def barrier(plan, name):
    """Returns in every process once all have reached it (several
    processes: `multihost_utils.sync_global_devices`)."""
    if plan.process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def global_memories(model, plan):
    """Every layer's memory, all rows of all processes, in every process.

    With several processes each holds only its rows: they are gathered
    (`multihost_utils.process_allgather`, a collective: every process
    calls it)."""
    if plan.process_count == 1:
        return model.get_memory()
    from jax.experimental import multihost_utils

    sync_jax_state(model)
    return [
        layer.ordered(
            multihost_utils.process_allgather(layer.memory.value, tiled=True)
        )
        for layer in model.segment_memories
    ]


def set_global_memories(model, plan, memories):
    """Sets the memory from all rows: the model holds the global batch,
    and each process keeps the rows its layout gives it."""
    model.set_memory(memories)


def use_virtual_cpu_devices(count):
    """Sets `jax_num_cpu_devices` (like
    `XLA_FLAGS=--xla_force_host_platform_device_count=N`)."""
    import jax

    jax.config.update("jax_num_cpu_devices", count)
