"""`DataParallelTrainer`: the training loop for the runs `fit` cannot do."""

import contextlib
import time

import keras

from keras_allattn.distribution.plan import engine


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
    is data parallel already: there is no loop here. The step itself is
    the engine's `TrainStep` (`tensorflow_engine`, `torch_engine`).

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
        strategy = plan.strategy if plan is not None else None
        with strategy.scope() if strategy else contextlib.nullcontext():
            model.optimizer.build(model.trainable_variables)
        self._step = engine().TrainStep(model, plan)

    def train_step(self, inputs, targets):
        """One optimizer step on the batch this process reads.

        Args:
            inputs, targets: int32 arrays, the rows `plan.shard(batcher)`
                serves (per rank on torch, the global batch on TensorFlow).

        Returns:
            float, the loss of the step averaged over all replicas.
        """
        loss = self._step(inputs, targets)
        if self.model.update_span_trimming():
            self._step.retrace()  # the attended lengths are traced in
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
