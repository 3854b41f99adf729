"""TensorFlow: data parallelism through `tf.distribute`.

One host: `MirroredStrategy` with `fit`. The model is built under the
strategy with the per-replica `batch_size`: Keras creates the memory with
`aggregation="none"`, so it becomes a `MirroredVariable` whose `.assign`
inside `call` updates only the replica's own copy (TensorFlow does no
all-reduce for that aggregation). Keras's `fit` fails under
`MultiWorkerMirroredStrategy` (keras-team/keras#20585), so several hosts
train with `DataParallelTrainer` and this module's `TrainStep`.
"""

import json
import os

import keras
import numpy as np

from keras_allattn.distribution.common import local_placement
from keras_allattn.distribution.common import replica_batch_size
from keras_allattn.training.optimizers import clip_gradients


def worker_count():
    """The number of workers named by `TF_CONFIG` (1 without it)."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster = config.get("cluster", {})
    return len(cluster.get("worker", [])) + len(cluster.get("chief", [])) or 1


def plan_fields(config, global_batch_size, devices=None, model_parallel=1):
    """The `DataParallelPlan` fields of a TensorFlow run:
    `MirroredStrategy(devices)` (default: every GPU, else every logical
    CPU) trained with `fit`; with several workers in `TF_CONFIG`,
    `MultiWorkerMirroredStrategy` and `DataParallelTrainer`."""
    import tensorflow as tf

    workers = worker_count()
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
    return dict(
        num_replicas=replicas,
        process_index=process_index,
        process_count=workers,
        model_batch_size=replica_batch_size(global_batch_size, replicas),
        uses_fit=workers == 1,
        strategy=strategy,
    )


def activate(plan):
    """`tf.distribute.experimental_set_strategy`: the strategy's scope for
    the rest of the process."""
    import tensorflow as tf

    tf.distribute.experimental_set_strategy(plan.strategy)


def memory_placement(variable):
    """`(spec, shards)`: the variable class and one `(device, rows)` per
    local replica's copy."""
    value = variable.value
    if not hasattr(value, "values"):
        return local_placement(variable)
    shards = [
        (component.device, (0, int(component.shape[0])))
        for component in value.values
    ]
    return type(value).__name__, shards


def local_rows(variable):
    """The rows of every local replica stacked, as NumPy."""
    value = variable.value
    if not hasattr(value, "values"):
        return keras.ops.convert_to_numpy(variable)
    return np.concatenate([component.numpy() for component in value.values])


def check_checkpoints(plan):
    """Refuses checkpoints of a multi-worker run."""
    if plan.process_count > 1:
        raise ValueError(
            "Checkpoints of a TensorFlow multi-worker run are not supported: "
            "each worker holds the segment memory of its replicas only. Use "
            "one worker (MirroredStrategy), JAX or PyTorch to save and "
            f"resume across process counts. Received: process_count="
            f"{plan.process_count}"
        )


def barrier(plan, name):
    """Nothing to wait for: the checkpoints of one worker (several are
    refused by `check_checkpoints`)."""
    check_checkpoints(plan)


def global_memories(model, plan):
    """Every layer's memory: the copies of all replicas stacked in replica
    order (one worker only)."""
    check_checkpoints(plan)
    return [local_rows(layer.memory) for layer in model.segment_memories]


def set_global_memories(model, plan, memories):
    """Gives each replica's copy its rows (one worker only)."""
    check_checkpoints(plan)
    for layer, memory in zip(model.segment_memories, memories):
        value = layer.memory.value
        copies = getattr(value, "values", None)
        if copies is None:
            layer.memory.assign(memory)
            continue
        rows = plan.model_batch_size
        if len(memory) != rows * len(copies):
            raise ValueError(
                f"The memory `{layer.memory.path}` must hold "
                f"{rows * len(copies)} rows ({len(copies)} replicas of "
                f"{rows}). Received: {len(memory)} rows"
            )
        for index, copy in enumerate(copies):
            copy.assign(memory[index * rows : (index + 1) * rows])


def use_virtual_cpu_devices(count):
    """`count` logical CPU devices."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * count
    )


class TrainStep:
    """One optimizer step of `model` under the plan's strategy.

    Each replica computes its gradients and applies them in
    `strategy.run`, as `fit` does (the optimizer sums them over the
    replicas); with Keras's `clipnorm`, `global_clipnorm` or `clipvalue`
    the summed gradient is clipped first (`fit` clips each replica's share
    instead).

    Args:
        model: a compiled `AllAttentionLM` built under the strategy.
        plan: the `DataParallelPlan`, or None (the current strategy).

    Call arguments:
        inputs, targets: the global batch as NumPy arrays; replica `i`
            gets the `i`-th block of rows.

    Returns:
        The loss of the step summed over the replicas (each replica's loss
        is already divided by their number).
    """

    def __init__(self, model, plan=None):
        import tensorflow as tf

        self.model = model
        self.strategy = plan.strategy if plan else tf.distribute.get_strategy()
        self._update = None

    def retrace(self):
        """Traces the step again at its next call (the attended lengths
        are traced in)."""
        self._update = None

    def _make_update(self):
        import tensorflow as tf

        model, optimizer, strategy = self.model, self.model.optimizer, self.strategy
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
                grads = [g / replicas for g in clip_gradients(optimizer, grads)]
            optimizer.apply(grads, variables)  # sums over the replicas
            return loss

        @tf.function
        def update(inputs, targets):
            loss = strategy.run(replica_step, args=(inputs, targets))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)

        return update

    def _rows_of_replica(self, array):
        import tensorflow as tf

        strategy = self.strategy
        rows = replica_batch_size(len(array), strategy.num_replicas_in_sync)
        return strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(
                array[context.replica_id_in_sync_group * rows :][:rows]
            )
        )

    def __call__(self, inputs, targets):
        if self._update is None:
            self._update = self._make_update()
        return self._update(
            self._rows_of_replica(inputs), self._rows_of_replica(targets)
        )
