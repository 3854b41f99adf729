"""Data-parallel training of `AllAttentionLM` with each backend's own engine.

The segment memory is per stream: row `r` of the memory of every layer
belongs to row `r` of every batch. Data parallelism therefore shards the
memory along the batch with the data, and each replica keeps the memory of
its own rows; nothing about the memory is ever communicated.

- JAX: `keras.distribution` (GSPMD). `data_parallel_distribution` builds a
  `ModelParallel` over a ("batch", "model") mesh whose `LayoutMap` shards
  the memory variables on "batch" (and, with `model_parallel > 1`, the
  attention projections, persistent vectors and feed-forward weights on
  "model"); the model keeps the global `batch_size` and `fit` runs as is.
  Set it before the model is built.
- TensorFlow: `tf.distribute.MirroredStrategy` with `fit`. The model is
  built under the strategy with the per-replica `batch_size`: Keras
  creates the memory with `aggregation="none"`, so it becomes a
  `MirroredVariable` whose `.assign` inside `call` updates only the
  replica's own copy (TensorFlow's `_on_write_update_replica` does no
  all-reduce for that aggregation). Keras's `fit` fails under
  `MultiWorkerMirroredStrategy` (keras-team/keras#20585), so several hosts
  train with `DataParallelTrainer`'s loop.
- PyTorch: `torch.nn.parallel.DistributedDataParallel` over ranks started
  by `torchrun` (Keras has no `keras.distribution` for torch, and `fit`
  cannot go through the DDP wrapper): `DataParallelTrainer` runs the
  training loop; each rank reads its own rows
  (`StreamBatcher.shard(rank, world_size)`) and its model has the
  per-rank `batch_size`.

`DataParallelPlan` puts the three behind one interface; see
`plan_data_parallel`.
"""

import contextlib
import json
import os
import time

import keras
import numpy as np

from keras_allattn.utils import check_positive

BATCH_AXIS = "batch"
MODEL_AXIS = "model"


def _geometry(model_or_config):
    """The model arguments these helpers need, from a model or a config."""
    if isinstance(model_or_config, keras.Model):
        model_or_config = {
            key: getattr(model_or_config, key)
            for key in ("num_layers", "num_heads", "hidden_dim", "batch_size",
                        "feedforward_dim")
        }
    try:
        return {
            "num_layers": model_or_config["num_layers"],
            "num_heads": model_or_config["num_heads"],
            "hidden_dim": model_or_config["hidden_dim"],
            "batch_size": model_or_config["batch_size"],
            "feedforward_dim": model_or_config.get("feedforward_dim"),
        }
    except (KeyError, TypeError):
        raise ValueError(
            "`model_or_config` must be an AllAttentionLM or its constructor "
            "arguments (a dict with num_layers, num_heads, hidden_dim and "
            f"batch_size). Received: {model_or_config!r}"
        ) from None


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
    num_layers = _geometry(model_or_config)["num_layers"]
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
    geometry = _geometry(model_or_config)
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
    geometry = _geometry(model_or_config)
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


def memory_sharding(model):
    """Where the rows of every layer's segment memory live.

    Args:
        model: an `AllAttentionLM`.

    Returns:
        A list with one dict per layer: `path`, `shape` (the variable's
        global shape on JAX, the per-replica shape on TensorFlow and
        PyTorch), `spec` (JAX: the `PartitionSpec`; TensorFlow: the
        variable class; torch: the rank) and `shards`, a list of
        `(device, rows)` pairs, rows as `(start, stop)` in this process's
        global row numbering on JAX and per replica elsewhere.
    """
    backend = keras.backend.backend()
    result = []
    for layer in model.segment_memories:
        variable = layer.memory
        value = variable.value
        if backend == "jax":
            shards = sorted(
                {
                    (str(shard.device), _rows(shard.index[0], variable.shape[0]))
                    for shard in value.addressable_shards
                },
                key=lambda item: (item[1], item[0]),
            )
            spec = getattr(value.sharding, "spec", None)
            spec = "single device" if spec is None else tuple(spec)
        elif backend == "tensorflow" and hasattr(value, "values"):
            shards = [
                (component.device, (0, int(component.shape[0])))
                for component in value.values
            ]
            spec = type(value).__name__
        else:
            shards = [(str(getattr(value, "device", "cpu")), (0, variable.shape[0]))]
            spec = f"rank {_torch_rank()}" if backend == "torch" else "local"
        result.append(
            {
                "path": variable.path,
                "shape": tuple(variable.shape),
                "spec": spec,
                "shards": shards,
            }
        )
    return result


