"""Stream batching as the reference trains: contiguous rows, carried memory.

The corpus is cut into `batch_size` contiguous streams, one per batch row.
Consecutive batches continue every row, so the segment memory a model keeps
after batch `b` is the right context for batch `b + 1`. When a pass over the
streams ends, the next pass starts at a random offset below `block_size`
and the segment memory must be zeroed.
"""

import bisect
import copy

import keras
import numpy as np

from keras_allattn.utils import check_non_negative
from keras_allattn.utils import check_positive
from keras_allattn.utils import sync_jax_state


def as_token_array(tokens, name="tokens"):
    """Validates a 1-D array of non-negative token ids and returns it as int32.

    Args:
        tokens: array-like of integer token ids.
        name: the argument name used in error messages.

    Returns:
        A 1-D int32 numpy array (the input itself, without copy, when it
        already is one).
    """
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ValueError(
            f"`{name}` must be a 1-D array of token ids. Received: {name} with "
            f"shape {array.shape}"
        )
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"`{name}` must hold integer token ids. Received: {name} with "
            f"dtype {array.dtype}"
        )
    check_token_range(array, np.iinfo(np.int32).max + 1, name, "2**31")
    if array.dtype == np.int32:
        return array
    return array.astype(np.int32)


def check_token_range(array, limit, name="tokens", limit_name=None):
    """Raises ValueError unless every id of `array` lies in [0, limit).

    The message names the argument, the first bad id and its position
    (`tokens[17]=300`), and how many ids are out of range.

    Args:
        array: 1-D numpy array of integer token ids.
        limit: int, the first id out of range (e.g. the vocabulary size).
        name: the argument name used in the message.
        limit_name: how to write `limit` in the message (default its value).
    """
    if not array.size:
        return
    bad = np.flatnonzero((array < 0) | (array >= limit))
    if not bad.size:
        return
    first = int(bad[0])
    more = f" ({bad.size:,} ids out of range)" if bad.size > 1 else ""
    raise ValueError(
        f"`{name}` must hold token ids in [0, {limit_name or limit}). "
        f"Received: {name}[{first}]={int(array[first])}{more}"
    )


