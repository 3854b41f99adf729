"""Training the way the paper did: recipes, span logging, exact resume."""

import glob
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_allattn import AllAttentionLM
from keras_allattn.data import ResetMemoryOnRestart
from keras_allattn.data import StreamBatcher
from keras_allattn.data import evaluate_stream
from keras_allattn.presets import get_preset
from keras_allattn.presets import preset_names
from keras_allattn.training import AdagradClip
from keras_allattn.training import SpanLogger
from keras_allattn.training import StreamValidation
from keras_allattn.training import TrainingCheckpoint
from keras_allattn.training import latest_checkpoint
from keras_allattn.training import optimizer_from_recipe
from keras_allattn.training import restore_training
from keras_allattn.training import scale_recipe
from tests.conftest import backend
from tests.test_training import reference_scheduler

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def schedule_of(optimizer):
    """The optimizer's learning-rate schedule, rebuilt from its config."""
    return keras.optimizers.schedules.deserialize(
        optimizer.get_config()["learning_rate"]
    )


def tiny_model(dropout=0.0, embedding_dropout=0.0, recipe=None, seed=7):
    """2 layers, hidden 16, vocabulary 20, block 8, batch 2, span 16."""
    keras.utils.set_random_seed(seed)
    model = AllAttentionLM(
        vocabulary_size=20, num_layers=2, hidden_dim=16, num_heads=2,
        persistent_memory_size=4, max_span=16, block_size=8, batch_size=2,
        span_ramp=4, span_loss_coeff=1e-2, dropout=dropout,
        embedding_dropout=embedding_dropout,
    )
    recipe = recipe or dict(
        optimizer="adam", learning_rate=1e-2, warmup_steps=2, clip=1.0,
        steps=10, final_steps=0,
    )
    model.compile(
        optimizer=optimizer_from_recipe(recipe),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


# --- optimizer_from_recipe ---------------------------------------------------


def test_optimizer_from_recipe_char_recipe_is_adagrad_clip():
    recipe = get_preset("enwik8_small")["recipe"]
    optimizer = optimizer_from_recipe(recipe)
    assert isinstance(optimizer, AdagradClip)
    assert optimizer.grad_clip == 0.03
    assert schedule_of(optimizer).get_config() == {
        "learning_rate": 0.07, "warmup_steps": 32_000, "drop_step": 450_000,
        "drop_factor": 0.1, "name": "linear_warmup",
    }


def test_optimizer_from_recipe_word_recipe_is_adam_with_global_clip():
    optimizer = optimizer_from_recipe(get_preset("wikitext103")["recipe"])
    assert isinstance(optimizer, keras.optimizers.Adam)
    assert optimizer.global_clipnorm == 1.0
    assert optimizer.clipnorm is None
    assert optimizer.epsilon == 1e-8
    schedule = schedule_of(optimizer)
    # Update k reads the schedule at iterations k - 1.
    updates = (1, 4_000, 8_000, 800_000, 800_001)
    rates = [float(schedule(k - 1)) for k in updates]
    np.testing.assert_allclose(
        rates, [2.5e-4 / 8_000, 1.25e-4, 2.5e-4, 2.5e-4, 2.5e-5], rtol=1e-6
    )


@pytest.mark.parametrize(
    "name, total_steps",
    [("text8_small", 40), ("char_small_cpu", 200), ("char_small_cpu", None)],
)
def test_recipe_schedule_follows_the_reference_order(name, total_steps):
    """Every update of a (scaled) recipe uses the rate the reference's loop
    gives it: scheduler stepped before the update, so update k uses
    lr * min(1, k / warmup), and lr / 10 after `steps` updates."""
    recipe = get_preset(name)["recipe"]
    if total_steps is not None:
        recipe = scale_recipe(recipe, total_steps)
    schedule = schedule_of(optimizer_from_recipe(recipe))
    scheduler = reference_scheduler(
        recipe["learning_rate"], recipe["warmup_steps"],
        recipe["steps"] if recipe["final_steps"] else None, 0.1,
    )
    length = recipe["steps"] + recipe["final_steps"]
    updates = sorted(
        {1, 2, 3, recipe["warmup_steps"], recipe["steps"], recipe["steps"] + 1,
         length} | set(range(1, min(length, 400) + 1))
    )
    updates = [k for k in updates if k <= length]
    expected = {}
    for k in range(1, length + 1):
        scheduler.step()
        expected[k] = scheduler.lr
    for k in updates:
        assert float(schedule(k - 1)) == pytest.approx(expected[k], rel=1e-6), k
    if name == "text8_small":
        # Adagrad's warm-up is capped at 3x the run: without a final phase,
        # the run's last update is at a third of the peak rate, exactly.
        plain = scale_recipe(dict(get_preset(name)["recipe"], final_steps=0),
                             total_steps)
        assert plain["warmup_steps"] == 3 * total_steps
        last = float(schedule_of(optimizer_from_recipe(plain))(total_steps - 1))
        assert last == pytest.approx(plain["learning_rate"] / 3, rel=1e-6)


def test_scale_recipe_fits_the_schedule_to_the_run():
    recipe = get_preset("char_small_cpu")["recipe"]  # 100 warm-up, 3000 + 300
    assert scale_recipe(recipe, 3_300) == recipe
    scaled = scale_recipe(recipe, 200)
    assert (scaled["warmup_steps"], scaled["steps"], scaled["final_steps"]) == (
        20, 182, 18,
    )
    longer = scale_recipe(recipe, 33_000)
    assert (longer["warmup_steps"], longer["steps"], longer["final_steps"]) == (
        100, 30_000, 3_000,
    )
    assert scale_recipe(recipe, 1)["steps"] == 1
    optimizer = optimizer_from_recipe(recipe, total_steps=200)
    assert schedule_of(optimizer).get_config()["warmup_steps"] == 20
    assert schedule_of(optimizer).get_config()["drop_step"] == 182
    # Adagrad keeps a warm-up longer than a short run (to at most 3x it).
    adagrad = get_preset("text8_small")["recipe"]  # 32,000 warm-up
    assert scale_recipe(adagrad, 600)["warmup_steps"] == 1_800
    assert scale_recipe(adagrad, 100_000)["warmup_steps"] == 32_000
    # A recipe with no final steps never drops the rate.
    tiny = optimizer_from_recipe(get_preset("char_tiny_cpu")["recipe"])
    assert schedule_of(tiny).get_config()["drop_step"] is None


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_recipe_gives_an_optimizer(name):
    recipe = get_preset(name)["recipe"]
    optimizer = optimizer_from_recipe(recipe, total_steps=1_000)
    expected = AdagradClip if recipe["optimizer"] == "adagrad_clip" else (
        keras.optimizers.Adam
    )
    assert isinstance(optimizer, expected)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"optimizer": "sgd"}, "`optimizer` must be one of"),
        ({"steps": 0}, "`steps` must be a positive integer"),
        ({"warmup_steps": None}, "`warmup_steps` must be a non-negative"),
    ],
)
def test_optimizer_from_recipe_rejects_bad_recipes(change, message):
    recipe = dict(get_preset("char_tiny_cpu")["recipe"], **change)
    with pytest.raises(ValueError, match=message):
        optimizer_from_recipe(recipe)
    with pytest.raises(ValueError, match="'clip'"):
        optimizer_from_recipe(
            {k: v for k, v in recipe.items() if k != "clip"}
        )
    with pytest.raises(ValueError, match="`total_steps` must be a positive"):
        scale_recipe(get_preset("char_tiny_cpu")["recipe"], 0)