def _rows(index, size):
    """`(start, stop)` of a slice along an axis of length `size`."""
    start, stop, _ = index.indices(size)
    return (start, stop)


def _torch_rank():
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_memories(model):
    """The segment memory rows this process holds, as NumPy arrays.

    Args:
        model: an `AllAttentionLM`.

    Returns:
        One array per layer with the rows of this process's replicas in
        global row order: all `batch_size` rows on JAX with one process;
        on TensorFlow the rows of every local replica stacked (the global
        batch under `MirroredStrategy`); on torch this rank's rows.
    """
    backend = keras.backend.backend()
    memories = []
    for layer in model.segment_memories:
        value = layer.memory.value
        if backend == "jax":
            shards = {}
            for shard in value.addressable_shards:
                start = _rows(shard.index[0], layer.memory.shape[0])[0]
                shards.setdefault(start, np.asarray(shard.data))
            memories.append(np.concatenate([shards[k] for k in sorted(shards)]))
        elif backend == "tensorflow" and hasattr(value, "values"):
            memories.append(
                np.concatenate([component.numpy() for component in value.values])
            )
        else:
            memories.append(keras.ops.convert_to_numpy(layer.memory))
    return memories


def replica_batch_size(global_batch_size, num_replicas):
    """Rows per replica: `global_batch_size // num_replicas`, checked.

    Args:
        global_batch_size: int, the rows of one training step.
        num_replicas: int, replicas sharing them.

    Returns:
        The rows of each replica (its model's `batch_size` on TensorFlow
        and PyTorch).
    """
    global_batch_size = check_positive("global_batch_size", global_batch_size)
    num_replicas = check_positive("num_replicas", num_replicas)
    if global_batch_size % num_replicas:
        raise ValueError(
            "The global batch size must be a multiple of the number of "
            f"replicas. Received: global_batch_size={global_batch_size}, "
            f"num_replicas={num_replicas}"
        )
    return global_batch_size // num_replicas


def use_virtual_cpu_devices(count):
    """Splits the CPU into `count` devices, to try data parallelism on CPU.

    JAX: sets `jax_num_cpu_devices` (like
    `XLA_FLAGS=--xla_force_host_platform_device_count=N`); TensorFlow:
    `count` logical CPU devices. Call it before the backend runs anything.
    PyTorch replicas are processes: start them with `torchrun`.

    Args:
        count: int, the number of devices.
    """
    count = check_positive("count", count)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        jax.config.update("jax_num_cpu_devices", count)
    elif backend == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count
        )
    else:
        raise ValueError(
            "On PyTorch every replica is a process: start `count` of them "
            "with `torchrun --nproc_per_node=COUNT`. Received: "
            f"backend={backend!r}"
        )


