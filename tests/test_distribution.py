"""Data-parallel training on CPU, one route per backend.

Each distributed run (in subprocesses: device counts are fixed when a
backend starts, and torch DDP and TensorFlow multi-worker need processes)
trains `tests.distribution_worker.CONFIG` for a few steps with a global
batch of 4 over 2 replicas; its step losses must match one device with
batch 4 (relative error < 1e-5, float32), and each replica must hold the
segment memory of its own rows, equal to those rows of the one-device
memory. The first step is also compared tensor by tensor, on every
backend: from the same weights and the same global batch, every gradient
the optimizer applied and every updated weight equal one device's
(relative error at most 1e-5 per tensor).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_allattn import AllAttentionLM
from keras_allattn.data import StreamBatcher
from keras_allattn.distribution import memory_layout_map
from keras_allattn.distribution import memory_variable_paths
from keras_allattn.distribution import replica_batch_size
from tests import distribution_worker as worker

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
# Quicker XLA compilation on CPU (the runs are a few steps each).
CPU_COMPILE_FLAGS = (
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)


def only(name):
    return pytest.mark.skipif(
        keras.backend.backend() != name, reason=f"{name} backend only"
    )


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(argv, **extra_env):
    """Starts a process in the project root with this test's backend."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT),
           "KERAS_BACKEND": keras.backend.backend(), **extra_env}
    # The Triton kernel tests switch the interpreter on for their session.
    env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )


def wait(processes, timeout=600):
    """Waits for all `processes` (the timeout only guards against a hang:
    a loaded machine runs them slowly); fails with the output of a failed
    one."""
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout)[0])
    finally:
        for process in processes:
            process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-4000:]
    return outputs


def worker_command(mode, out_dir):
    return [sys.executable, "-m", "tests.distribution_worker", mode, str(out_dir)]


def load(out_dir, name):
    result = json.loads((out_dir / f"{name}.json").read_text())
    with np.load(out_dir / f"{name}.npz") as arrays:
        memories = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    return result, memories


def relative_error(actual, expected):
    """`max |actual - expected| / max |expected|` (0 when both are zero)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    difference = float(np.max(np.abs(actual - expected)))
    scale = float(np.max(np.abs(expected)))
    if scale == 0:
        return 0.0 if difference == 0 else float("inf")
    return difference / scale


def load_first_step(out_dir, name):
    """The first update a worker wrote: `{"gradient/PATH", "value/PATH"}`."""
    with np.load(out_dir / f"{name}-step1.npz") as arrays:
        return {key: arrays[key] for key in arrays.files}


def check_first_step(first, reference):
    """Every gradient and updated weight of the first step equals one
    device's, tensor by tensor (relative error at most `TOLERANCE`)."""
    assert sorted(first) == sorted(reference)
    assert len(reference) == 2 * len(
        AllAttentionLM(**worker.CONFIG).trainable_weights
    )
    errors = {key: relative_error(first[key], reference[key]) for key in reference}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{worst}: relative error {errors[worst]}"


def check_rows(memories, reference, start):
    """Each layer's memory equals rows `start:` of the one-device memory."""
    assert len(memories) == len(reference) == worker.CONFIG["num_layers"]
    for memory, expected in zip(memories, reference):
        rows = expected[start : start + len(memory)]
        assert memory.shape == rows.shape
        assert relative_error(memory, rows) < TOLERANCE


# === Every backend: sharding the stream, the layout keys ===


def test_shards_stack_into_the_batch_and_restart_together():
    batcher = StreamBatcher(np.arange(1000), batch_size=4, block_size=7, seed=3)
    shards = [batcher.shard(i, 2) for i in range(2)]
    assert [s.batch_size for s in shards] == [2, 2]
    for step in range(80):  # three passes
        inputs, targets = batcher.batch(step)
        np.testing.assert_array_equal(
            np.concatenate([s.batch(step)[0] for s in shards]), inputs
        )
        np.testing.assert_array_equal(
            np.concatenate([s.batch(step)[1] for s in shards]), targets
        )
        assert all(
            s.is_pass_start(step) == batcher.is_pass_start(step) for s in shards
        )
    assert batcher.memory_reset_steps(80).size == 3
    with pytest.raises(ValueError, match="`count` must divide batch_size"):
        batcher.shard(0, 3)
    with pytest.raises(ValueError, match="index=2, count=2"):
        batcher.shard(2, 2)