# --- SpanLogger and StreamValidation -----------------------------------------


def test_span_logger_logs_spans_and_writes_a_heatmap(tmp_path, capsys):
    model = tiny_model()
    tokens = np.random.default_rng(0).integers(0, 20, 200).astype("int32")
    dataset = StreamBatcher(tokens, 2, 8, seed=0).as_dataset()
    heatmap = tmp_path / "plots" / "spans.png"
    logger = SpanLogger(
        2, log_dir=tmp_path / "tensorboard", heatmap_path=heatmap
    )
    model.fit(
        dataset, steps_per_epoch=5, epochs=1, verbose=0,
        callbacks=[ResetMemoryOnRestart(dataset), logger],
    )
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "spans mean/max" in line]
    # Steps 2 and 4, then the final step 5 at the end of training.
    assert [int(line.split()[1]) for line in lines] == [2, 4, 5]
    assert lines[-1].split(": ")[1].count("/") == 2  # a pair per layer
    assert [step for step, _ in logger.records] == [2, 4, 5]
    np.testing.assert_array_equal(logger.records[-1][1], model.current_spans())
    assert heatmap.read_bytes()[:8] == PNG_SIGNATURE
    if not all(map(importlib.util.find_spec, ("tensorflow", "tensorboard"))):
        assert "no TensorBoard events" in out
    else:
        assert glob.glob(str(tmp_path / "tensorboard" / "events.out.*"))
    # The step count continues from the optimizer's iterations.
    model.fit(
        dataset, steps_per_epoch=2, epochs=1, verbose=0, callbacks=[logger]
    )
    assert logger.records[-1][0] == 7


