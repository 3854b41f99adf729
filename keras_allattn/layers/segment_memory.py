import keras
import numpy as np
from keras import ops

from keras_allattn.ops.kernel_settings import env_flag
from keras_allattn.utils import check_positive
from keras_allattn.utils import check_shape

# On PyTorch the segment memory is a ring buffer unless this is off (see
# `SegmentMemory`).
TORCH_RING_ENV = "KERAS_ALLATTN_TORCH_RING"
_TORCH_RING_ROWS = []


def ring_storage(backend=None):
    """Whether `SegmentMemory` stores its rows as a ring buffer on `backend`
    (default: Keras's): always on JAX, never on TensorFlow; on PyTorch
    unless the environment variable `KERAS_ALLATTN_TORCH_RING` is off
    (1/true/yes/on or 0/false/no/off, default on: on an H200 the compiled
    enwik8_small step at adaptive spans ~1024 ran 158,223 tokens/s with the
    ring against 153,078 rotating the memory in the same call, and fixed
    1024 171,426 against 171,541 in another). Read when a memory is
    built."""
    backend = backend or keras.backend.backend()
    if backend == "jax":
        return True
    if backend == "torch":
        return env_flag(TORCH_RING_ENV, True)
    return False


def _torch_ring_rows():
    """The PyTorch operator `keras_allattn::ring_rows(buffer, read, write,
    rows)`: returns `buffer[:, read]`, then writes `rows` into
    `buffer[:, write]` in place. One operator that mutates the buffer:
    inductor then writes a compiled step's buffer (a graph input) in place,
    where an indexed write into a buffer the step also reads made it copy
    the whole buffer (seen on the CPU)."""
    if not _TORCH_RING_ROWS:
        import torch

        @torch.library.custom_op("keras_allattn::ring_rows", mutates_args=("buffer",))
        def ring_rows(buffer: torch.Tensor, read: torch.Tensor,
                      write: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            memory = buffer.index_select(1, read)
            buffer.index_copy_(1, write, rows)
            return memory

        @ring_rows.register_fake
        def _(buffer, read, write, rows):
            return buffer.new_empty((buffer.shape[0], read.shape[0], buffer.shape[2]))

        _TORCH_RING_ROWS.append(ring_rows)
    return _TORCH_RING_ROWS[0]


@keras.saving.register_keras_serializable(package="keras_allattn")
class SegmentMemory(keras.layers.Layer):
    """The segment memory of one layer, carried from batch to batch.

    Holds, for each of `batch_size` streams, the inputs of its attention
    layer for the last `memory_length` tokens, in a non-trainable variable.
    Each call returns the memory as it was before the call and stores the
    next one (the last `memory_length` rows of `[memory; inputs]`, gradients
    stopped). This is how the memory crosses batches inside `fit`,
    compiled or not; consecutive batches must therefore continue the same
    streams row by row.

    The memory is state, not a weight: it is in `layer.variables` (so the
    backends' training loops carry it from step to step) but not in
    `layer.weights`, so `count_params()`, `get_weights()`, `.keras` files
    and `save_weights()` leave it out, and a loaded layer starts from zero
    memory. `snapshot()` and `restore()` keep it aside and put it back
    (what `AllAttentionLM` does around `evaluate` and `predict`, and the
    training checkpoints through `get_memory()` and `set_memory()`).

    Storage. On JAX and PyTorch the variable is a ring buffer of
    `capacity` rows (the memory length plus the rows of the block the layer
    was built with): a call writes only its rows, in place, where the
    oldest ones were (an int32 `start` variable says where the oldest row
    is), and reads the rows it returns with one gather, instead of
    rewriting every row of `[memory; inputs]` (at the enwik8 geometry, 512
    MiB a layer a step). On TensorFlow the variable holds the rows oldest
    first and a call rewrites it (`start` is None): its distribution
    strategies keep one copy per replica. PyTorch does the same where
    `KERAS_ALLATTN_TORCH_RING` is off (`ring_storage`). On PyTorch's ring,
    training calls (grad mode on: eager or compiled steps; under
    `stateless_call`, into the memory tensor passed in) write the buffer in
    place with one mutating operator, and other calls (`evaluate`,
    `predict`, shape inference) write a new buffer. On either storage,
    `ordered(rows)` puts rows read from the variable oldest first and
    `set_value(value)` writes rows given oldest first.

    Args:
        batch_size: int, the number of streams (the static batch size).
        memory_length: int, rows kept per stream (the maximum span).
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `(batch_size, M, d)` hidden states of the current block.
        rows: int or None, how many of the most recent rows to return
            (1 to `memory_length`; None: `attended_rows()` where that
            attribute is set, else all of them).

    Returns:
        `(batch_size, rows, d)` the memory before this block, the last
        `rows` rows, oldest first.

    Example:

    >>> memory = SegmentMemory(batch_size=2, memory_length=4)
    >>> x = keras.ops.ones((2, 3, 8))
    >>> tuple(memory(x).shape)
    (2, 4, 8)

    References:
        - [Dai et al., 2019](https://arxiv.org/abs/1901.02860),
          "Transformer-XL", segment-level recurrence.
    """

    def __init__(self, batch_size, memory_length, **kwargs):
        super().__init__(**kwargs)
        self.batch_size = check_positive("batch_size", batch_size)
        self.memory_length = check_positive("memory_length", memory_length)
        # How many rows a call returns when it is not told: None (all), or
        # a function giving the number at call time (`AllAttentionLM` gives
        # each memory its attention layer's attended span).
        self.attended_rows = None

    def build(self, inputs_shape):
        check_shape("inputs", inputs_shape, ("batch_size", "length", "width"))
        if inputs_shape[-1] is None:
            raise ValueError(
                "The width of `inputs` (last axis) must be known to build "
                f"the memory. Received: inputs.shape={tuple(inputs_shape)}"
            )
        # The ring buffer holds the block's rows too (see `_ring_call`).
        self._ring = ring_storage()
        self.capacity = self.memory_length
        if self.ring and inputs_shape[1] is not None:
            self.capacity += inputs_shape[1]
        self.memory = self.add_weight(
            name="memory",
            shape=(self.batch_size, self.capacity, inputs_shape[-1]),
            initializer="zeros",
            trainable=False,
            dtype=self.compute_dtype,
        )
        self.start = None
        if self.ring:
            self.start = self.add_weight(
                name="start", shape=(), initializer="zeros", trainable=False,
                dtype="int32",
            )
        self.built = True

    @property
    def ring(self):
        """Whether the memory variable is a ring buffer (`ring_storage()`
        when the layer was built)."""
        return self._ring if self.built else ring_storage()

    def next_memory(self, memory, inputs):
        """The memory after `inputs`: last rows of `[memory; inputs]`."""
        joined = ops.concatenate([ops.cast(memory, inputs.dtype), inputs], 1)
        return ops.stop_gradient(joined[:, joined.shape[1] - self.memory_length :])

    def call(self, inputs, rows=None):
        check_shape(
            "inputs", inputs.shape, ("batch_size", "length", self.memory.shape[-1])
        )
        batch = inputs.shape[0]
        if batch is not None and batch != self.batch_size:
            raise ValueError(
                f"Every batch must hold `batch_size`={self.batch_size} streams "
                "(the segment memory has one row per stream; batch with "
                f"drop_remainder=True). Received: a batch of size {batch}"
            )
        length = self.memory_length
        if rows is None and self.attended_rows is not None:
            rows = self.attended_rows()
        if rows is None:
            rows = length
        elif isinstance(rows, bool) or not isinstance(rows, int) or not (
            1 <= rows <= length
        ):
            raise ValueError(
                f"`rows` must be None or an int from 1 to memory_length="
                f"{length}. Received: rows={rows!r}"
            )
        if self.ring:
            return self._ring_call(inputs, rows)
        memory = ops.cast(self.memory, inputs.dtype)
        recent = memory[:, length - rows :]
        if keras.backend.backend() == "torch":
            # torch assigns in place: keep the returned rows apart from the
            # variable's storage before overwriting it (those rows only: a
            # slice of a copy of all of them would keep the whole copy alive
            # as long as the slice, e.g. saved for a recomputed layer's
            # backward).
            recent = ops.copy(recent)
        self.memory.assign(
            ops.cast(self.next_memory(memory, inputs), self.memory.dtype)
        )
        return recent

    def _ring_call(self, inputs, rows):
        """`call` on the ring buffer.

        The buffer holds the last `capacity` rows of every stream, the
        oldest at `start`: `memory_length` rows and, built from a block of
        M rows, M more. A block's rows go where the oldest ones are and
        `start` moves on by M; the `rows` rows before the block are still
        in the buffer after the write as long as `rows + M <= capacity`
        (always, for blocks no longer than the one the layer was built
        with). On JAX they are read after the write: then XLA updates the
        buffer in place, where a read before the write (a longer block)
        makes it copy the whole buffer first. On PyTorch one operator reads
        and then writes (`_torch_ring_rows`).
        """
        capacity = self.capacity
        count = inputs.shape[1]
        kept = min(count, capacity)
        start = ops.convert_to_tensor(self.start)
        read = (start - rows + ops.arange(rows, dtype="int32")) % capacity
        write = (start + (count - kept) + ops.arange(kept, dtype="int32")) % capacity
        new = ops.cast(ops.stop_gradient(inputs[:, count - kept :]), self.memory.dtype)
        buffer = self.memory.value
        if keras.backend.backend() == "torch":
            import torch

            read, write = read.long(), write.long()
            if torch.is_grad_enabled() and "meta" not in (
                buffer.device.type, inputs.device.type
            ):
                # In place (a training step, eager or compiled).
                memory = _torch_ring_rows()(buffer, read, write, new.detach())
            else:
                memory = buffer.index_select(1, read)
                self.memory.assign(buffer.index_copy(1, write, new))
        else:
            if rows + count > capacity:
                memory = ops.take(buffer, read, axis=1)
                buffer = buffer.at[:, write].set(new, unique_indices=True)
            else:
                buffer = buffer.at[:, write].set(new, unique_indices=True)
                memory = ops.take(buffer, read, axis=1)
            self.memory.assign(buffer)
        self.start.assign((start + count) % capacity)
        return ops.cast(memory, inputs.dtype)

    def ordered(self, rows):
        """`rows` of this memory's variable (a NumPy array `(streams,
        capacity, d)`, any streams) as `(streams, memory_length, d)`, oldest
        row first (as they are unless the variable is a ring buffer)."""
        rows = np.asarray(rows)
        if self.start is None:
            return rows
        start = int(ops.convert_to_numpy(self.start))
        return np.roll(rows, -start, axis=1)[:, self.capacity - self.memory_length :]

    def set_value(self, value):
        """Sets the memory of every stream to `value` `(batch_size,
        memory_length, d)`, oldest row first."""
        if self.start is not None:
            extra = self.capacity - self.memory_length
            value = ops.cast(value, self.memory.dtype)
            if extra:
                older = ops.zeros((self.batch_size, extra, self.memory.shape[-1]),
                                  self.memory.dtype)
                value = ops.concatenate([older, value], 1)
            self.start.assign(0)
        self.memory.assign(value)

    def reset(self):
        """Zeroes the memory of every stream."""
        self.memory.assign(ops.zeros(self.memory.shape, self.memory.dtype))
        if self.start is not None:
            self.start.assign(0)

    @property
    def weights(self):
        # The memory is activations of the streams, not a parameter.
        return []

    def save_own_variables(self, store):
        """Saves nothing: the memory is state, not a weight."""

    def load_own_variables(self, store):
        """Zeroes the memory: a loaded model starts its streams afresh.

        Files written before the memory was left out hold it under "0";
        it is ignored as well.
        """
        if self.built:
            self.reset()

    def snapshot(self):
        """The current memory, unaffected by later updates (see `restore`).

        Under a `tf.distribute` strategy, one value per replica (each
        replica holds the memory of its own rows). For a ring buffer, the
        pair of the buffer and its `start`.
        """
        value = self.memory.value
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            if isinstance(value, tf.distribute.DistributedValues):
                local = value.distribute_strategy.experimental_local_results
                return [tf.identity(part) for part in local(value)]
        if keras.backend.backend() != "jax":  # JAX's are immutable
            value = ops.copy(value)
        if self.start is None:
            return value
        return (value, ops.copy(self.start.value))

    def restore(self, snapshot):
        """Puts back a memory taken with `snapshot()`."""
        if isinstance(snapshot, list):
            value = self.memory.value
            local = value.distribute_strategy.experimental_local_results
            for part, kept in zip(local(value), snapshot):
                part.assign(kept)
            return
        if isinstance(snapshot, tuple):
            snapshot, start = snapshot
            self.start.assign(start)
        self.memory.assign(snapshot)

    def compute_output_spec(self, inputs, rows=None):
        if rows is None and self.attended_rows is not None:
            rows = self.attended_rows()
        rows = self.memory_length if rows is None else rows
        return keras.KerasTensor(
            (self.batch_size, rows, inputs.shape[-1]), dtype=inputs.dtype
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {"batch_size": self.batch_size, "memory_length": self.memory_length}
        )
        return config