def test_layout_keys_are_the_full_variable_paths():
    config = dict(worker.CONFIG, feedforward_dim=8)
    model = AllAttentionLM(**config)
    assert memory_variable_paths(config) == memory_variable_paths(model)
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), ["cpu:0"])
    data_only = memory_layout_map(config, mesh)
    # The segment memory is state, not weights: among the variables.
    sharded = {v.path for v in model.variables if data_only[v.path] is not None}
    assert sharded == set(memory_variable_paths(model))
    both = memory_layout_map(config, mesh, shard_model=True)
    sharded = {v.path for v in model.variables if both[v.path] is not None}
    assert sharded - set(memory_variable_paths(model)) == {
        f"{prefix}_{i}/{name}"
        for i in range(config["num_layers"])
        for prefix, names in (
            ("attention", ("query/kernel", "key/kernel", "value/kernel",
                           "output/kernel", "persistent_keys",
                           "persistent_values")),
            ("feedforward", ("inner/kernel", "inner/bias", "outer/kernel")),
        )
        for name in names
    }


def test_replica_batch_size_must_divide():
    assert replica_batch_size(64, 8) == 8
    with pytest.raises(ValueError, match="global_batch_size=6, num_replicas=4"):
        replica_batch_size(6, 4)


def import_loss_match():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import loss_match
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return loss_match


def test_loss_match_verdict_is_twice_the_nudge_spread():
    """`loss_match`'s equivalence verdict: the N-device curve's largest
    relative difference from one device at most twice the spread of the K
    one-ulp nudged runs, the largest of theirs (not the first draw's)."""
    loss_match = import_loss_match()
    reference = [4.0, 3.0, 2.0]
    nudged = [
        [4.0, 3.0 * (1 + 1e-3), 2.0],
        [4.0 * (1 - 4e-3), 3.0, 2.0],
        [4.0, 3.0, 2.0 * (1 + 2e-3)],
    ]
    # 1.9 times the first draw's difference, 0.475 times the spread.
    within = loss_match.verdict(reference, [4.0, 3.0, 2.0 * (1 - 1.9e-3)], nudged)
    assert within["nudges"] == 3
    assert within["nudge_max_rel_diffs"] == pytest.approx([1e-3, 4e-3, 2e-3])
    assert within["nudge_max_rel_diff"] == pytest.approx(4e-3)
    assert within["first_nudge_max_rel_diff"] == pytest.approx(1e-3)
    assert within["ratio_to_nudge_spread"] == pytest.approx(0.475)
    assert within["within_twice_nudge"] and within["within_twice_first_nudge"]
    # 5 times the first draw's, within twice the spread: the spread decides.
    wider = loss_match.verdict(reference, [4.0, 3.0 * (1 + 5e-3), 2.0], nudged)
    assert wider["within_twice_nudge"]
    assert not wider["within_twice_first_nudge"]
    beyond = loss_match.verdict(reference, [4.0 * (1 + 8.1e-3), 3.0, 2.0], nudged)
    assert not beyond["within_twice_nudge"]
    with pytest.raises(ValueError, match="Received: 2 steps, reference of 3"):
        loss_match.verdict(reference, reference, [[4.0, 3.0]])


def test_loss_match_nudges_are_independent_one_ulp_draws():
    """`nudges(weights, seed, K)`: K copies, each element one float32 ulp
    from the original, each copy a draw of its own (the first as
    `nudge(weights, seed)`)."""
    loss_match = import_loss_match()
    weights = [np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32),
               np.linspace(-1.0, 1.0, 64, dtype=np.float32)]
    copies = loss_match.nudges(weights, 5, 3)
    assert len(copies) == 3
    for copy in copies:
        for moved, original in zip(copy, weights):
            assert moved.dtype == np.float32
            assert np.all(moved != original)
            ulp = np.spacing(np.abs(original))
            # One ulp up, or down (a smaller ulp below a power of two).
            assert np.all(np.abs(moved - original) <= ulp)
            assert np.all(np.abs(moved - original) >= ulp / 2)
    for i in range(3):
        for j in range(i):
            assert any(np.any(a != b) for a, b in zip(copies[i], copies[j]))
    for a, b in zip(copies[0], loss_match.nudge(weights, 5)):
        np.testing.assert_array_equal(a, b)


