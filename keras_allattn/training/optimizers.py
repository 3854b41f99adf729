"""The reference's optimizer and learning-rate schedule for the char recipes."""

import keras
from keras import ops

from keras_allattn.utils import check_non_negative
from keras_allattn.utils import check_number
from keras_allattn.utils import check_positive

# Added to the gradient norm before dividing by it, as in the reference.
_NORM_EPSILON = 1e-10


def clip_gradients(optimizer, gradients):
    """`gradients` clipped as `optimizer`'s Keras clipping options say.

    The clipping Keras's optimizers apply at the start of `apply`, for a
    loop that must clip a gradient it has combined itself (the sum over
    replicas) before handing it on: `clipnorm` scales each tensor `g` by
    `clipnorm / max(||g||, clipnorm)`; else `global_clipnorm` scales all of
    them by `global_clipnorm / max(norm, global_clipnorm)`, `norm` their
    joint norm (NaN everywhere if it is not finite); else `clipvalue`
    clips every element to `[-clipvalue, clipvalue]`. `None` gradients
    stay `None`.

    Args:
        optimizer: a `keras.optimizers.Optimizer`.
        gradients: list of tensors (or `None`), one per variable.

    Returns:
        The list of clipped gradients (`gradients` itself without clipping
        options).
    """
    if optimizer.clipnorm and optimizer.clipnorm > 0:
        clip = optimizer.clipnorm
        return [
            None if g is None
            else g * clip / ops.maximum(ops.sqrt(ops.sum(ops.square(g))), clip)
            for g in gradients
        ]
    if optimizer.global_clipnorm and optimizer.global_clipnorm > 0:
        clip = optimizer.global_clipnorm
        norm = ops.sqrt(ops.sum(ops.stack(
            [ops.sum(ops.square(g)) for g in gradients if g is not None]
        )))
        # `norm - norm` is 0 for a finite norm and NaN otherwise.
        scale = clip * ops.minimum(1.0 / norm, 1.0 / clip) + (norm - norm)
        return [None if g is None else g * scale for g in gradients]
    if optimizer.clipvalue and optimizer.clipvalue > 0:
        clip = optimizer.clipvalue
        return [None if g is None else ops.clip(g, -clip, clip) for g in gradients]
    return gradients


