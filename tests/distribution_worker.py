"""The processes `test_distribution.py` starts: data-parallel runs on CPU.

    python -m tests.distribution_worker MODE OUT_DIR [ARGS...]

Each mode trains the same tiny `AllAttentionLM` for a few steps on the same
stream, data parallel, and writes `OUT_DIR/MODE-PROCESS.json` (step losses,
where the memory lives) and `.npz` (this process's memory rows). The
single-device reference comes from `reference_run` (in the same process
where the devices allow it, else in the test's own process).

The optimizer also keeps the first step (`FirstStepRecorder`): the
gradient it applied to every trainable variable and the variable's value
after the update, written to `MODE-PROCESS-step1.npz` keyed by variable
path, to compare with one device tensor by tensor.

`checkpoint save|resume` is one of 2 processes that save a checkpoint
after `SAVED_STEPS` steps, or resume one saved by a single process and
train as many more (`checkpoint_run`).
"""

import json
import os
import pathlib
import sys
import time

import numpy as np

CONFIG = dict(
    vocabulary_size=19, num_layers=2, hidden_dim=16, num_heads=2,
    persistent_memory_size=4, max_span=12, block_size=5, span_ramp=4,
    batch_size=4,
)
STEPS = 3


def tokens():
    return np.random.default_rng(0).integers(0, 19, 400)


def first_step_recorder():
    """`keras.optimizers.Adam` that also keeps its first update.

    For every trainable variable it holds two extra optimizer variables:
    the gradient of the first step as the update saw it (averaged over the
    replicas, clipped) and the variable's value right after that update.
    Later steps leave them alone, so they can be read after any number of
    steps (`first_step`), from `fit` under a distribution as from a loop.

    `update_step` receives the Keras variable on JAX and PyTorch, but on
    TensorFlow the `tf.Variable` it holds: under a `tf.distribute` strategy
    one replica's copy at a time (the optimizer updates each copy in
    `strategy.extended.update`), so the slots are found through every
    local copy (`strategy.experimental_local_results`), and the slots'
    own copies are written by the same per-replica update.
    """
    import keras
    from keras import ops

    def local_copies(variable):
        """The objects `update_step` may receive for `variable`."""
        if keras.backend.backend() != "tensorflow":
            return [variable]
        import tensorflow as tf

        strategy = tf.distribute.get_strategy()
        return list(strategy.experimental_local_results(variable.value))

    def key(variable):
        if isinstance(variable, keras.Variable):
            return id(variable)
        return variable.ref()  # a `tf.Variable`: hashable by its reference

    class FirstStepRecorder(keras.optimizers.Adam):
        def build(self, variables):
            super().build(variables)
            self.first_gradients, self.first_values = {}, {}
            self.recorded_paths = {}
            for variable in variables:
                self.first_gradients[variable.path] = (
                    self.add_variable_from_reference(variable, "first_gradient")
                )
                self.first_values[variable.path] = (
                    self.add_variable_from_reference(variable, "first_value")
                )
                for copy in local_copies(variable):
                    self.recorded_paths[key(copy)] = variable.path

        def update_step(self, gradient, variable, learning_rate):
            path = self.recorded_paths[key(variable)]
            first = ops.equal(self.iterations, 0)
            slot = self.first_gradients[path]
            self.assign(slot, ops.where(first, gradient, slot.value))
            super().update_step(gradient, variable, learning_rate)
            slot = self.first_values[path]
            value = variable.value if isinstance(variable, keras.Variable) else variable
            self.assign(slot, ops.where(first, value, slot.value))

    return FirstStepRecorder