class StreamBatcher:
    """Cuts a token array into `batch_size` streams and serves blocks of them.

    Row `r` of every batch reads the stream starting at token
    `r * stream_length`, where `stream_length = len(tokens) // batch_size`;
    the last `len(tokens) % batch_size` tokens belong to no stream (see
    `dropped_tokens`). Batch `step` has inputs `streams[:, p : p + M]` and
    targets `streams[:, p + 1 : p + M + 1]` (`M = block_size`), and the next
    batch continues at `p + M`. A pass ends when a whole block no longer
    fits; the next pass starts at a random offset in `[0, M)` and the
    segment memory must then be zeroed. The first pass starts at 0.

    This is the reference's loop exactly, so the batches form one endless
    sequence indexed by a global `step`. Which steps start a pass is a pure
    function of `seed`, so any copy of the batcher (a data-loading worker
    process, a resumed run with the same seed) agrees on them.

    Args:
        tokens: 1-D array of token ids (converted to int32).
        batch_size: number of streams (rows per batch).
        block_size: tokens per row per batch, `M`.
        seed: seed of the restart offsets; `None` draws one (see `seed`).

    Example:

    >>> batcher = StreamBatcher(np.arange(100), batch_size=2, block_size=4)
    >>> inputs, targets = batcher.batch(0)
    >>> inputs.tolist(), targets.tolist()
    ([[0, 1, 2, 3], [50, 51, 52, 53]], [[1, 2, 3, 4], [51, 52, 53, 54]])
    >>> batcher.batch(1)[0].tolist()
    [[4, 5, 6, 7], [54, 55, 56, 57]]
    """

    def __init__(self, tokens, batch_size, block_size, seed=None):
        self.batch_size = check_positive("batch_size", batch_size)
        self.block_size = check_positive("block_size", block_size)
        tokens = as_token_array(tokens)
        self.stream_length = len(tokens) // self.batch_size
        if self.stream_length < 2 * self.block_size:
            raise ValueError(
                "`tokens` is too short: each of the batch_size="
                f"{self.batch_size} streams needs at least 2 * block_size = "
                f"{2 * self.block_size} tokens so that every pass holds a "
                f"whole block. Received: tokens of length {len(tokens)}"
            )
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**63))
        self.seed = check_non_negative("seed", seed)
        self.dropped_tokens = len(tokens) - self.batch_size * self.stream_length
        # (batch_size, stream_length) view of the tokens, no copy.
        self.streams = tokens[: self.batch_size * self.stream_length].reshape(
            self.batch_size, self.stream_length
        )
        # Offsets and first global steps of the passes seen so far. Both
        # lists are extended copy-on-write (a new list, then rebinding) so
        # that threads reading batches never see a half-extended one.
        self._pass_offsets = [0]
        self._pass_starts = [0]

    def pass_offset(self, pass_index):
        """Position in the streams where pass `pass_index` starts.

        Args:
            pass_index: non-negative pass number.

        Returns:
            0 for the first pass, else an int in `[0, block_size)` drawn
            from `(seed, pass_index)`.
        """
        pass_index = check_non_negative("pass_index", pass_index)
        offsets = self._pass_offsets
        if pass_index >= len(offsets):
            offsets = offsets + [
                int(
                    np.random.default_rng((self.seed, p)).integers(
                        self.block_size
                    )
                )
                for p in range(len(offsets), pass_index + 1)
            ]
            self._pass_offsets = offsets
        return offsets[pass_index]

    def batches_in_pass(self, pass_index):
        """Number of batches of pass `pass_index`.

        Args:
            pass_index: non-negative pass number.

        Returns:
            `(stream_length - offset - 1) // block_size`: the blocks that fit
            with their one-token-shifted targets.
        """
        offset = self.pass_offset(pass_index)
        return (self.stream_length - offset - 1) // self.block_size

    def locate(self, step):
        """Where batch `step` lies.

        Args:
            step: non-negative global batch index.

        Returns:
            `(pass_index, position)`: the pass and the first stream position
            of the batch's inputs.
        """
        pass_index, position, _ = self._locate(step)
        return pass_index, position

    def _locate(self, step):
        """`(pass_index, position, first step of the pass)` of batch `step`."""
        step = check_non_negative("step", step)
        starts = self._pass_starts_beyond(step)
        pass_index = bisect.bisect_right(starts, step) - 1
        position = self.pass_offset(pass_index) + self.block_size * (
            step - starts[pass_index]
        )
        return pass_index, position, starts[pass_index]

    def batch(self, step):
        """Batch number `step` of the endless stream.

        Args:
            step: non-negative global batch index.

        Returns:
            `(inputs, targets)`, int32 arrays of shape
            `(batch_size, block_size)`; `targets` is `inputs` shifted by one
            token along each stream.
        """
        _, position = self.locate(step)
        end = position + self.block_size
        inputs = np.ascontiguousarray(self.streams[:, position:end])
        targets = np.ascontiguousarray(self.streams[:, position + 1 : end + 1])
        return inputs, targets

    def _pass_starts_beyond(self, step):
        """First steps of the passes, at least up to one after `step`."""
        starts = self._pass_starts
        if starts[-1] <= step:
            starts = list(starts)
            while starts[-1] <= step:
                starts.append(
                    starts[-1] + self.batches_in_pass(len(starts) - 1)
                )
            self._pass_starts = starts
        return starts

    def is_pass_start(self, step):
        """Whether batch `step` starts a pass: memory must be zero before it.

        Args:
            step: non-negative global batch index.

        Returns:
            True for step 0 and for the first batch of every later pass.
        """
        _, _, pass_start = self._locate(step)
        return step == pass_start

    def memory_reset_steps(self, num_steps):
        """The steps below `num_steps` before which memory must be zeroed.

        Args:
            num_steps: number of batches considered.

        Returns:
            A sorted int64 array of the pass starts in `[0, num_steps)`,
            step 0 included.
        """
        num_steps = check_non_negative("num_steps", num_steps)
        if num_steps == 0:
            return np.zeros(0, np.int64)
        starts = np.asarray(self._pass_starts_beyond(num_steps - 1), np.int64)
        return starts[starts < num_steps]

    def iterate(self, num_steps, start_step=0):
        """Yields `num_steps` batches with their memory-reset flag.

        Args:
            num_steps: number of batches to yield.
            start_step: global index of the first batch.

        Yields:
            `(inputs, targets, reset)` where `reset` is `is_pass_start(step)`:
            zero the segment memory before using this batch.
        """
        num_steps = check_non_negative("num_steps", num_steps)
        start_step = check_non_negative("start_step", start_step)
        for step in range(start_step, start_step + num_steps):
            inputs, targets = self.batch(step)
            yield inputs, targets, self.is_pass_start(step)

    def shard(self, index, count):
        """The rows of replica `index` out of `count`, for data parallelism.

        Replica `index` reads the `batch_size // count` consecutive streams
        starting at row `index * batch_size // count`, so that the `count`
        shards of every batch, stacked in order, are this batcher's batch.
        Passes, offsets and restarts stay those of this batcher (same
        `seed`, same stream length), so every replica zeroes its memory
        at the same steps. Each process of a multi-process run (a torch
        DDP rank, a JAX process) reads its own shard and keeps the segment
        memory of its own rows.

        Args:
            index: int in `[0, count)`, this replica's (or process's) rank.
            count: int, the number of replicas; it must divide `batch_size`.

        Returns:
            A `StreamBatcher` with `batch_size // count` rows.

        Example:

        >>> batcher = StreamBatcher(np.arange(100), batch_size=4, block_size=4)
        >>> batcher.shard(1, 2).batch(0)[0].tolist()
        [[50, 51, 52, 53], [75, 76, 77, 78]]
        """
        count = check_positive("count", count)
        index = check_non_negative("index", index)
        if index >= count or self.batch_size % count:
            raise ValueError(
                "`count` must divide batch_size and `index` lie in [0, count). "
                f"Received: index={index}, count={count}, "
                f"batch_size={self.batch_size}"
            )
        rows = self.batch_size // count
        shard = copy.copy(self)  # the pass lists are copy-on-write: shareable
        shard.batch_size = rows
        shard.streams = self.streams[index * rows : (index + 1) * rows]
        return shard

    def as_dataset(self, start_step=0):
        """The stream as a `keras.utils.PyDataset` for `model.fit`.

        Args:
            start_step: global index of the dataset's first batch (to resume
                a run).

        Returns:
            A `StreamDataset`. It is endless, like the reference's training
            loop, so pass `steps_per_epoch` to `fit`; add a
            `ResetMemoryOnRestart(dataset)` callback to zero the memory at
            each pass start.
        """
        return StreamDataset(self, start_step=start_step)


