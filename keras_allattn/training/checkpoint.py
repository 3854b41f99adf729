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
"""

import json
import os
import re
import shutil

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
    out (Keras saves weights, not random state), the segment memory aside.
    """
    weights = {id(w) for w in model.weights}
    weights.update(
        id(layer.memory) for layer in getattr(model, "segment_memories", [])
    )
    return [v for v in model.variables if id(v) not in weights]


def _batcher_state(batcher):
    return {
        "seed": batcher.seed,
        "batch_size": batcher.batch_size,
        "block_size": batcher.block_size,
        "stream_length": batcher.stream_length,
    }


def _checkpoint_name(step):
    return f"step_{step:09d}"


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


def save_training(model, directory, step, batcher=None, keep=2):
    """Saves a checkpoint of step `step` into `directory`.

    The checkpoint is written to a temporary folder and renamed into place,
    so an interrupted save leaves the previous checkpoints intact. Older
    checkpoints beyond the `keep` newest are deleted.

    Args:
        model: a compiled `keras.Model` (normally an `AllAttentionLM`).
        directory: the checkpoint directory (created if needed).
        step: int >= 0, the global step of the next batch to train on.
        batcher: the `StreamBatcher` that feeds training, or None.
        keep: int > 0, how many checkpoints to keep.

    Returns:
        The path of the new checkpoint.
    """
    step = check_non_negative("step", step)
    keep = check_positive("keep", keep)
    if model.optimizer is None:
        raise ValueError(
            "The model must be compiled (with its optimizer) before saving a "
            "training checkpoint. Received: model.optimizer=None"
        )
    sync_jax_state(model)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, _checkpoint_name(step))
    partial = os.path.join(directory, f".{_checkpoint_name(step)}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    model.save_weights(os.path.join(partial, WEIGHTS_FILE))
    if hasattr(model, "get_memory"):
        np.savez(os.path.join(partial, MEMORY_FILE), *model.get_memory())
    attended = getattr(model, "attended_spans", None)
    state = {
        "format": FORMAT_VERSION,
        "step": step,
        "optimizer_iterations": int(
            ops.convert_to_numpy(model.optimizer.iterations)
        ),
        "batcher": None if batcher is None else _batcher_state(batcher),
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
    return final


def restore_training(model, directory, batcher=None):
    """Restores the newest checkpoint of `directory` into `model`.

    Restores the weights, the segment memory, the optimizer state, the
    random seed states and the attended memory lengths. Build and
    compile the model exactly as for the run that saved it, restore, then
    train on `batcher.as_dataset(start_step=step)` with the returned step,
    from a `StreamBatcher` with the saved seed (pass it as `batcher` to
    have that checked).

    Args:
        model: the compiled model (same architecture and optimizer).
        directory: a checkpoint directory, or one checkpoint folder.
        batcher: optional `StreamBatcher` of the resumed run; a seed or
            geometry other than the saved one raises ValueError.

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
        received = _batcher_state(batcher)
        if received != expected:
            raise ValueError(
                f"The StreamBatcher does not match the one of checkpoint "
                f"{path}: saved {expected}. Received: {received}. Build it "
                f"with the saved seed and the same corpus and geometry."
            )
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
    if hasattr(model, "set_memory"):
        with np.load(os.path.join(path, MEMORY_FILE)) as saved:
            model.set_memory([saved[f"arr_{i}"] for i in range(len(saved.files))])
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

    Example:

    >>> dataset = batcher.as_dataset(start_step=step)  # doctest: +SKIP
    >>> model.fit(dataset, steps_per_epoch=1000, epochs=10, callbacks=[
    ...     ResetMemoryOnRestart(dataset),
    ...     TrainingCheckpoint("run/checkpoints", 1000, dataset)])  # doctest: +SKIP
    """

    def __init__(self, directory, every_steps, dataset, keep=2):
        super().__init__()
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
            self.model, self.directory, self.step, self.batcher, self.keep
        )
        self.last_saved = self.step
        return path