def test_stream_validation_adds_exact_validation_to_the_logs():
    model = tiny_model()
    rng = np.random.default_rng(1)
    train = rng.integers(0, 20, 200).astype("int32")
    valid = rng.integers(0, 20, 49).astype("int32")  # 3 rows of 2 blocks
    dataset = StreamBatcher(train, 2, 8, seed=0).as_dataset()
    validation = StreamValidation(valid, "bits_per_character", batch_size=3)
    history = model.fit(
        dataset, steps_per_epoch=2, epochs=2, verbose=0,
        callbacks=[ResetMemoryOnRestart(dataset), validation],
    )
    expected = evaluate_stream(model, valid, batch_size=3)
    np.testing.assert_allclose(
        history.history["val_bits_per_character"][-1],
        expected["bits_per_token"], rtol=1e-6,
    )
    np.testing.assert_allclose(
        history.history["val_loss"][-1], expected["loss"], rtol=1e-6
    )
    assert [iteration for iteration, _ in validation.results] == [2, 4]
    with pytest.raises(ValueError, match="`metric` must be one of"):
        StreamValidation(valid, "accuracy")


# --- Checkpoints and exact resume --------------------------------------------


def test_resume_from_checkpoint_gives_the_same_losses(tmp_path):
    # Attention and embedding dropout draw from seed generators, whose
    # state the checkpoint restores.
    embedding_dropout = 0.1
    recipe = dict(
        optimizer="adagrad_clip", learning_rate=0.1, warmup_steps=2,
        clip=0.5, steps=5, final_steps=3,
    )
    tokens = np.random.default_rng(0).integers(0, 20, 50).astype("int32")
    # 25 tokens per stream: a pass holds 2 or 3 blocks, so the stream
    # restarts (memory reset, random offset) before and after step k.
    k = 4

    def new_model():
        return tiny_model(0.1, embedding_dropout, recipe)

    def train(model, start_step, steps, extra=()):
        dataset = StreamBatcher(tokens, 2, 8, seed=3).as_dataset(start_step)
        history = model.fit(
            dataset, steps_per_epoch=1, epochs=steps, verbose=0,
            callbacks=[ResetMemoryOnRestart(dataset)]
            + [make(dataset) for make in extra],
        )
        return history.history["loss"]  # one step per epoch: per-step losses

    uninterrupted = new_model()
    straight = train(uninterrupted, 0, 2 * k)

    directory = tmp_path / "checkpoints"
    stopped = new_model()
    first = train(
        stopped, 0, k,
        [lambda dataset: TrainingCheckpoint(directory, 1, dataset, keep=2)],
    )
    assert sorted(os.listdir(directory)) == [
        "step_000000003", "step_000000004",
    ]
    assert latest_checkpoint(directory).endswith("step_000000004")
    memory = stopped.get_memory()[0]
    assert np.abs(memory).max() > 0  # the memory carries into step k

    resumed = new_model()
    with pytest.raises(ValueError, match="does not match"):
        restore_training(
            resumed, directory, StreamBatcher(tokens, 2, 8, seed=4)
        )
    start = restore_training(
        resumed, directory, StreamBatcher(tokens, 2, 8, seed=3)
    )
    assert start == k
    np.testing.assert_array_equal(resumed.get_memory()[0], memory)
    second = train(resumed, start, k)

    np.testing.assert_allclose(first + second, straight, rtol=1e-5)
    for a, b in zip(resumed.get_weights(), uninterrupted.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="No training checkpoint"):
        restore_training(resumed, tmp_path / "empty")