class StreamDataset(keras.utils.PyDataset):
    """An endless `PyDataset` over a `StreamBatcher`, for `model.fit`.

    Item `i` is `batcher.batch(start_step + i)`: an `(inputs, targets)` pair
    of int32 arrays of shape `(batch_size, block_size)`. `num_batches` is
    `None` (an endless dataset): `fit` needs `steps_per_epoch`, and Keras
    then keeps one iterator across epochs, so epoch boundaries do not
    disturb the streams. A pass holds `batcher.batches_in_pass(p)` batches,
    which differs by at most one between passes.

    It is read by the main process alone (`workers=1`): Keras's parallel
    enqueuer discards the batches it prefetched when an epoch ends, which
    would skip blocks of every stream. Batching costs far less than a
    training step anyway (see `benchmarks/batching.py`).

    Args:
        batcher: the `StreamBatcher`.
        start_step: global index of item 0.

    Example:

    >>> batcher = StreamBatcher(tokens, batch_size=64, block_size=512)  # doctest: +SKIP
    >>> dataset = batcher.as_dataset()  # doctest: +SKIP
    >>> model.fit(dataset, steps_per_epoch=1000, epochs=10,
    ...           callbacks=[ResetMemoryOnRestart(dataset)])  # doctest: +SKIP
    """

    def __init__(self, batcher, start_step=0):
        super().__init__()
        if not isinstance(batcher, StreamBatcher):
            raise ValueError(
                "`batcher` must be a StreamBatcher. Received: "
                f"batcher={batcher!r}"
            )
        self.batcher = batcher
        self.start_step = check_non_negative("start_step", start_step)

    @property
    def num_batches(self):
        """`None`: the stream is endless."""
        return None

    def __getitem__(self, index):
        return self.batcher.batch(self.start_step + index)


class ResetMemoryOnRestart(keras.callbacks.Callback):
    """Zeroes the model's segment memory whenever the data stream restarts.

    Before each training batch that starts a pass of the stream (the first
    batch of `fit` included when it is a pass start, as step 0 is) it calls
    `model.reset_memory()`, the model's method that zeroes its segment
    memories. Global steps are counted from the dataset's `start_step`,
    continuing across epochs, matching `StreamDataset`'s endless iterator.

    On the JAX backend `fit` holds the variables in `model._jax_state`
    between steps; the callback first calls `model.jax_state_sync()` so the
    reset lands on the live values, and Keras reloads them before the next
    step.

    It needs `steps_per_execution=1`: with several steps per call a restart
    inside a call could not be honoured, so that raises.

    Args:
        stream: the `StreamDataset` passed to `fit`, or a `StreamBatcher`
            (then steps count from 0).

    Example:

    >>> dataset = StreamBatcher(tokens, 64, 512).as_dataset()  # doctest: +SKIP
    >>> model.fit(dataset, steps_per_epoch=1000, epochs=10,
    ...           callbacks=[ResetMemoryOnRestart(dataset)])  # doctest: +SKIP
    """

    def __init__(self, stream):
        super().__init__()
        if isinstance(stream, StreamDataset):
            self.batcher, self.start_step = stream.batcher, stream.start_step
        elif isinstance(stream, StreamBatcher):
            self.batcher, self.start_step = stream, 0
        else:
            raise ValueError(
                "`stream` must be a StreamDataset or a StreamBatcher. "
                f"Received: stream={stream!r}"
            )
        self._epoch_start = self.start_step
        self._next_step = self.start_step

    def on_train_begin(self, logs=None):
        if getattr(self.model, "steps_per_execution", 1) != 1:
            raise ValueError(
                "ResetMemoryOnRestart needs steps_per_execution=1. Received: "
                f"steps_per_execution={self.model.steps_per_execution}"
            )
        if not callable(getattr(self.model, "reset_memory", None)):
            raise ValueError(
                "ResetMemoryOnRestart needs a model with a `reset_memory()` "
                f"method. Received: model={self.model!r}"
            )
        self._next_step = self.start_step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self._next_step

    def on_train_batch_begin(self, batch, logs=None):
        if self.batcher.is_pass_start(self._epoch_start + batch):
            sync_jax_state(self.model)
            self.model.reset_memory()

    def on_train_batch_end(self, batch, logs=None):
        self._next_step = self._epoch_start + batch + 1
