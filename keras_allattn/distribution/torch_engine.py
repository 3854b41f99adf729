"""PyTorch: data parallelism through `DistributedDataParallel`.

Keras has no `keras.distribution` for torch, and `fit` cannot go through
the DDP wrapper: ranks started by `torchrun` each build a model of the
per-rank `batch_size`, read their own rows (`StreamBatcher.shard(rank,
world_size)`) and train with `DataParallelTrainer` and this module's
`TrainStep`; gradients are averaged over the ranks in the backward pass.
"""

import os

import keras

from keras_allattn.distribution.common import local_placement
from keras_allattn.distribution.common import replica_batch_size


def rank():
    """This process's rank (0 outside a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def plan_fields(config, global_batch_size, devices=None, model_parallel=1):
    """The `DataParallelPlan` fields of a PyTorch run: under `torchrun`
    (`WORLD_SIZE` set) it initialises the process group (NCCL on GPUs,
    else gloo) and pins the rank's GPU; one replica per process."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    index, world = (
        (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    )
    return dict(
        num_replicas=world,
        process_index=index,
        process_count=world,
        model_batch_size=replica_batch_size(global_batch_size, world),
        uses_fit=world == 1,
    )


def activate(plan):
    """Nothing to set: every rank is a process of its own."""


def memory_placement(variable):
    """`(spec, shards)`: `"rank R"` and this rank's rows."""
    _, shards = local_placement(variable)
    return f"rank {rank()}", shards


def local_rows(variable):
    """This rank's rows, as NumPy."""
    return keras.ops.convert_to_numpy(variable)


def check_checkpoints(plan):
    """Nothing to refuse: the ranks gather their rows."""


def barrier(plan, name):
    """Returns in every rank once all have reached it (several ranks:
    `torch.distributed.barrier`)."""
    if plan.process_count > 1:
        import torch.distributed as dist

        dist.barrier()


def global_memories(model, plan):
    """Every layer's memory, the rows of all ranks in rank order, in every
    rank (`all_gather`, a collective: every rank calls it)."""
    if plan.process_count == 1:
        return model.get_memory()
    import torch
    import torch.distributed as dist

    result = []
    for layer in model.segment_memories:
        rows = layer.memory.value.detach()
        gathered = [torch.empty_like(rows) for _ in range(plan.process_count)]
        dist.all_gather(gathered, rows)
        result.append(layer.ordered(torch.cat(gathered).cpu().numpy()))
    return result


def set_global_memories(model, plan, memories):
    """Sets this rank's rows of the global memories."""
    rows = plan.model_batch_size
    start = plan.process_index * rows
    model.set_memory([memory[start : start + rows] for memory in memories])


def use_virtual_cpu_devices(count):
    """Refused: PyTorch replicas are processes."""
    raise ValueError(
        "On PyTorch every replica is a process: start `count` of them "
        "with `torchrun --nproc_per_node=COUNT`. Received: "
        "backend='torch'"
    )


class TrainStep:
    """One optimizer step of `model`, through DDP with several ranks.

    The model is wrapped in `DistributedDataParallel` when the plan has
    several processes (its construction broadcasts rank 0's weights; each
    rank keeps its own segment memory), and
    the step's loss is averaged over the ranks.

    Args:
        model: a compiled `AllAttentionLM` of the per-rank batch.
        plan: the `DataParallelPlan`, or None (a single process).

    Call arguments:
        inputs, targets: int32 arrays, this rank's rows.

    Returns:
        The loss of the step averaged over the ranks.
    """

    def __init__(self, model, plan=None):
        import torch

        self.model = model
        self.distributed = plan is not None and plan.process_count > 1
        self.module = model
        if self.distributed:
            device_ids = (
                [torch.cuda.current_device()] if torch.cuda.is_available() else None
            )
            # The construction broadcasts every parameter of rank 0, and
            # Keras exposes the segment memory as a (frozen) parameter:
            # each rank keeps its own rows (restored from a checkpoint,
            # say).
            own_rows = [
                layer.memory.value.detach().clone()
                for layer in model.segment_memories
            ]
            self.module = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=device_ids
            )
            for layer, rows in zip(model.segment_memories, own_rows):
                layer.memory.assign(rows)

    def retrace(self):
        """Nothing to do: the step runs eagerly."""

    def __call__(self, inputs, targets):
        import torch
        import torch.distributed as dist

        model = self.model
        inputs = keras.ops.convert_to_tensor(inputs, "int32")
        targets = keras.ops.convert_to_tensor(targets, "int32")
        predictions = self.module(inputs, training=True)
        loss = model.compute_loss(
            x=inputs, y=targets, y_pred=predictions, training=True
        )
        model.zero_grad()
        loss.backward()
        variables = model.trainable_weights
        with torch.no_grad():
            model.optimizer.apply([v.value.grad for v in variables], variables)
        loss = loss.detach()
        if self.distributed:
            dist.all_reduce(loss)
            loss = loss / dist.get_world_size()
        return loss
