"""The common front of data-parallel training: one plan, three engines.

The segment memory is per stream: row `r` of the memory of every layer
belongs to row `r` of every batch. Data parallelism therefore shards the
memory along the batch with the data, and each replica keeps the memory of
its own rows; nothing about the memory is ever communicated.

`plan_data_parallel` asks the backend's engine (`jax_engine`,
`tensorflow_engine`, `torch_engine`) for its set-up and returns a
`DataParallelPlan`, which puts the three behind one interface;
`memory_sharding` and `local_memories` show where the memory rows are.
"""

import keras

from keras_allattn.distribution import jax_engine
from keras_allattn.distribution import tensorflow_engine
from keras_allattn.distribution import torch_engine
from keras_allattn.distribution.common import BATCH_AXIS
from keras_allattn.distribution.common import model_geometry
from keras_allattn.utils import check_positive

# Each engine module has `plan_fields`, `activate`, `memory_placement`,
# `local_rows`, `check_checkpoints`, `barrier`, `global_memories`,
# `set_global_memories` and `use_virtual_cpu_devices`; TensorFlow and PyTorch also a
# `TrainStep` for `DataParallelTrainer`.
ENGINES = {
    "jax": jax_engine,
    "tensorflow": tensorflow_engine,
    "torch": torch_engine,
}


def engine():
    """The engine module of the current Keras backend."""
    backend = keras.backend.backend()
    if backend not in ENGINES:
        raise ValueError(
            "Data-parallel training supports the JAX, TensorFlow and PyTorch "
            f"backends. Received: backend={backend!r}"
        )
    return ENGINES[backend]


def memory_sharding(model):
    """Where the rows of every layer's segment memory live.

    Args:
        model: an `AllAttentionLM`.

    Returns:
        A list with one dict per layer: `path`, `shape` (the variable's
        global shape on JAX, the per-replica shape on TensorFlow and
        PyTorch; as a ring buffer, on JAX and on PyTorch unless
        `KERAS_ALLATTN_TORCH_RING` is off, the variable holds `max_span +
        block_size` rows, see `SegmentMemory`), `spec` (JAX:
        the `PartitionSpec`; TensorFlow: the variable class; torch: the
        rank) and `shards`, a list of
        `(device, rows)` pairs, rows as `(start, stop)` in this process's
        global row numbering on JAX and per replica elsewhere.
    """
    placement = engine().memory_placement
    result = []
    for layer in model.segment_memories:
        variable = layer.memory
        spec, shards = placement(variable)
        result.append(
            {
                "path": variable.path,
                "shape": tuple(variable.shape),
                "spec": spec,
                "shards": shards,
            }
        )
    return result


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
    local_rows = engine().local_rows
    return [
        layer.ordered(local_rows(layer.memory))
        for layer in model.segment_memories
    ]


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
    engine().use_virtual_cpu_devices(count)


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
        ENGINES[self.backend].activate(self)

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

    @property
    def shard_batch_size(self):
        """The rows of the `StreamBatcher` `shard` gives this process: the
        global batch on TensorFlow, this process's rows elsewhere."""
        if self.backend == "tensorflow":
            return self.global_batch_size
        return self.global_batch_size // self.process_count

    def check_checkpoints(self):
        """Raises ValueError where checkpoints cannot hold every row (a
        TensorFlow multi-worker run: each worker holds its replicas'
        memory only)."""
        ENGINES[self.backend].check_checkpoints(self)

    def barrier(self, name):
        """Returns in every process once all of them have called it.

        A collective with several processes (every process calls it with
        the same `name`); a no-op with one.
        """
        ENGINES[self.backend].barrier(self, name)

    def global_memories(self, model):
        """Every layer's segment memory with the rows of all replicas.

        A collective with several processes: every process calls it, and
        every process gets the same arrays. TensorFlow: one worker only.

        Args:
            model: the `AllAttentionLM` built as the plan says.

        Returns:
            A list of `num_layers` NumPy arrays `(global_batch_size,
            max_span, hidden_dim)`, rows in global order (row `r` of
            every batch).
        """
        memories = ENGINES[self.backend].global_memories(model, self)
        for memory in memories:
            if len(memory) != self.global_batch_size:
                raise ValueError(
                    f"The gathered segment memory holds {len(memory)} rows, "
                    f"the plan {self.global_batch_size}: build the model "
                    f"from `plan.model_config(...)`. Received: {self!r}"
                )
        return memories

    def set_global_memories(self, model, memories):
        """Sets the segment memory from the rows of all replicas.

        Each replica takes its own rows, as `global_memories` returns
        them: the inverse of that, for any process count.

        Args:
            model: the `AllAttentionLM` built as the plan says.
            memories: a list of `num_layers` arrays `(global_batch_size,
                max_span, hidden_dim)`.
        """
        for memory in memories:
            if len(memory) != self.global_batch_size:
                raise ValueError(
                    "`memories` must hold the rows of the global batch, "
                    f"{self.global_batch_size}. Received: {len(memory)} rows"
                )
        ENGINES[self.backend].set_global_memories(model, self, memories)

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
    global_batch_size = model_geometry(config)["batch_size"]
    backend = keras.backend.backend()
    if model_parallel != 1 and backend != "jax":
        raise ValueError(
            "`model_parallel` needs the JAX backend. Received: "
            f"model_parallel={model_parallel}, backend={backend!r}"
        )
    fields = engine().plan_fields(
        config, global_batch_size, devices, model_parallel
    )
    return DataParallelPlan(backend, global_batch_size, **fields)