# --- The example script ------------------------------------------------------


@pytest.mark.skipif(
    backend() != "tensorflow",
    reason="the example's smoke run happens once, in the TensorFlow session "
    "(the quickest one); the script itself runs with KERAS_BACKEND=jax",
)
def test_train_text8_example_runs(tmp_path):
    words = "the layer reads its memory and persistent vectors then".split()
    rng = np.random.default_rng(0)
    text = " ".join(rng.choice(words, 2000))[:5139] + "s"
    # 5140 characters in text8's alphabet split 90/5/5: 4626 / 257 / 257,
    # so validation and test are each one block of 8 x 32 (JAX compiles the
    # eager evaluation once per shape).
    data = tmp_path / "small.txt"
    data.write_text(text)
    output = tmp_path / "run"
    command = [
        sys.executable, str(ROOT / "examples" / "train_text8.py"),
        "--steps", "6", "--preset", "char_tiny_cpu", "--eval-every", "3",
        "--data", str(data), "--output", str(output),
    ]
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")

    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert {
        "valid_bits_per_character", "test_bits_per_character",
        "train_tokens_per_s",
    } <= set(result)
    assert 0 < result["valid_bits_per_character"] < 6
    assert 0 < result["test_bits_per_character"] < 6
    assert result["train_tokens_per_s"] > 0
    assert "val_bits_per_character" in out  # validation at steps 3 and 6
    assert "step 6 spans mean/max per layer" in out
    assert (output / "spans.png").read_bytes()[:8] == PNG_SIGNATURE
    assert latest_checkpoint(output / "checkpoints").endswith("000000006")


@pytest.mark.skipif(
    backend() != "tensorflow",
    reason="runs the example scripts (with KERAS_BACKEND=jax) once, in the "
    "TensorFlow session",
)
def test_equal_time_comparison_and_curve_plot(tmp_path):
    """--transformer trains the same-size baseline, --time-budget stops it,
    curve.json records the validation curve, plot_curves.py draws both."""
    words = "the layer reads its memory and persistent vectors then".split()
    text = " ".join(np.random.default_rng(1).choice(words, 2000))[:5140]
    data = tmp_path / "small.txt"
    data.write_text(text)
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")

    def train(name, *flags):
        command = [
            sys.executable, str(ROOT / "examples" / "train_text8.py"),
            "--preset", "char_tiny_cpu", "--data", str(data),
            "--output", str(tmp_path / name), *flags,
        ]
        done = subprocess.run(command, env=env, capture_output=True,
                              text=True, timeout=600, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        run = json.loads((tmp_path / name / "curve.json").read_text())
        assert run["result"] == json.loads(done.stdout.strip().splitlines()[-1])
        return run

    allattn = train("allattn", "--steps", "6", "--eval-every", "3",
                    "--valid-tokens", "100")
    baseline = train("transformer", "--transformer", "--steps", "50",
                     "--eval-every", "2", "--time-budget", "1e-6")
    assert allattn["result"]["model"] == "all-attention"
    assert [p["step"] for p in allattn["curve"]] == [3, 6]
    assert all(p["val_bits_per_character"] > 0 for p in allattn["curve"])
    assert baseline["result"]["model"] == "transformer"
    # The budget ends training after the second step (the first compiles).
    assert baseline["result"]["steps"] == 2
    assert [p["step"] for p in baseline["curve"]] == [2]
    # Same size: persistent vectors (2 N d per layer) traded for a
    # feed-forward sublayer of width N (2 N d + biases + a layer norm).
    ratio = baseline["result"]["parameters"] / allattn["result"]["parameters"]
    assert 1.0 < ratio < 1.02

    png = tmp_path / "curves.png"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plot_curves.py"),
         str(tmp_path / "allattn"), str(tmp_path / "transformer"),
         "--out", str(png)],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert png.read_bytes()[:8] == PNG_SIGNATURE