def save_folder(loss_match, folder, nudged, single_curve=False, deterministic=False):
    """A `--save` folder (weights, 3 steps of losses); `single_curve`: as
    saved with one nudged run, a flat curve and no count."""
    loss_match.save_reference(
        str(folder), [np.ones((2, 3), np.float32)], [4.0, 3.0, 2.0],
        nudged, deterministic,
    )
    if single_curve:
        (folder / "nudged_losses.json").write_text(json.dumps(nudged[0]))
        (folder / "settings.json").write_text(
            json.dumps({"deterministic": deterministic})
        )


def test_loss_match_reference_reads_k_nudged_curves_and_the_old_single_one(tmp_path):
    """`--reference` loads the K nudged curves of a folder, and a folder
    saved with a single nudged curve as K = 1; a different `--nudges`, or
    deterministic mode, than the folder's is refused."""
    import argparse

    loss_match = import_loss_match()
    curves = [[4.0, 3.1, 2.0], [4.0, 3.0, 2.2]]
    save_folder(loss_match, tmp_path / "new", curves)
    save_folder(loss_match, tmp_path / "old", curves[:1], single_curve=True)

    def load(folder, nudges=None, deterministic=False):
        args = argparse.Namespace(reference=str(tmp_path / folder), steps=3,
                                  nudges=nudges, deterministic=deterministic)
        return loss_match.load_reference(args)

    initial, reference, nudged = load("new")
    assert nudged == curves and reference == [4.0, 3.0, 2.0]
    np.testing.assert_array_equal(initial[0], np.ones((2, 3), np.float32))
    assert load("new", nudges=2)[2] == curves
    assert load("old")[2] == curves[:1]
    assert load("old", nudges=1)[2] == curves[:1]
    with pytest.raises(SystemExit, match="holds 1 nudged runs; this run has --nudges 3"):
        load("old", nudges=3)
    with pytest.raises(SystemExit, match="saved with deterministic=False; this run "
                       "has deterministic=True"):
        load("new", deterministic=True)


@only("torch")
def test_loss_match_saves_k_distinct_nudged_runs(tmp_path, monkeypatch, capsys):
    """`--compare devices --save`: the one-device run and K = 2 nudged
    repeats, really trained (a tiny model, 8 steps): the two nudged curves
    differ from each other and from the unnudged one, and the printed
    spread is the larger of their differences. On PyTorch, whose eager
    one-process runs take seconds on a CPU (JAX's `fit` of one step per
    epoch takes a minute here); the nudged runs are the same code on
    every backend."""
    loss_match = import_loss_match()
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and a dog ran over the hill".split()
    text = tmp_path / "text.txt"
    text.write_text(" ".join(rng.choice(words, 2000)))
    folder = tmp_path / "saved"
    monkeypatch.setattr(sys, "argv", [
        "loss_match.py", "--compare", "devices", "--data", str(text),
        "--preset", "char_tiny_cpu", "--span", "fixed:16", "--batch-size", "2",
        "--block-size", "8", "--layers", "1", "--dtype", "float32",
        "--jit-compile", "off", "--steps", "8", "--nudges", "2",
        "--save", str(folder),
    ])
    loss_match.main()
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    losses = json.loads((folder / "losses.json").read_text())
    nudged = json.loads((folder / "nudged_losses.json").read_text())
    assert json.loads((folder / "settings.json").read_text()) == {
        "deterministic": False, "nudges": 2,
    }
    assert len(losses) == 8 and [len(c) for c in nudged] == [8, 8]
    assert nudged[0] != losses and nudged[1] != losses
    assert nudged[0] != nudged[1]
    differences = [loss_match.compare(losses, curve)[0] for curve in nudged]
    assert printed["nudge_max_rel_diffs"] == pytest.approx(differences)
    assert printed["nudge_max_rel_diff"] == max(differences) > 0