def make_model(config, clip=None):
    """A compiled model with the same initial weights in every process.

    Its optimizer keeps the first step (see `first_step_recorder`).
    """
    import keras

    from keras_allattn import AllAttentionLM

    keras.utils.set_random_seed(0)
    model = AllAttentionLM(**config)
    model.compile(
        optimizer=first_step_recorder()(1e-2, global_clipnorm=clip),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def host_value(variable):
    """A variable's value as NumPy; a JAX array replicated over several
    processes is read from this process's first copy."""
    value = variable.value
    if getattr(value, "is_fully_addressable", True):
        import keras

        return np.asarray(keras.ops.convert_to_numpy(value))
    return np.asarray(value.addressable_data(0))


def first_step(model):
    """`{"gradient/PATH": ..., "value/PATH": ...}` of the first update."""
    optimizer = model.optimizer
    result = {}
    for path, slot in optimizer.first_gradients.items():
        result[f"gradient/{path}"] = host_value(slot)
        result[f"value/{path}"] = host_value(optimizer.first_values[path])
    return result


def write_first_step(out_dir, name, model):
    np.savez(pathlib.Path(out_dir) / f"{name}-step1.npz", **first_step(model))


def step_losses_callback():
    """A callback collecting each step's loss from `fit`'s running mean."""
    import keras

    class StepLosses(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.losses, self.total = [], 0.0

        def on_train_batch_end(self, batch, logs=None):
            total = (batch + 1) * float(logs["loss"])
            self.losses.append(total - self.total)
            self.total = total

    return StepLosses()


def fit_run(model, batcher):
    """Step losses of `fit` over `batcher`'s stream, memory resets on."""
    from keras_allattn.data import ResetMemoryOnRestart

    losses = step_losses_callback()
    dataset = batcher.as_dataset()
    model.fit(
        dataset, steps_per_epoch=STEPS, shuffle=False, verbose=0,
        callbacks=[losses, ResetMemoryOnRestart(dataset)],
    )
    return losses.losses


def reference_run(use_fit, clip=None):
    """One device, global batch: `(step losses, memories, first step)`."""
    import keras

    from keras_allattn.data import StreamBatcher
    from keras_allattn.distribution import DataParallelTrainer
    from keras_allattn.distribution import local_memories

    model = make_model(CONFIG, clip)
    batcher = StreamBatcher(tokens(), CONFIG["batch_size"], CONFIG["block_size"], seed=0)
    if use_fit:
        losses = fit_run(model, batcher)
    else:
        losses = DataParallelTrainer(model).train(batcher, STEPS)
    return losses, local_memories(model), first_step(model)


def distributed_run(config=CONFIG, clip=None, **plan_args):
    """The plan's route on this backend: `(plan, model, step losses)`."""
    from keras_allattn.data import StreamBatcher
    from keras_allattn.distribution import DataParallelTrainer
    from keras_allattn.distribution import plan_data_parallel

    plan = plan_data_parallel(config, **plan_args)
    plan.activate()
    model = make_model(plan.model_config(config), clip)
    plan.check_model(model)
    batcher = plan.shard(
        StreamBatcher(tokens(), config["batch_size"], config["block_size"], seed=0)
    )
    if plan.uses_fit:
        losses = fit_run(model, batcher)
    else:
        losses = DataParallelTrainer(model, plan).train(batcher, STEPS)
    return plan, model, losses


def write(out_dir, name, result, memories):
    out_dir = pathlib.Path(out_dir)
    (out_dir / f"{name}.json").write_text(json.dumps(result))
    np.savez(out_dir / f"{name}.npz", *memories)


def sharding_summary(model):
    from keras_allattn.distribution import memory_sharding

    return [
        {
            "path": entry["path"],
            "shape": list(entry["shape"]),
            "spec": str(entry["spec"]),
            "shards": [[device, list(rows)] for device, rows in entry["shards"]],
        }
        for entry in memory_sharding(model)
    ]


def jax_devices(out_dir):
    """2 virtual devices: data parallel, then 2-way model parallel."""
    import jax

    from keras_allattn.distribution import local_memories
    from keras_allattn.distribution import memory_variable_paths

    from keras_allattn.data import StreamBatcher

    reference_model = make_model(CONFIG)
    reference = fit_run(reference_model, StreamBatcher(
        tokens(), CONFIG["batch_size"], CONFIG["block_size"], seed=0
    ))
    reference_memories = local_memories(reference_model)
    write_first_step(out_dir, "jax-devices-reference", reference_model)
    plan, model, losses = distributed_run()
    write_first_step(out_dir, "jax-devices-0", model)
    try:  # built before the distribution was set: replicated
        plan.check_model(reference_model)
        unplaced_error = None
    except ValueError as error:
        unplaced_error = str(error)
    sharded = {
        v.path: str(tuple(v.value.sharding.spec))
        for v in model.variables
        if any(axis is not None for axis in v.value.sharding.spec)
    }
    write(out_dir, "jax-devices-0", {
        "devices": len(jax.devices()),
        "num_replicas": plan.num_replicas,
        "reference": reference,
        "losses": losses,
        "sharding": sharding_summary(model),
        "sharded_variables": sharded,
        "paths_from_config": memory_variable_paths(CONFIG),
        "paths_of_model": memory_variable_paths(model),
        "unplaced_error": unplaced_error,
    }, reference_memories + local_memories(model))
    _, model, losses = distributed_run(model_parallel=2)
    write_first_step(out_dir, "jax-model-parallel-0", model)
    write(out_dir, "jax-model-parallel-0", {
        "losses": losses,
        "sharded_variables": {
            v.path: str(tuple(v.value.sharding.spec))
            for v in model.variables
            if any(axis is not None for axis in v.value.sharding.spec)
        },
    }, local_memories(model))


def jax_process(out_dir):
    """One of 2 JAX processes (`KERAS_DISTRIBUTION_*` set by the test)."""
    from keras_allattn.distribution import local_memories

    plan, model, losses = distributed_run()
    write_first_step(out_dir, f"jax-process-{plan.process_index}", model)
    write(out_dir, f"jax-process-{plan.process_index}", {
        "process_count": plan.process_count,
        "losses": losses,
        "sharding": sharding_summary(model),
    }, local_memories(model))


def tensorflow_devices(out_dir):
    """2 logical CPUs: `fit` under MirroredStrategy."""
    from keras_allattn.distribution import local_memories
    from keras_allattn.distribution import use_virtual_cpu_devices

    from keras_allattn.data import StreamBatcher
    from keras_allattn.distribution import DataParallelTrainer

    use_virtual_cpu_devices(2)
    reference, reference_memories, reference_step = reference_run(use_fit=True)
    np.savez(pathlib.Path(out_dir) / "tensorflow-devices-reference-step1.npz",
             **reference_step)
    plan, model, losses = distributed_run()
    write_first_step(out_dir, "tensorflow-devices-0", model)
    write(out_dir, "tensorflow-devices-0", {
        "num_replicas": plan.num_replicas,
        "uses_fit": plan.uses_fit,
        "reference": reference,
        "losses": losses,
        "sharding": sharding_summary(model),
    }, reference_memories + local_memories(model))
    # The same strategy through the loop, gradient clipping on.
    model = make_model(plan.model_config(CONFIG), clip=0.05)
    batcher = StreamBatcher(tokens(), CONFIG["batch_size"], CONFIG["block_size"], seed=0)
    losses = DataParallelTrainer(model, plan).train(plan.shard(batcher), STEPS)
    write_first_step(out_dir, "tensorflow-devices-loop-0", model)
    write(out_dir, "tensorflow-devices-loop-0", {"losses": losses},
          local_memories(model))
    # A checkpoint of the 2 replicas, for one device to resume.
    directory = pathlib.Path(out_dir) / "saved-mirrored"
    checkpoint_run(directory, False, plan)
    write(out_dir, "tensorflow-checkpoint-0",
          {"without_plan": refusal_without_plan(directory)}, [])


def trainer_process(out_dir):
    """A TF worker (TF_CONFIG) or a torch rank (torchrun): the loop."""
    import keras

    from keras_allattn.distribution import local_memories

    plan, model, losses = distributed_run(clip=0.05)
    name = f"{keras.backend.backend()}-trainer-{plan.process_index}"
    write_first_step(out_dir, name, model)
    refusal = None
    if keras.backend.backend() == "tensorflow":
        from keras_allattn.training import save_training

        try:
            save_training(model, pathlib.Path(out_dir) / "refused", STEPS, plan=plan)
        except ValueError as error:
            refusal = str(error)
    write(out_dir, name, {
        "process_count": plan.process_count,
        "uses_fit": plan.uses_fit,
        "losses": losses,
        "sharding": sharding_summary(model),
        "checkpoint_refusal": refusal,
    }, local_memories(model))


SAVED_STEPS = 2  # checkpoints: steps before the save, as many after it


def train_steps(model, plan, batcher, steps, start_step=0):
    """Step losses of `steps` steps from `start_step`: `fit` where the plan
    (or, without one, the backend's one-device run) uses it, else the
    loop."""
    import keras

    from keras_allattn.data import ResetMemoryOnRestart
    from keras_allattn.distribution import DataParallelTrainer

    uses_fit = plan.uses_fit if plan else keras.backend.backend() != "torch"
    if not uses_fit:
        return DataParallelTrainer(model, plan).train(batcher, steps, start_step)
    losses = step_losses_callback()
    dataset = batcher.as_dataset(start_step)
    model.fit(
        dataset, steps_per_epoch=steps, shuffle=False, verbose=0,
        callbacks=[losses, ResetMemoryOnRestart(dataset)],
    )
    return losses.losses


def checkpoint_run(directory, resume, plan=None, slow_writer=False):
    """Saves after `SAVED_STEPS` steps (`resume` False), or resumes the
    checkpoint in `directory` and trains `SAVED_STEPS` more: `(step losses,
    this process's memory rows)`; one process without a plan.

    `slow_writer`: the weights file takes a second longer to write, so a
    process that returned from `save_training` before the writer finished
    would find no checkpoint yet."""
    from keras_allattn.data import StreamBatcher
    from keras_allattn.distribution import local_memories
    from keras_allattn.training import restore_training
    from keras_allattn.training import save_training

    model = make_model(plan.model_config(CONFIG) if plan else CONFIG)
    batcher = StreamBatcher(tokens(), CONFIG["batch_size"], CONFIG["block_size"], seed=0)
    if plan:
        plan.check_model(model)
        batcher = plan.shard(batcher)
    if slow_writer:
        save_weights = model.save_weights

        def slow_save_weights(*args, **kwargs):
            save_weights(*args, **kwargs)
            time.sleep(1.0)

        model.save_weights = slow_save_weights
    if resume:
        start = restore_training(model, directory, batcher, plan=plan)
        losses = train_steps(model, plan, batcher, SAVED_STEPS, start)
    else:
        losses = train_steps(model, plan, batcher, SAVED_STEPS)
        save_training(model, directory, SAVED_STEPS, batcher, plan=plan)
    return losses, local_memories(model)


def checkpoint_process(out_dir, action):
    """One of 2 processes: saves into `OUT_DIR/saved-2` (`save`) or
    resumes `OUT_DIR/saved-1` (`resume`)."""
    import keras

    from keras_allattn.distribution import plan_data_parallel
    from keras_allattn.training import latest_checkpoint

    plan = plan_data_parallel(CONFIG)
    plan.activate()
    resume = action == "resume"
    directory = pathlib.Path(out_dir) / ("saved-1" if resume else "saved-2")
    losses, memories = checkpoint_run(
        directory, resume, plan, slow_writer=plan.process_index == 0
    )
    write(out_dir, f"{keras.backend.backend()}-{action}-{plan.process_index}", {
        "process_count": plan.process_count,
        # Whether the checkpoint was complete when `save_training` returned.
        "checkpoint_found": latest_checkpoint(directory) is not None,
        "losses": losses,
        "without_plan": refusal_without_plan(directory),
    }, memories)


def refusal_without_plan(directory):
    """The error of `restore_training` without the plan in a data-parallel
    run (None if it does not refuse)."""
    from keras_allattn.training import restore_training

    try:
        restore_training(make_model(CONFIG), directory)
    except ValueError as error:
        return str(error)
    return None


def jax_sharded_kernel(out_dir):
    """The Pallas kernel per batch shard (interpreter) vs on the whole batch."""
    import functools

    import jax
    import jax.numpy as jnp
    import keras

    from keras_allattn.ops.attention import batch_sharded
    from keras_allattn.ops.pallas_attention import pallas_all_attention

    rng = np.random.default_rng(1)
    b, m, h, d, a, n = 4, 16, 2, 16, 32, 16
    arrays = [rng.normal(size=shape).astype("float32") for shape in (
        (b, m, h, d), (b, a + m, h, d), (b, a + m, h, d), (d, a), (h, n, d),
        (h, n, d))] + [np.array([0.3, 0.7], "float32")]
    cotangent = rng.normal(size=(b, m, h, d)).astype("float32")
    kernel = functools.partial(pallas_all_attention, interpret=True,
                               precision="highest")
    distribution = keras.distribution.DataParallel(
        devices=keras.distribution.list_devices())
    sharded = batch_sharded(kernel, distribution)

    def value_and_grads(fn, xs):
        def loss(q, k, v, pos, pk, pv, z):
            out = fn(q, k, v, pos, persistent_keys=pk, persistent_values=pv,
                     span_ratio=z, max_span=32, span_ramp=8)
            return jnp.sum(out * cotangent)

        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7))))(*xs)

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    placed = [jax.device_put(x, rows) if i < 3 else x for i, x in enumerate(arrays)]
    want = value_and_grads(kernel, arrays)
    got = value_and_grads(sharded, placed)
    errors = [
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / np.max(np.abs(np.asarray(y))))
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    ]
    write(out_dir, "jax-sharded-kernel-0", {
        "devices": len(jax.devices()),
        "wrapped": sharded is not kernel,
        "errors": errors,
    }, [])


MODES = {
    "jax-sharded-kernel": jax_sharded_kernel,
    "jax-devices": jax_devices,
    "jax-process": jax_process,
    "tensorflow-devices": tensorflow_devices,
    "trainer": trainer_process,
    "checkpoint": checkpoint_process,
}

if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    MODES[sys.argv[1]](*sys.argv[2:])