def _tf_workers():
    """The number of workers named by `TF_CONFIG` (1 without it)."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster = config.get("cluster", {})
    return len(cluster.get("worker", [])) + len(cluster.get("chief", [])) or 1


class DataParallelPlan:
    """How to train one `AllAttentionLM` data parallel on this backend.

    Made by `plan_data_parallel`; used in four places:

        plan = plan_data_parallel(config)  # config["batch_size"]: global
        plan.activate()
        model = AllAttentionLM(**plan.model_config(config))
        model.compile(optimizer=..., loss=...)
        batcher = plan.shard(StreamBatcher(tokens, config["batch_size"], M))
        if plan.uses_fit:
            dataset = batcher.as_dataset()
            model.fit(dataset, steps_per_epoch=...,
                      callbacks=[ResetMemoryOnRestart(dataset)])
        else:
            DataParallelTrainer(model, plan).train(batcher, num_steps)

    Attributes:
        backend: the Keras backend.
        global_batch_size: rows of one training step over all replicas.
        num_replicas: data-parallel replicas (devices, or device groups
            with model parallelism; processes on torch).
        process_index, process_count: this process and the number of
            processes (hosts, or ranks on torch).
        model_batch_size: the `batch_size` to build the model with: global
            on JAX, per replica on TensorFlow and PyTorch.
        uses_fit: whether `model.fit` trains data parallel here (JAX;
            TensorFlow on one host); otherwise use `DataParallelTrainer`.
        distribution: the JAX `keras.distribution` (else None).
        strategy: the `tf.distribute` strategy (else None).
    """

    def __init__(self, backend, global_batch_size, num_replicas, process_index,
                 process_count, model_batch_size, uses_fit, distribution=None,
                 strategy=None):
        self.backend = backend
        self.global_batch_size = global_batch_size
        self.num_replicas = num_replicas
        self.process_index = process_index
        self.process_count = process_count
        self.model_batch_size = model_batch_size
        self.uses_fit = uses_fit
        self.distribution = distribution
        self.strategy = strategy

    def model_config(self, config):
        """`config` with `batch_size` set to `model_batch_size`."""
        return {**config, "batch_size": self.model_batch_size}

    def activate(self):
        """Makes the plan's set-up current for this process.

        Call it before the model is built (variables take their placement
        when they are created), and train afterwards: JAX
        `keras.distribution.set_distribution` (None for one device),
        TensorFlow `tf.distribute.experimental_set_strategy` (the strategy's
        scope for the rest of the process); nothing on torch.
        """
        if self.backend == "jax":
            keras.distribution.set_distribution(self.distribution)
        elif self.backend == "tensorflow":
            import tensorflow as tf

            tf.distribute.experimental_set_strategy(self.strategy)

    def check_model(self, model):
        """Raises ValueError unless `model`'s memory is placed as planned.

        JAX: every memory variable sharded on "batch" (a `LayoutMap` key
        that misses leaves it replicated, silently); TensorFlow: one copy
        of `model_batch_size` rows per replica; torch: `model_batch_size`
        rows.
        """
        for entry in memory_sharding(model):
            rows = entry["shape"][0]
            if self.distribution is not None:
                placed = entry["spec"][:1] == (BATCH_AXIS,)
                placed = placed and rows == self.global_batch_size
            elif self.strategy is not None:
                copies = len(entry["shards"]) * self.process_count
                placed = entry["spec"] == "MirroredVariable"
                placed = placed and copies == self.num_replicas
                placed = placed and rows == self.model_batch_size
            else:
                placed = rows == self.model_batch_size
            if not placed:
                raise ValueError(
                    f"The segment memory `{entry['path']}` is not placed as "
                    f"planned ({self!r}). Received: {entry}. Build the model "
                    "after `plan.activate()`, at top level (the layout keys "
                    "are full variable paths), from `plan.model_config(...)`."
                )

    def shard(self, batcher):
        """The `StreamBatcher` this process reads.

        JAX: this process's rows (all of them with one process); torch:
        this rank's rows; TensorFlow: the global batch, which `fit` (or
        `DataParallelTrainer`) splits over the replicas in row order.
        """
        if batcher.batch_size != self.global_batch_size:
            raise ValueError(
                "The batcher must serve the global batch. Received: "
                f"batch_size={batcher.batch_size}, global_batch_size="
                f"{self.global_batch_size}"
            )
        if self.backend == "tensorflow" or self.process_count == 1:
            return batcher
        return batcher.shard(self.process_index, self.process_count)

    def __repr__(self):
        return (
            f"DataParallelPlan(backend={self.backend!r}, global_batch_size="
            f"{self.global_batch_size}, num_replicas={self.num_replicas}, "
            f"processes={self.process_count}, model_batch_size="
            f"{self.model_batch_size}, uses_fit={self.uses_fit})"
        )


def plan_data_parallel(config, devices=None, model_parallel=1):
    """Sets up data-parallel training of `AllAttentionLM(**config)`.

    - JAX: `data_parallel_distribution(config, devices, model_parallel)`
      (none for a single device); with several processes (`KERAS_DISTRIBUTION_*` variables set) it
      first calls `keras.distribution.initialize()`.
    - TensorFlow: `MirroredStrategy(devices)` (default: every GPU, else
      every logical CPU), trained with `fit`; with several workers in
      `TF_CONFIG`, `MultiWorkerMirroredStrategy` and `DataParallelTrainer`.
    - PyTorch: under `torchrun` (`WORLD_SIZE` set) initialises the
      process group (NCCL on GPUs, else gloo) and pins the rank's GPU;
      one replica per process, trained with `DataParallelTrainer`.

    Args:
        config: `AllAttentionLM` constructor arguments; `batch_size` is the
            global batch (all replicas together).
        devices: JAX or TensorFlow devices (default: all).
        model_parallel: JAX only, devices per model replica.

    Returns:
        A `DataParallelPlan`.
    """
    global_batch_size = _geometry(config)["batch_size"]
    backend = keras.backend.backend()
    if model_parallel != 1 and backend != "jax":
        raise ValueError(
            "`model_parallel` needs the JAX backend. Received: "
            f"model_parallel={model_parallel}, backend={backend!r}"
        )
    if backend == "jax":
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
        return DataParallelPlan(
            backend, global_batch_size,
            num_replicas=distribution.device_mesh.shape[0] if distribution else 1,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            model_batch_size=global_batch_size,
            uses_fit=True,
            distribution=distribution,
        )
    if backend == "tensorflow":
        import tensorflow as tf

        workers = _tf_workers()
        if workers > 1:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
            process_index = strategy.cluster_resolver.task_id
        else:
            if devices is None:
                devices = [d.name for d in tf.config.list_logical_devices("GPU")]
                devices = devices or [
                    d.name for d in tf.config.list_logical_devices("CPU")
                ]
            strategy = tf.distribute.MirroredStrategy(devices)
            process_index = 0
        replicas = strategy.num_replicas_in_sync
        return DataParallelPlan(
            backend, global_batch_size, replicas, process_index, workers,
            model_batch_size=replica_batch_size(global_batch_size, replicas),
            uses_fit=workers == 1,
            strategy=strategy,
        )
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (
        (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    )
    return DataParallelPlan(
        backend, global_batch_size, world, rank, world,
        model_batch_size=replica_batch_size(global_batch_size, world),
        uses_fit=world == 1,
    )


class DataParallelTrainer:
    """A training loop for the data-parallel runs `fit` cannot do.

    PyTorch: the model is wrapped in `DistributedDataParallel` (its
    gradients are averaged over the ranks during the backward pass), and
    each rank trains on its own rows with its own segment memory.
    TensorFlow with `MultiWorkerMirroredStrategy` (or any strategy): each
    replica computes its gradients and applies them in `strategy.run`, as
    `fit` does (the optimizer sums them over the replicas); with Keras's
    `clipnorm`, `global_clipnorm` or `clipvalue` the summed gradient is
    clipped first (`fit` clips each replica's share instead). On JAX `fit`
    is data parallel already: there is no loop here.

    A step is the model's compiled loss (plus the span loss) on one batch,
    then one optimizer update; the returned loss is the global mean.
    The memory is zeroed at the stream's pass starts and the attended
    spans follow the learned ones, as `fit` does with
    `ResetMemoryOnRestart` and `SpanTrimming`.

    Args:
        model: a compiled `AllAttentionLM` built as the plan says.
        plan: the `DataParallelPlan` (default: a single process, no
            replicas: a plain loop).

    Example:

    >>> trainer = DataParallelTrainer(model, plan)  # doctest: +SKIP
    >>> losses = trainer.train(plan.shard(batcher), num_steps=100)  # doctest: +SKIP
    """

    def __init__(self, model, plan=None):
        if getattr(model, "optimizer", None) is None:
            raise ValueError(
                "`model` must be compiled with an optimizer and a loss first."
            )
        self.backend = keras.backend.backend()
        if self.backend == "jax":
            raise ValueError(
                "On JAX `fit` trains data parallel: set the plan's "
                "distribution and call `model.fit`."
            )
        self.model = model
        self.plan = plan
        if hasattr(model, "resolve_remat"):  # as `fit` does, before tracing
            model.resolve_remat()
        self.tokens_per_second = None
        self._step = None
        strategy = plan.strategy if plan is not None else None
        with strategy.scope() if strategy else contextlib.nullcontext():
            model.optimizer.build(model.trainable_variables)
        if self.backend == "torch":
            distributed = plan is not None and plan.process_count > 1
            self._module = self._wrap_ddp(model) if distributed else model

    @staticmethod
    def _wrap_ddp(model):
        import torch

        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def train_step(self, inputs, targets):
        """One optimizer step on the batch this process reads.

        Args:
            inputs, targets: int32 arrays, the rows `plan.shard(batcher)`
                serves (per rank on torch, the global batch on TensorFlow).

        Returns:
            float, the loss of the step averaged over all replicas.
        """
        if self._step is None:
            self._step = getattr(self, f"_make_{self.backend}_step")()
        loss = self._step(inputs, targets)
        if self.model.update_span_trimming() and self.backend == "tensorflow":
            self._step = None  # the attended lengths are traced in
        return float(keras.ops.convert_to_numpy(loss))

    def train(self, batcher, num_steps, start_step=0):
        """Runs `num_steps` steps, zeroing the memory at pass starts.

        Args:
            batcher: the `StreamBatcher` of this process (`plan.shard`).
            num_steps: int, steps to run.
            start_step: int, the global step of the first batch.

        Returns:
            The list of step losses. `tokens_per_second` is then set from
            the steps after the first (global tokens over wall time).
        """
        losses, started = [], None
        for step, (inputs, targets, reset) in enumerate(
            batcher.iterate(num_steps, start_step)
        ):
            if reset:
                self.model.reset_memory()
            losses.append(self.train_step(inputs, targets))
            if step == 0:
                started = time.perf_counter()
        if num_steps > 1:
            elapsed = time.perf_counter() - started
            rows = self.plan.global_batch_size if self.plan else batcher.batch_size
            self.tokens_per_second = (
                (num_steps - 1) * rows * batcher.block_size / elapsed
            )
        return losses

    def _make_torch_step(self):
        import torch
        import torch.distributed as dist

        model, module = self.model, self._module
        distributed = module is not model

        def step(inputs, targets):
            inputs = keras.ops.convert_to_tensor(inputs, "int32")
            targets = keras.ops.convert_to_tensor(targets, "int32")
            predictions = module(inputs, training=True)
            loss = model.compute_loss(
                x=inputs, y=targets, y_pred=predictions, training=True
            )
            model.zero_grad()
            loss.backward()
            variables = model.trainable_weights
            with torch.no_grad():
                model.optimizer.apply([v.value.grad for v in variables], variables)
            loss = loss.detach()
            if distributed:
                dist.all_reduce(loss)
                loss = loss / dist.get_world_size()
            return loss

        return step

    def _make_tensorflow_step(self):
        import tensorflow as tf

        model, optimizer = self.model, self.model.optimizer
        strategy = self.plan.strategy if self.plan else tf.distribute.get_strategy()
        variables = model.trainable_variables
        replicas = strategy.num_replicas_in_sync
        clips = any((optimizer.clipnorm, optimizer.global_clipnorm,
                     optimizer.clipvalue))

        def replica_step(inputs, targets):
            with tf.GradientTape() as tape:
                predictions = model(inputs, training=True)
                # Divided by the number of replicas (Keras scales losses
                # computed in a replica context).
                loss = model.compute_loss(
                    x=inputs, y=targets, y_pred=predictions, training=True
                )
            grads = tape.gradient(loss, variables)
            if clips:
                # Keras clips each replica's gradient before summing them:
                # clip the sum here, so that its clipping of a replica's
                # share, `1 / replicas` of that, changes nothing.
                context = tf.distribute.get_replica_context()
                grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
                grads = [g / replicas for g in optimizer._clip_gradients(grads)]
            optimizer.apply(grads, variables)  # sums over the replicas
            return loss

        @tf.function
        def update(inputs, targets):
            loss = strategy.run(replica_step, args=(inputs, targets))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)

        def rows_of_replica(array):
            rows = replica_batch_size(len(array), replicas)
            return strategy.experimental_distribute_values_from_function(
                lambda context: tf.constant(
                    array[context.replica_id_in_sync_group * rows :][:rows]
                )
            )

        def step(inputs, targets):
            return update(rows_of_replica(inputs), rows_of_replica(targets))

        return step