# === JAX: keras.distribution, memory sharded on "batch" ===


@pytest.fixture(scope="module")
def jax_runs(tmp_path_factory):
    """2 devices, 2 processes, the 8-device launch and the training command
    on 2 processes, run side by side (the processes talk through gloo, JAX's
    default CPU collectives)."""
    if keras.backend.backend() != "jax":
        pytest.skip("jax backend only")
    out_dir = tmp_path_factory.mktemp("jax")
    address = f"localhost:{free_port()}"
    fast = os.environ.get("XLA_FLAGS", "") + CPU_COMPILE_FLAGS
    processes = [
        start(worker_command("jax-devices", out_dir),
              XLA_FLAGS=f"{fast} --xla_force_host_platform_device_count=2"),
        start(worker_command("jax-sharded-kernel", out_dir),
              XLA_FLAGS=f"{fast} --xla_force_host_platform_device_count=2"),
        start([sys.executable, "benchmarks/scaling.py", "--preset",
               "char_tiny_cpu", "--devices", "8", "--span", "fixed:64",
               "--dtype", "float32", "--steps", "2", "--warmup-steps", "1"],
              XLA_FLAGS=f"{fast} --xla_force_host_platform_device_count=8"),
    ] + [
        start(worker_command("jax-process", out_dir), XLA_FLAGS=fast,
              KERAS_DISTRIBUTION_JOB_ADDRESSES=address,
              KERAS_DISTRIBUTION_NUM_PROCESSES="2",
              KERAS_DISTRIBUTION_PROCESS_ID=str(index))
        for index in range(2)
    ]
    # The training command as users start it on two hosts.
    text = out_dir / "text.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log. " * 40)
    address = f"localhost:{free_port()}"
    processes += [
        start([sys.executable, "examples/train_enwik8.py", "--data", str(text),
               "--preset", "char_tiny_cpu", "--batch-size", "4",
               "--block-size", "8", "--max-span", "16", "--steps", "2",
               "--eval-every", "2", "--distribute",
               "--output", str(out_dir / "command")], XLA_FLAGS=fast,
              KERAS_DISTRIBUTION_JOB_ADDRESSES=address,
              KERAS_DISTRIBUTION_NUM_PROCESSES="2",
              KERAS_DISTRIBUTION_PROCESS_ID=str(index))
        for index in range(2)
    ]
    # The scaling benchmark's multi-process row: one process per device.
    address = f"localhost:{free_port()}"
    processes += [
        start([sys.executable, "benchmarks/scaling.py", "--preset",
               "char_tiny_cpu", "--span", "fixed:64", "--dtype", "float32",
               "--steps", "2", "--warmup-steps", "1"], XLA_FLAGS=fast,
              KERAS_DISTRIBUTION_JOB_ADDRESSES=address,
              KERAS_DISTRIBUTION_NUM_PROCESSES="2",
              KERAS_DISTRIBUTION_PROCESS_ID=str(index))
        for index in range(2)
    ]
    outputs = wait(processes)
    return out_dir, outputs[2], outputs[5:7], outputs[7:]


@only("jax")
def test_jax_two_devices_match_one_device(jax_runs):
    out_dir, _, _, _ = jax_runs
    result, memories = load(out_dir, "jax-devices-0")
    layers = worker.CONFIG["num_layers"]
    reference, distributed = memories[:layers], memories[layers:]
    assert result["devices"] == result["num_replicas"] == 2
    assert relative_error(result["losses"], result["reference"]) < TOLERANCE
    assert result["paths_from_config"] == result["paths_of_model"]
    # Only the memory is sharded, on the batch: device i keeps rows 2i, 2i+1.
    assert result["sharded_variables"] == {
        path: "('batch', None, None)" for path in result["paths_of_model"]
    }
    # The ring buffer holds the memory's 12 rows and a block's 5.
    ring = 12 + worker.CONFIG["block_size"]
    for entry in result["sharding"]:
        assert entry["shape"] == [4, ring, 16]
        assert entry["shards"] == [["cpu:0", [0, 2]], ["cpu:1", [2, 4]]]
    check_rows(distributed, reference, 0)
    check_first_step(
        load_first_step(out_dir, "jax-devices-0"),
        load_first_step(out_dir, "jax-devices-reference"),
    )
    # `check_model` catches a memory left unsharded.
    assert "`memory_0/memory` is not placed as planned" in result["unplaced_error"]


