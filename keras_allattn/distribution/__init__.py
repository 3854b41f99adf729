"""Data-parallel training of `AllAttentionLM` with each backend's own engine.

The segment memory is per stream: row `r` of the memory of every layer
belongs to row `r` of every batch. Data parallelism therefore shards the
memory along the batch with the data, and each replica keeps the memory of
its own rows; nothing about the memory is ever communicated.

- `plan`: the common front, `plan_data_parallel` and `DataParallelPlan`,
  `memory_sharding`, `local_memories`, `use_virtual_cpu_devices`.
- `jax_engine`: `keras.distribution` (GSPMD), `data_parallel_distribution`
  and its `LayoutMap`; `fit` trains.
- `tensorflow_engine`: `tf.distribute.MirroredStrategy` with `fit`; with
  several workers, the loop's step.
- `torch_engine`: `DistributedDataParallel` under `torchrun`, the loop's
  step.
- `trainer`: `DataParallelTrainer`, the loop for the runs `fit` cannot do.
- `common`: what the engines share (mesh axes, rows per replica).
"""

from keras_allattn.distribution.common import BATCH_AXIS
from keras_allattn.distribution.common import MODEL_AXIS
from keras_allattn.distribution.common import replica_batch_size
from keras_allattn.distribution.jax_engine import data_parallel_distribution
from keras_allattn.distribution.jax_engine import memory_layout_map
from keras_allattn.distribution.jax_engine import memory_variable_paths
from keras_allattn.distribution.plan import DataParallelPlan
from keras_allattn.distribution.plan import local_memories
from keras_allattn.distribution.plan import memory_sharding
from keras_allattn.distribution.plan import plan_data_parallel
from keras_allattn.distribution.plan import use_virtual_cpu_devices
from keras_allattn.distribution.trainer import DataParallelTrainer

__all__ = [
    "BATCH_AXIS",
    "MODEL_AXIS",
    "DataParallelPlan",
    "DataParallelTrainer",
    "data_parallel_distribution",
    "local_memories",
    "memory_layout_map",
    "memory_sharding",
    "memory_variable_paths",
    "plan_data_parallel",
    "replica_batch_size",
    "use_virtual_cpu_devices",
]