@keras.saving.register_keras_serializable(package="keras_allattn")
class AdagradClip(keras.optimizers.Optimizer):
    """Adagrad with per-tensor gradient clipping, as in the reference code.

    For every variable with gradient `g`, at every step:

    - `norm = ||g||`; if `grad_clip > 0` and `norm > grad_clip`, this
      tensor's learning rate is scaled by `grad_clip / (norm + 1e-10)`
      (the gradient itself is not changed);
    - `accumulator += g**2` (the unclipped gradient; the accumulator starts
      at `initial_accumulator_value`, 0 in the reference);
    - `variable -= lr * g / (sqrt(accumulator) + epsilon)`.

    This differs from `keras.optimizers.Adagrad` (accumulator from 0.1,
    epsilon inside the square root) and from its `clipnorm`, which clips the
    gradient that enters the accumulator as well.

    Args:
        learning_rate: a float, a
            `keras.optimizers.schedules.LearningRateSchedule` (such as
            `LinearWarmup`), or a callable with no arguments. The recipes use
            0.07.
        grad_clip: float, the per-tensor gradient-norm threshold; 0 turns
            clipping off. The char-level recipes use 0.03.
        initial_accumulator_value: float >= 0, the accumulators' start.
        epsilon: float > 0, added to `sqrt(accumulator)`.
        **kwargs: the base optimizer's arguments (`weight_decay`, `use_ema`,
            `loss_scale_factor`, `gradient_accumulation_steps`, `name`, ...).
            Keras's own `clipnorm`, `clipvalue` and `global_clipnorm` are
            applied before this update if given.

    Example:

    >>> schedule = LinearWarmup(0.07, warmup_steps=32000)
    >>> optimizer = AdagradClip(schedule, grad_clip=0.03)

    References:
        - [Duchi et al., 2011](https://jmlr.org/papers/v12/duchi11a.html)
        - [Sukhbaatar et al., 2019](https://arxiv.org/abs/1907.01470)
    """

    def __init__(
        self,
        learning_rate=0.07,
        grad_clip=0.0,
        initial_accumulator_value=0.0,
        epsilon=1e-10,
        name="adagrad_clip",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.grad_clip = check_number("grad_clip", grad_clip, 0.0)
        self.initial_accumulator_value = check_number(
            "initial_accumulator_value", initial_accumulator_value, 0.0
        )
        self.epsilon = check_number("epsilon", epsilon, 0.0, strict=True)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._accumulators = self.add_optimizer_variables(
            var_list,
            "accumulator",
            initializer=keras.initializers.Constant(
                self.initial_accumulator_value
            ),
        )

    def update_step(self, gradient, variable, learning_rate):
        """Applies one update to `variable` from its `gradient`."""
        lr = ops.cast(learning_rate, variable.dtype)
        # The reshape makes sparse gradients (TensorFlow's IndexedSlices of
        # an embedding) dense, summing duplicate rows before the norm and
        # the square; on dense gradients it is free.
        gradient = ops.reshape(
            ops.cast(gradient, variable.dtype), variable.shape
        )
        accumulator = self._accumulators[self._get_variable_index(variable)]
        if self.grad_clip > 0:
            norm = ops.sqrt(ops.sum(ops.square(gradient)))
            lr = lr * ops.where(
                norm > self.grad_clip,
                self.grad_clip / (norm + _NORM_EPSILON),
                ops.ones_like(norm),
            )
        self.assign_add(accumulator, ops.square(gradient))
        self.assign_sub(
            variable,
            ops.divide(
                ops.multiply(lr, gradient),
                ops.add(ops.sqrt(accumulator), self.epsilon),
            ),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "grad_clip": self.grad_clip,
                "initial_accumulator_value": self.initial_accumulator_value,
                "epsilon": self.epsilon,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_allattn")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to a constant rate, optionally dropped later.

    The `k`-th update (`k = 1, 2, ...`) uses
    `learning_rate * min(1, k / warmup_steps)`, times `drop_factor` for
    `k > drop_step`. This is the reference's order: it steps its
    `LambdaLR(lambda s: min(1, s / warmup))` before `optimizer.step()`, so
    its first update already moves the weights, by `learning_rate /
    warmup_steps` (SPEC §4). Keras calls a schedule with the optimizer's
    `iterations` before incrementing it, i.e. with `k - 1` for the `k`-th
    update: `schedule(step)` is the rate of update `step + 1`.

    The recipes train e.g. 450k updates at 0.07 then 30k at 0.007:
    `LinearWarmup(0.07, 32000, drop_step=450000)`.

    Args:
        learning_rate: float > 0, the rate after warm-up.
        warmup_steps: int >= 0, the update that first reaches
            `learning_rate`; 0 means no warm-up.
        drop_step: `None` (no drop) or int > 0, the number of updates
            before the drop: updates `drop_step + 1` and later use the
            lower rate.
        drop_factor: float > 0, the rate multiplier after `drop_step`
            updates (0.1 in the recipes).
        name: string, the schedule's name.

    Call arguments:
        step: the optimizer's iteration count, `k - 1` during the `k`-th
            update.

    Returns:
        The float32 learning rate of update `step + 1`.

    Example:

    >>> schedule = LinearWarmup(0.07, warmup_steps=4, drop_step=10)
    >>> [round(float(schedule(s)), 4) for s in (0, 1, 3, 9, 10)]
    [0.0175, 0.035, 0.07, 0.07, 0.007]

    References:
        - [Sukhbaatar et al., 2019](https://arxiv.org/abs/1907.01470),
          and the reference code's `LambdaLR` warm-up.
    """

    def __init__(
        self,
        learning_rate,
        warmup_steps,
        drop_step=None,
        drop_factor=0.1,
        name="linear_warmup",
    ):
        super().__init__()
        self.learning_rate = check_number(
            "learning_rate", learning_rate, 0.0, strict=True
        )
        self.warmup_steps = check_non_negative("warmup_steps", warmup_steps)
        self.drop_step = (
            None
            if drop_step is None
            else check_positive("drop_step", drop_step)
        )
        self.drop_factor = check_number(
            "drop_factor", drop_factor, 0.0, strict=True
        )
        self.name = name

    def __call__(self, step):
        update = ops.cast(step, "float32") + 1.0  # k, counted from 1
        rate = ops.full_like(update, self.learning_rate)
        if self.warmup_steps:
            rate = rate * ops.minimum(1.0, update / self.warmup_steps)
        if self.drop_step is not None:
            rate = ops.where(
                update > self.drop_step, rate * self.drop_factor, rate
            )
        return rate

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "warmup_steps": self.warmup_steps,
            "drop_step": self.drop_step,
            "drop_factor": self.drop_factor,
            "name": self.name,
        }