@only("jax")
def test_jax_fused_kernel_runs_per_batch_shard(jax_runs):
    """Under DataParallel the Pallas kernel runs in `shard_map` on each
    device's rows; its value and all gradients (the replicated position
    keys, persistent vectors and span ratios summed over the devices)
    equal the kernel's on the whole batch."""
    out_dir, _, _, _ = jax_runs
    result, _ = load(out_dir, "jax-sharded-kernel-0")
    assert result["devices"] == 2 and result["wrapped"]
    assert len(result["errors"]) == 8
    assert max(result["errors"]) < 1e-5


@only("jax")
def test_jax_model_parallel_matches_one_device(jax_runs):
    out_dir, _, _, _ = jax_runs
    reference, memories = load(out_dir, "jax-devices-0")
    result, distributed = load(out_dir, "jax-model-parallel-0")
    assert relative_error(result["losses"], reference["reference"]) < TOLERANCE
    sharded = result["sharded_variables"]
    assert sharded["attention_1/query/kernel"] == "(None, 'model')"
    assert sharded["attention_1/output/kernel"] == "('model', None)"
    assert sharded["attention_0/persistent_keys"] == "('model', None, None)"
    check_rows(distributed, memories[: worker.CONFIG["num_layers"]], 0)
    check_first_step(
        load_first_step(out_dir, "jax-model-parallel-0"),
        load_first_step(out_dir, "jax-devices-reference"),
    )


@only("jax")
def test_jax_two_processes_match_one_device(jax_runs):
    out_dir, _, _, _ = jax_runs
    reference, memories = load(out_dir, "jax-devices-0")
    reference_memories = memories[: worker.CONFIG["num_layers"]]
    reference_step = load_first_step(out_dir, "jax-devices-reference")
    for index in range(2):
        result, memories = load(out_dir, f"jax-process-{index}")
        assert result["process_count"] == 2
        assert relative_error(result["losses"], reference["reference"]) < TOLERANCE
        for entry in result["sharding"]:
            assert entry["spec"] == "('batch', None, None)"
            assert [rows for _, rows in entry["shards"]] == [[2 * index, 2 * index + 2]]
        check_rows(memories, reference_memories, 2 * index)
        check_first_step(
            load_first_step(out_dir, f"jax-process-{index}"), reference_step
        )


@only("jax")
def test_jax_two_process_command(jax_runs):
    """`--distribute` under `KERAS_DISTRIBUTION_*`: each process trains its
    rows of the global batch; the first prints the result."""
    out_dir, _, outputs, _ = jax_runs
    first, second = [output.strip().splitlines() for output in outputs]
    assert any("processes=2" in line for line in first + second)
    result = json.loads(first[-1])
    assert (result["devices"], result["global_batch_size"]) == (2, 4)
    assert result["steps"] == 2
    assert not second[-1].startswith("{")
    # --output: the first process writes the model and a checkpoint of the
    # memory of all 4 rows.
    output = out_dir / "command"
    assert (output / "model.keras").is_file()
    (checkpoint,) = (output / "checkpoints").iterdir()
    assert checkpoint.name == "step_000000002"
    state = json.loads((checkpoint / "training_state.json").read_text())
    assert (state["process_count"], state["batcher"]["batch_size"]) == (2, 4)
    with np.load(checkpoint / "memory.npz") as memories:
        assert memories["arr_0"].shape == (4, 16, 64)


@only("jax")
def test_jax_scaling_two_processes(jax_runs):
    """The scaling benchmark with one process per device (the first
    prints): 2 devices of 2 processes."""
    _, _, _, outputs = jax_runs
    first, second = [output.strip().splitlines() for output in outputs]
    result = json.loads(first[-1])
    assert (result["devices"], result["processes"]) == (2, 2)
    assert result["tokens_per_s"] > 0
    assert "vs_one_process" in result
    assert not second[-1].startswith("{")


