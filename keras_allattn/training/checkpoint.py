"""Checkpoints from which training resumes exactly where it stopped.

A checkpoint is a folder `step_000001000/` inside a checkpoint directory:

- `model.weights.h5`: `model.save_weights`, i.e. every model weight (the
  span ratios included) and the optimizer's variables (its iteration
  count, accumulators or moments).
- `memory.npz`: the segment memory of every layer (`model.get_memory()`),
  which is state, not a weight, so neither `.keras` files nor weight files
  hold it; for models without segment memory, no file.
- `training_state.json`: what the weights file lacks: the global step of
  the data stream, the `StreamBatcher`'s seed and geometry, the state of
  every random seed generator (dropout), and the memory rows each layer
  attends (`AllAttentionLM.attended_spans()`).

With all of it restored, the next batch is the one that would have come,
seen by the same weights, optimizer state, segment memory and dropout
masks: the losses continue as if training had never stopped.

Data parallel (`plan=` a `keras_allattn.distribution.DataParallelPlan`),
the checkpoint is the same: the memory of all rows of the global batch,
gathered from every process, and the geometry of the global stream. The
first process writes it. Any process count resumes it (2 processes -> 1,
1 -> 2, ...): every process takes the memory of the rows it reads, so
every stream row continues from its own memory, as in a run on one
process.
"""

import json
import os
import re
import shutil
import tempfile

import keras
import numpy as np
from keras import ops

from keras_allattn.data.stream import StreamBatcher
from keras_allattn.data.stream import StreamDataset
from keras_allattn.utils import check_non_negative
from keras_allattn.utils import check_positive
from keras_allattn.utils import sync_jax_state

WEIGHTS_FILE = "model.weights.h5"
MEMORY_FILE = "memory.npz"
STATE_FILE = "training_state.json"
FORMAT_VERSION = 2
_CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")


def _seed_states(model):
    """The seed generator states of `model`, in a fixed model order.

    They are the entries of `model.variables` that `model.weights` leaves
    out (Keras saves weights, not random state), the segment memory (and
    where its ring buffer starts) aside.
    """
    weights = {id(w) for w in model.weights}
    for layer in getattr(model, "segment_memories", []):
        weights.update(id(v) for v in (layer.memory, layer.start) if v is not None)
    return [v for v in model.variables if id(v) not in weights]


def _batcher_state(batcher, plan=None):
    """The batcher's geometry; with a plan, that of the global stream (of
    which `batcher` is this process's shard)."""
    if plan is not None and batcher.batch_size != plan.shard_batch_size:
        raise ValueError(
            "`batcher` must be the one `plan.shard(...)` gives this process, "
            f"with {plan.shard_batch_size} rows. Received: batch_size="
            f"{batcher.batch_size} with {plan!r}"
        )
    return {
        "seed": batcher.seed,
        "batch_size": plan.global_batch_size if plan else batcher.batch_size,
        "block_size": batcher.block_size,
        "stream_length": batcher.stream_length,
    }


# What the processes of a data-parallel save wait for together.
_SAVED = "keras_allattn.training.save_training"


def _checkpoint_name(step):
    return f"step_{step:09d}"


