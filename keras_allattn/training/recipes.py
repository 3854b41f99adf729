"""Training recipes (SPEC §5) turned into an optimizer and its schedule.

A recipe is the `recipe` dict of a preset (`keras_allattn.presets`):
`optimizer` ("adagrad_clip" or "adam"), `learning_rate`, `warmup_steps`,
`clip`, `steps` (at the full rate) and `final_steps` (at a tenth of it).
"""

import keras

from keras_allattn.training.optimizers import AdagradClip
from keras_allattn.training.optimizers import LinearWarmup
from keras_allattn.utils import check_choice
from keras_allattn.utils import check_non_negative
from keras_allattn.utils import check_positive

OPTIMIZERS = ("adagrad_clip", "adam")
RECIPE_KEYS = (
    "optimizer",
    "learning_rate",
    "warmup_steps",
    "clip",
    "steps",
    "final_steps",
)
# The recipes end with `final_steps` at the learning rate times this.
FINAL_RATE_FACTOR = 0.1


def check_recipe(recipe):
    """Raises ValueError unless `recipe` holds every key of a recipe.

    Returns:
        `recipe`, unchanged.
    """
    if not isinstance(recipe, dict):
        raise ValueError(
            f"`recipe` must be a dict. Received: recipe={recipe!r}"
        )
    missing = [key for key in RECIPE_KEYS if key not in recipe]
    if missing:
        raise ValueError(
            f"`recipe` must hold the keys {RECIPE_KEYS}; {missing} missing. "
            f"Received: recipe={recipe!r}"
        )
    check_choice("optimizer", recipe["optimizer"], OPTIMIZERS)
    check_non_negative("warmup_steps", recipe["warmup_steps"])
    check_positive("steps", recipe["steps"])
    check_non_negative("final_steps", recipe["final_steps"])
    return recipe


def scale_recipe(recipe, total_steps):
    """The recipe fitted to a run of `total_steps` steps.

    The recipe's own length is `steps + final_steps`. A run of another
    length keeps the same share of steps at the dropped rate (`final_steps`
    scaled, rounded). The warm-up depends on the optimizer:

    - "adam": capped at a tenth of the run, `min(warmup_steps,
      total_steps // 10)`, so that a short run is not all warm-up.
    - "adagrad_clip": capped at three times the run, `min(warmup_steps,
      3 * total_steps)`, so that a short run ends at a third of the peak
      rate at most (its last update, `k = total_steps`, uses
      `learning_rate * total_steps / warmup_steps`). Adagrad normalises every coordinate's step by its
      accumulated gradients, so reaching the character recipes' rate of
      0.07 before the accumulators have grown stalls training at the
      unigram level: on text8-normalised text (char_small_cpu, 300 steps,
      JAX on a CPU) a 30-step warm-up ended at 4.08 validation bits per
      character, 1,000 steps at 1.98, 3,000 at 2.27, the recipe's 32,000
      at 3.49.

    At the recipe's own length the recipe comes back unchanged.

    Args:
        recipe: a recipe dict (see the module docstring).
        total_steps: int > 0, the number of optimizer steps of the run.

    Returns:
        A new recipe dict with `warmup_steps`, `steps` and `final_steps`
        adjusted (`steps + final_steps == total_steps`).

    Example:

    >>> recipe = dict(optimizer="adam", learning_rate=1e-3, clip=1.0,
    ...               warmup_steps=100, steps=3000, final_steps=300)
    >>> scaled = scale_recipe(recipe, 200)
    >>> scaled["warmup_steps"], scaled["steps"], scaled["final_steps"]
    (20, 182, 18)
    """
    check_recipe(recipe)
    total_steps = check_positive("total_steps", total_steps)
    full = recipe["steps"] + recipe["final_steps"]
    if total_steps == full:
        return dict(recipe)
    final_steps = round(total_steps * recipe["final_steps"] / full)
    final_steps = min(final_steps, total_steps - 1)
    cap = 3 * total_steps if recipe["optimizer"] == "adagrad_clip" else total_steps // 10
    return dict(
        recipe,
        warmup_steps=min(recipe["warmup_steps"], cap),
        steps=total_steps - final_steps,
        final_steps=final_steps,
    )


def schedule_from_recipe(recipe):
    """The recipe's learning-rate schedule.

    Linear warm-up over `warmup_steps` to `learning_rate` (the `k`-th
    update uses `learning_rate * min(1, k / warmup_steps)`, the reference's
    order), then a tenth of it for the `final_steps` updates after the
    first `steps` (no drop when `final_steps` is 0).

    Args:
        recipe: a recipe dict (see the module docstring).

    Returns:
        A `LinearWarmup`.
    """
    check_recipe(recipe)
    return LinearWarmup(
        recipe["learning_rate"],
        recipe["warmup_steps"],
        drop_step=recipe["steps"] if recipe["final_steps"] else None,
        drop_factor=FINAL_RATE_FACTOR,
    )


def optimizer_from_recipe(recipe, total_steps=None):
    """The optimizer of a training recipe, with its schedule.

    - `"adagrad_clip"` (the character-level recipes): `AdagradClip` with
      per-tensor clipping at `clip`.
    - `"adam"` (word level and the CPU presets): `keras.optimizers.Adam`
      with global-norm clipping at `clip` (none for 0) and epsilon 1e-8
      (PyTorch's, which the reference uses).

    Both follow `schedule_from_recipe`.

    Args:
        recipe: a recipe dict, e.g. `get_preset("enwik8_small")["recipe"]`.
        total_steps: `None` to follow the recipe as written, or the length
            of the run: the recipe is then fitted to it by `scale_recipe`.

    Returns:
        A `keras.optimizers.Optimizer`.

    Example:

    >>> from keras_allattn.presets import get_preset
    >>> optimizer = optimizer_from_recipe(get_preset("enwik8_small")["recipe"])
    >>> type(optimizer).__name__, optimizer.grad_clip
    ('AdagradClip', 0.03)
    """
    check_recipe(recipe)
    if total_steps is not None:
        recipe = scale_recipe(recipe, total_steps)
    schedule = schedule_from_recipe(recipe)
    if recipe["optimizer"] == "adagrad_clip":
        return AdagradClip(schedule, grad_clip=recipe["clip"])
    return keras.optimizers.Adam(
        schedule, epsilon=1e-8, global_clipnorm=recipe["clip"] or None
    )