@only("jax")
def test_jax_eight_device_launch(jax_runs):
    """What a GPU run starts: the scaling benchmark over 8 devices."""
    _, output, _, _ = jax_runs
    result = json.loads(output.strip().splitlines()[-1])
    assert (result["devices"], result["global_batch_size"]) == (8, 8)
    assert result["tokens_per_s"] > 0


# === TensorFlow: MirroredStrategy fit; multi-worker loop ===


@pytest.fixture(scope="module")
def tensorflow_runs(tmp_path_factory):
    """2 logical CPUs, and 2 workers, run side by side."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tensorflow backend only")
    out_dir = tmp_path_factory.mktemp("tensorflow")
    workers = [f"localhost:{free_port()}" for _ in range(2)]
    processes = [start(worker_command("tensorflow-devices", out_dir))] + [
        start(worker_command("trainer", out_dir), TF_CONFIG=json.dumps({
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": index},
        }))
        for index in range(2)
    ]
    # The workers' reference, with gradient clipping on: the loop must
    # clip the global gradient.
    reference = worker.reference_run(use_fit=False, clip=0.05)
    wait(processes)
    return out_dir, reference


@only("tensorflow")
def test_tensorflow_mirrored_fit_matches_one_device(tensorflow_runs):
    out_dir, _ = tensorflow_runs
    result, memories = load(out_dir, "tensorflow-devices-0")
    layers = worker.CONFIG["num_layers"]
    reference, distributed = memories[:layers], memories[layers:]
    assert result["num_replicas"] == 2 and result["uses_fit"]
    assert relative_error(result["losses"], result["reference"]) < TOLERANCE
    # One (2, L, d) copy per replica, each updated by its replica alone.
    for entry in result["sharding"]:
        assert entry["spec"] == "MirroredVariable"
        assert entry["shape"] == [2, 12, 16]
        assert [device[-5:] for device, _ in entry["shards"]] == ["CPU:0", "CPU:1"]
    check_rows(distributed, reference, 0)
    check_first_step(
        load_first_step(out_dir, "tensorflow-devices-0"),
        load_first_step(out_dir, "tensorflow-devices-reference"),
    )


@only("tensorflow")
def test_tensorflow_mirrored_loop_matches_one_device(tensorflow_runs):
    out_dir, (reference, reference_memories, reference_step) = tensorflow_runs
    result, memories = load(out_dir, "tensorflow-devices-loop-0")
    assert relative_error(result["losses"], reference) < TOLERANCE
    check_rows(memories, reference_memories, 0)
    check_first_step(
        load_first_step(out_dir, "tensorflow-devices-loop-0"), reference_step
    )


@only("tensorflow")
def test_tensorflow_multi_worker_loop_matches_one_device(tensorflow_runs):
    out_dir, (reference, reference_memories, reference_step) = tensorflow_runs
    for index in range(2):
        result, memories = load(out_dir, f"tensorflow-trainer-{index}")
        assert result["process_count"] == 2 and not result["uses_fit"]
        assert relative_error(result["losses"], reference) < TOLERANCE
        check_rows(memories, reference_memories, 2 * index)
        check_first_step(
            load_first_step(out_dir, f"tensorflow-trainer-{index}"),
            reference_step,
        )
        # Its checkpoint would miss the other worker's memory: refused.
        assert "multi-worker run are not supported" in result["checkpoint_refusal"]
        assert "process_count=2" in result["checkpoint_refusal"]
    assert not (out_dir / "refused").exists()


@only("tensorflow")
def test_tensorflow_mirrored_checkpoint_resumes_on_one_device(tensorflow_runs):
    """Saved by 2 replicas (one copy of 2 rows each), resumed by one device
    with all 4 rows: it continues as one uninterrupted device."""
    out_dir, _ = tensorflow_runs
    steps = worker.SAVED_STEPS
    model = worker.make_model(worker.CONFIG)
    batcher = StreamBatcher(worker.tokens(), 4, worker.CONFIG["block_size"], seed=0)
    reference = worker.train_steps(model, None, batcher, 2 * steps)
    losses, memories = worker.checkpoint_run(
        out_dir / "saved-mirrored", resume=True
    )
    assert relative_error(losses, reference[steps:]) < TOLERANCE
    check_rows(memories, model.get_memory(), 0)
    # Without the plan, under the strategy, it would read one replica's copy.
    result, _ = load(out_dir, "tensorflow-checkpoint-0")
    assert "plan=None with 1 process(es), 2 replica(s)" in result["without_plan"]


# === PyTorch: DDP under torchrun ===


@only("torch")
def test_torch_model_exposes_its_parameters():
    model = AllAttentionLM(**worker.CONFIG)
    parameters = list(model.parameters())
    assert len(parameters) == len(model.variables)
    assert sum(p.requires_grad for p in parameters) == len(model.trainable_weights)


@only("torch")
def test_torch_ddp_matches_one_process(tmp_path):
    # Started as on several hosts: a c10d rendezvous (here on loopback).
    ranks = start([
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
        "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
        f"localhost:{free_port()}", "-m", "tests.distribution_worker",
        "trainer", str(tmp_path),
    ])
    # The loop computes what `fit` does; with clipping it must see the
    # averaged gradient.
    fit_losses, _, fit_step = worker.reference_run(use_fit=True)
    loop_losses, _, loop_step = worker.reference_run(use_fit=False)
    assert relative_error(loop_losses, fit_losses) < TOLERANCE
    check_first_step(loop_step, fit_step)
    reference, reference_memories, reference_step = worker.reference_run(
        use_fit=False, clip=0.05
    )
    wait([ranks])
    for index in range(2):
        result, memories = load(tmp_path, f"torch-trainer-{index}")
        assert result["process_count"] == 2 and not result["uses_fit"]
        assert relative_error(result["losses"], reference) < TOLERANCE
        # The ring buffer (PyTorch's default storage) holds the memory's
        # 12 rows and a block's 5.
        for entry in result["sharding"]:
            assert entry["shape"] == [2, 12 + worker.CONFIG["block_size"], 16]
            assert entry["spec"] == f"rank {index}"
        check_rows(memories, reference_memories, 2 * index)
        check_first_step(
            load_first_step(tmp_path, f"torch-trainer-{index}"), reference_step
        )


# === Checkpoints across process counts: JAX, PyTorch ===


def start_pair(action, out_dir):
    """The 2 processes of `checkpoint ACTION`, started as users start them."""
    command = ["-m", "tests.distribution_worker", "checkpoint", str(out_dir), action]
    if keras.backend.backend() == "torch":
        return [start([
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"localhost:{free_port()}", *command,
        ])]
    address = f"localhost:{free_port()}"
    return [
        start([sys.executable, *command],
              XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + CPU_COMPILE_FLAGS,
              KERAS_DISTRIBUTION_JOB_ADDRESSES=address,
              KERAS_DISTRIBUTION_NUM_PROCESSES="2",
              KERAS_DISTRIBUTION_PROCESS_ID=str(index))
        for index in range(2)
    ]


def saved_memories(directory):
    (path,) = [p for p in directory.iterdir() if p.name.startswith("step_")]
    with np.load(path / "memory.npz") as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow",
    reason="JAX and PyTorch (a TensorFlow multi-worker run refuses to save)",
)
def test_checkpoint_resumes_on_another_process_count(tmp_path):
    """2 processes save, 1 resumes; 1 saves, 2 resume: every stream row
    continues from its own memory, as in one uninterrupted process."""
    from keras_allattn.training import restore_training

    steps = worker.SAVED_STEPS
    saving = start_pair("save", tmp_path)
    model = worker.make_model(worker.CONFIG)
    batcher = StreamBatcher(worker.tokens(), 4, worker.CONFIG["block_size"], seed=0)
    reference = worker.train_steps(model, None, batcher, 2 * steps)
    reference_memories = [np.asarray(m) for m in model.get_memory()]
    worker.checkpoint_run(tmp_path / "saved-1", resume=False)
    wait(saving)
    for index in range(2):
        # Each process returned from `save_training` with the checkpoint
        # complete (the first one writes it, a second late).
        result, _ = load(tmp_path, f"{keras.backend.backend()}-save-{index}")
        assert result["checkpoint_found"]
    # The 2 processes' checkpoint holds the rows of both, in global order.
    for memory, expected in zip(saved_memories(tmp_path / "saved-2"),
                                saved_memories(tmp_path / "saved-1")):
        assert memory.shape == (4, 12, 16)
        assert relative_error(memory, expected) < TOLERANCE
    resuming = start_pair("resume", tmp_path)
    losses, memories = worker.checkpoint_run(tmp_path / "saved-2", resume=True)
    wait(resuming)
    assert relative_error(losses, reference[steps:]) < TOLERANCE
    check_rows(memories, reference_memories, 0)
    for index in range(2):
        result, memories = load(tmp_path, f"{keras.backend.backend()}-resume-{index}")
        assert result["process_count"] == 2
        assert relative_error(result["losses"], reference[steps:]) < TOLERANCE
        check_rows(memories, reference_memories, 2 * index)
        # Without the plan a process would take rows that are not its own.
        assert "`restore_training` in a data-parallel run needs `plan=`" in (
            result["without_plan"]
        )
        assert "plan=None with 2 process(es)" in result["without_plan"]
    # Another global batch cannot continue the streams: refused, naming both.
    with pytest.raises(ValueError, match=(
        r"memory of 4 streams \(a global batch of 4, written by 2 process\(es\)\); "
        r"this run's global batch is 2, on 1 process\(es\)"
    )):
        restore_training(
            worker.make_model(dict(worker.CONFIG, batch_size=2)), tmp_path / "saved-2"
        )


@only("torch")
def test_torch_two_rank_command_checkpoints(tmp_path):
    """`--distribute --output` under torchrun: the loop checkpoints the
    memory of both ranks' rows; rank 0 writes it and the model."""
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log. " * 40)
    output = tmp_path / "run"
    (ranks,) = [start([
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
        "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
        f"localhost:{free_port()}", "examples/train_enwik8.py", "--data",
        str(text), "--preset", "char_tiny_cpu", "--batch-size", "4",
        "--block-size", "8", "--max-span", "16", "--steps", "3",
        "--eval-every", "2", "--distribute", "--output", str(output),
    ])]
    (log,) = wait([ranks])
    assert (output / "model.keras").is_file()
    checkpoints = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert checkpoints == ["step_000000002", "step_000000003"]
    state = json.loads(
        (output / "checkpoints" / checkpoints[-1] / "training_state.json").read_text()
    )
    assert (state["process_count"], state["batcher"]["batch_size"]) == (2, 4)
    assert state["optimizer_iterations"] == 3
    with np.load(output / "checkpoints" / checkpoints[-1] / "memory.npz") as memories:
        assert memories["arr_0"].shape == (4, 16, 64)
        # Both ranks' rows: no row is left at zero.
        assert np.all(np.abs(memories["arr_0"]).sum(axis=(1, 2)) > 0)


@only("tensorflow")
def test_tensorflow_multi_worker_restore_refuses_before_restoring(tmp_path):
    """A checkpoint cannot give each TensorFlow worker its rows: refused
    before any weight is loaded."""
    from keras_allattn.distribution import DataParallelPlan
    from keras_allattn.training import restore_training
    from keras_allattn.training import save_training

    saved = worker.make_model(worker.CONFIG)
    batcher = StreamBatcher(worker.tokens(), 4, worker.CONFIG["block_size"], seed=0)
    worker.train_steps(saved, None, batcher, 1)
    save_training(saved, tmp_path, 1)
    plan = DataParallelPlan("tensorflow", global_batch_size=4, num_replicas=2,
                            process_index=0, process_count=2,
                            model_batch_size=2, uses_fit=False)
    model = worker.make_model(dict(worker.CONFIG, batch_size=2))
    before = [np.array(w) for w in model.get_weights()]
    with pytest.raises(ValueError, match="multi-worker run are not supported"):
        restore_training(model, tmp_path, plan=plan)
    for weight, kept in zip(model.get_weights(), before):
        np.testing.assert_array_equal(weight, kept)