def _data_parallel_replicas():
    """`(processes, replicas of this process)` of a running data-parallel
    set-up: torch ranks, JAX processes, a `tf.distribute` strategy's
    replicas ((1, 1) without one)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.process_count(), 1
    if backend == "torch":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), 1
        return 1, 1
    if backend == "tensorflow":
        import tensorflow as tf

        strategy = tf.distribute.get_strategy()
        return 1, strategy.num_replicas_in_sync
    return 1, 1


def _check_plan_given(plan, function):
    """Raises ValueError for a data-parallel run without its plan: each
    process (or replica copy) would read or write only its own rows."""
    if plan is not None:
        return
    processes, replicas = _data_parallel_replicas()
    if processes > 1 or replicas > 1:
        raise ValueError(
            f"`{function}` in a data-parallel run needs `plan=` (the "
            "DataParallelPlan), or the segment memory would hold the rows "
            f"of one replica only. Received: plan=None with {processes} "
            f"process(es), {replicas} replica(s) in this process"
        )


def save_on_first_process(plan, save, path):
    """`save(path)` on the first process of `plan` (or without one); the
    other processes save to a scratch file that is then deleted.

    On JAX with several processes saving takes collective steps (Keras
    creates a variable while it saves, which every process must do
    together), so every process saves; PyTorch ranks need not.

    Args:
        plan: a `DataParallelPlan`, or None.
        save: a function of a path, e.g. `model.save_weights`.
        path: the file the first process writes.

    Returns:
        True on the process that wrote `path`.
    """
    if plan is None or not plan.process_index:
        save(path)
        return True
    if plan.backend == "jax":
        with tempfile.TemporaryDirectory() as scratch:
            save(os.path.join(scratch, os.path.basename(path)))
    return False


def list_checkpoints(directory):
    """The complete checkpoints in `directory`, oldest first.

    Args:
        directory: a checkpoint directory (it may not exist yet).

    Returns:
        A list of `(step, path)` pairs sorted by step.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _CHECKPOINT_NAME.match(name)
        path = os.path.join(directory, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory):
    """The path of the newest checkpoint in `directory`, or None."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1][1] if checkpoints else None


def save_training(model, directory, step, batcher=None, keep=2, plan=None):
    """Saves a checkpoint of step `step` into `directory`.

    The checkpoint is written to a temporary folder and renamed into place,
    so an interrupted save leaves the previous checkpoints intact. Older
    checkpoints beyond the `keep` newest are deleted.

    Data parallel, pass the `plan` and call it in every process (the
    memory rows are gathered from all of them): the first process writes
    the checkpoint, with the memory of every row of the global batch, and
    every process returns once it is complete (so any of them may restore
    it or read it right away).

    Args:
        model: a compiled `keras.Model` (normally an `AllAttentionLM`).
        directory: the checkpoint directory (created if needed).
        step: int >= 0, the global step of the next batch to train on.
        batcher: the `StreamBatcher` that feeds training (this process's
            `plan.shard(...)` with a plan), or None.
        keep: int > 0, how many checkpoints to keep.
        plan: the `DataParallelPlan` of a data-parallel run, or None.

    Returns:
        The path of the new checkpoint (None on the other processes).
    """
    step = check_non_negative("step", step)
    keep = check_positive("keep", keep)
    if model.optimizer is None:
        raise ValueError(
            "The model must be compiled (with its optimizer) before saving a "
            "training checkpoint. Received: model.optimizer=None"
        )
    _check_plan_given(plan, "save_training")
    if plan is not None:
        plan.check_checkpoints()
    sync_jax_state(model)
    batcher_state = None if batcher is None else _batcher_state(batcher, plan)
    memories = None
    if plan is not None:
        memories = plan.global_memories(model)  # every process takes part
        if plan.process_index:
            save_on_first_process(plan, model.save_weights, WEIGHTS_FILE)
            plan.barrier(_SAVED)  # the first process has written it
            return None
    elif hasattr(model, "get_memory"):
        memories = model.get_memory()
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, _checkpoint_name(step))
    partial = os.path.join(directory, f".{_checkpoint_name(step)}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    model.save_weights(os.path.join(partial, WEIGHTS_FILE))
    if memories is not None:
        np.savez(os.path.join(partial, MEMORY_FILE), *memories)
    attended = getattr(model, "attended_spans", None)
    state = {
        "format": FORMAT_VERSION,
        "step": step,
        "optimizer_iterations": int(
            ops.convert_to_numpy(model.optimizer.iterations)
        ),
        "batcher": batcher_state,
        "process_count": plan.process_count if plan else 1,
        "seed_states": [
            np.asarray(ops.convert_to_numpy(v)).tolist()
            for v in _seed_states(model)
        ],
        "attended_spans": None if attended is None else list(attended()),
        "backend": keras.backend.backend(),
    }
    with open(os.path.join(partial, STATE_FILE), "w") as f:
        json.dump(state, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    for _, old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    if plan is not None:
        plan.barrier(_SAVED)
    return final


def restore_training(model, directory, batcher=None, plan=None):
    """Restores the newest checkpoint of `directory` into `model`.

    Restores the weights, the segment memory, the optimizer state, the
    random seed states and the attended memory lengths. Build and
    compile the model exactly as for the run that saved it, restore, then
    train on `batcher.as_dataset(start_step=step)` with the returned step,
    from a `StreamBatcher` with the saved seed (pass it as `batcher` to
    have that checked).

    The process count may differ from the saving run's (the global batch
    may not): data parallel, pass the `plan` in every process, and each
    takes the memory of the rows it reads.

    Args:
        model: the compiled model (same architecture and optimizer).
        directory: a checkpoint directory, or one checkpoint folder.
        batcher: optional `StreamBatcher` of the resumed run (this
            process's `plan.shard(...)` with a plan); a seed or geometry
            of the global stream other than the saved one raises
            ValueError.
        plan: the `DataParallelPlan` of a data-parallel run, or None.

    Returns:
        int, the global step to resume from (the next batch to train on).

    Raises:
        FileNotFoundError: when `directory` holds no checkpoint.
        ValueError: for an uncompiled model, a mismatching batcher, or a
            checkpoint whose state does not fit the model.

    Example:

    >>> model.compile(optimizer=optimizer_from_recipe(recipe), loss=loss)  # doctest: +SKIP
    >>> batcher = StreamBatcher(train_ids, 16, 128, seed=0)  # doctest: +SKIP
    >>> step = restore_training(model, "run/checkpoints", batcher)  # doctest: +SKIP
    >>> dataset = batcher.as_dataset(start_step=step)  # doctest: +SKIP
    """
    _check_plan_given(plan, "restore_training")
    if plan is not None:
        plan.check_checkpoints()  # before anything is restored
    directory = os.fspath(directory)
    if os.path.isfile(os.path.join(directory, STATE_FILE)):
        path = directory
    else:
        path = latest_checkpoint(directory)
    if path is None:
        raise FileNotFoundError(
            f"No training checkpoint in {directory} (expected folders named "
            f"step_NNNNNNNNN holding {STATE_FILE})."
        )
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format {state.get('format')!r}; this "
            f"version reads format {FORMAT_VERSION} (format 1 kept the "
            "segment memory in the weights file)."
        )
    if batcher is not None and state["batcher"] is not None:
        expected = state["batcher"]
        received = _batcher_state(batcher, plan)
        if received != expected:
            raise ValueError(
                f"The StreamBatcher does not match the one of checkpoint "
                f"{path}: saved {expected}. Received: {received}. Build it "
                f"with the saved seed and the same corpus and geometry (the "
                f"global batch, whatever the process count)."
            )
    memories = None
    if hasattr(model, "set_memory"):
        with np.load(os.path.join(path, MEMORY_FILE)) as saved:
            memories = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        _check_memory_rows(memories, model, plan, path, state)
    optimizer = model.optimizer
    if optimizer is None:
        raise ValueError(
            "Compile the model (with the optimizer of the saved run) before "
            "restoring a training checkpoint. Received: model.optimizer=None"
        )
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    sync_jax_state(model)
    model.load_weights(os.path.join(path, WEIGHTS_FILE))
    if memories is not None:
        if plan is None:
            model.set_memory(memories)
        else:
            plan.set_global_memories(model, memories)
    iterations = int(ops.convert_to_numpy(optimizer.iterations))
    if iterations != state["optimizer_iterations"]:
        raise ValueError(
            f"The optimizer state of {path} was not restored: the optimizer "
            f"must be the one of the saved run. Saved iterations "
            f"{state['optimizer_iterations']}. Received: {iterations}"
        )
    seed_states = _seed_states(model)
    if len(seed_states) != len(state["seed_states"]):
        raise ValueError(
            f"{path} holds {len(state['seed_states'])} random seed states, "
            f"the model has {len(seed_states)}: the model differs from the "
            "saved one (e.g. dropout on or off)."
        )
    for variable, value in zip(seed_states, state["seed_states"]):
        variable.assign(np.asarray(value, dtype=variable.dtype))
    spans = state["attended_spans"]
    layers = getattr(model, "attention_layers", None)
    if spans is not None and layers is not None:
        for layer, span in zip(layers, spans):
            layer.set_attended_span(span)
    return state["step"]


def _check_memory_rows(memories, model, plan, path, state):
    """Raises ValueError unless the saved memory has a row per stream of
    this run's global batch (before anything is restored)."""
    saved_processes = state.get("process_count", 1)
    saved_rows = len(memories[0]) if memories else 0
    rows = plan.global_batch_size if plan else model.batch_size
    if saved_rows != rows:
        processes = plan.process_count if plan else 1
        hint = (
            "" if plan else " In a data-parallel run pass `plan=` (each "
            "process then takes its own rows of the saved memory)."
        )
        raise ValueError(
            f"{path} holds the segment memory of {saved_rows} streams (a "
            f"global batch of {saved_rows}, written by {saved_processes} "
            f"process(es)); this run's global batch is {rows}, on "
            f"{processes} process(es). A run resumes with the global batch "
            f"it was saved with, on any number of processes.{hint} "
            f"Received: batch_size={rows}"
        )


class TrainingCheckpoint(keras.callbacks.Callback):
    """Saves a resumable checkpoint every `every_steps` training steps.

    Steps count from `dataset.start_step` (the global step of the data
    stream) across epochs, like `ResetMemoryOnRestart`. A checkpoint is
    also written when training ends, unless the last step was just saved.
    Resume with `restore_training` (see there).

    Args:
        directory: the checkpoint directory.
        every_steps: int > 0; a checkpoint after every global step that is
            a multiple of it.
        dataset: the `StreamDataset` passed to `fit` (or its
            `StreamBatcher`, then steps count from 0).
        keep: int > 0, how many of the newest checkpoints to keep.
        plan: the `DataParallelPlan` of a data-parallel run (the callback
            then runs in every process, and the first writes), or None.

    Example:

    >>> dataset = batcher.as_dataset(start_step=step)  # doctest: +SKIP
    >>> model.fit(dataset, steps_per_epoch=1000, epochs=10, callbacks=[
    ...     ResetMemoryOnRestart(dataset),
    ...     TrainingCheckpoint("run/checkpoints", 1000, dataset)])  # doctest: +SKIP
    """

    def __init__(self, directory, every_steps, dataset, keep=2, plan=None):
        super().__init__()
        self.plan = plan
        self.directory = os.fspath(directory)
        self.every_steps = check_positive("every_steps", every_steps)
        self.keep = check_positive("keep", keep)
        if isinstance(dataset, StreamDataset):
            self.batcher, self.start_step = dataset.batcher, dataset.start_step
        elif isinstance(dataset, StreamBatcher):
            self.batcher, self.start_step = dataset, 0
        else:
            raise ValueError(
                "`dataset` must be a StreamDataset or a StreamBatcher. "
                f"Received: dataset={dataset!r}"
            )
        self.step = self.start_step
        self.last_saved = None

    def on_train_begin(self, logs=None):
        self.step = self.start_step

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every_steps == 0:
            self.save()

    def on_train_end(self, logs=None):
        if self.last_saved != self.step:
            self.save()

    def save(self):
        """Saves the checkpoint of the current step; returns its path."""
        path = save_training(
            self.model, self.directory, self.step, self.batcher, self.keep,
            plan=self.plan,
        )
        self.last_saved = self.step
        return path
