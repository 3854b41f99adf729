"""The `keras-allattn` command and the examples that wrap it."""

import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys

import keras
import pytest

from keras_allattn.cli import train as train_command
from tests.conftest import backend

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = "keras-allattn"
ENTRY_POINT = "keras_allattn.cli:main"

# The flags each example took before it became a wrapper of the command.
EXAMPLE_FLAGS = {
    "train_text8": {
        "--data", "--preset", "--steps", "--warmup-steps", "--learning-rate",
        "--optimizer", "--batch-size", "--block-size", "--max-span",
        "--mixed-precision", "--output", "--eval-every", "--time-budget",
        "--valid-tokens", "--transformer", "--seed", "--distribute",
        "--cpu-devices",
    },
    "train_wikitext103": {
        "--data", "--preset", "--cutoffs", "--div-val", "--steps",
        "--batch-size", "--block-size", "--max-span", "--mixed-precision",
        "--output", "--eval-every", "--seed",
    },
}
EXAMPLE_FLAGS["train_enwik8"] = EXAMPLE_FLAGS["train_text8"]
EXAMPLE_FLAGS["train_ptb"] = EXAMPLE_FLAGS["train_text8"]


def environment():
    """This checkout first on the path, the current backend, quiet TF."""
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        ),
        KERAS_BACKEND=backend(),
        TF_CPP_MIN_LOG_LEVEL="2",
    )


def declared_entry_point():
    """The `keras-allattn` entry point of the installed distribution, if any."""
    try:
        scripts = importlib.metadata.entry_points(group="console_scripts")
    except Exception:  # pragma: no cover - broken metadata
        return None
    for entry in scripts.select(name=SCRIPT):
        return entry.value
    return None


def command():
    """How to run `keras-allattn`: the installed script where the installed
    package declares it (as `make test` installs it), else `python -m
    keras_allattn` (a package installed before the command existed)."""
    if declared_entry_point() is None:
        return [sys.executable, "-m", "keras_allattn"]
    folder = os.path.dirname(sys.executable)
    script = shutil.which(SCRIPT, path=folder) or shutil.which(SCRIPT)
    assert script, (
        f"the installed package declares {SCRIPT} but no such script is on "
        f"the PATH or in {folder}"
    )
    return [script]


def run(args, timeout=600):
    return subprocess.run(
        args, capture_output=True, text=True, env=environment(),
        timeout=timeout, cwd=ROOT,
    )


def test_pyproject_declares_the_command():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["scripts"] == {SCRIPT: ENTRY_POINT}
    module, _, name = ENTRY_POINT.partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    installed = declared_entry_point()
    assert installed in (None, ENTRY_POINT)
    extras = project["optional-dependencies"]
    assert {"jax", "jax-cuda", "torch", "tensorflow", "hub", "all"} <= set(extras)
    assert any("cuda" in requirement for requirement in extras["jax-cuda"])
    # Ranges for users: no exact pin of a dependency.
    for requirement in project["dependencies"] + sum(extras.values(), []):
        assert "==" not in requirement, requirement


def test_info_command_reports_backend_devices_and_fused_kernels():
    out = run(command() + ["info"])
    assert out.returncode == 0, out.stderr
    assert f"backend: {backend()}" in out.stdout
    assert "devices: " in out.stdout
    line = next(
        line for line in out.stdout.splitlines()
        if line.startswith("fused attention kernels: ")
    )
    as_json = run([sys.executable, "-m", "keras_allattn.info", "--json"])
    assert as_json.returncode == 0, as_json.stderr
    info = json.loads(as_json.stdout.strip().splitlines()[-1])
    assert info["backend"] == backend()
    assert info["keras"] == keras.__version__
    assert info["devices"]
    if not info["fused_kernels"]:
        assert info["reason"] and info["reason"] in line
        assert line.startswith("fused attention kernels: no")


def test_train_help_lists_the_example_flags():
    out = run(command() + ["train", "--help"])
    assert out.returncode == 0, out.stderr
    assert "--corpus" in out.stdout and "--data" in out.stdout
    cli_flags = set(train_command.build_parser()._option_string_actions)
    for example, flags in EXAMPLE_FLAGS.items():
        corpus = example.removeprefix("train_")
        parser = train_command.build_parser(corpus=corpus)
        example_flags = set(parser._option_string_actions)
        assert flags <= example_flags, (example, flags - example_flags)
        assert example_flags | {"--corpus"} == cli_flags


def test_unknown_command_and_missing_data_are_usage_errors():
    out = run(command() + ["fly"])
    assert out.returncode == 2 and "unknown command 'fly'" in out.stderr
    with pytest.raises(SystemExit) as exit_info:
        train_command.main(["--corpus", "ptb"])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="Received: corpus='ptb', data=None"):
        train_command.load_corpus("ptb")
    with pytest.raises(ValueError, match="`corpus` must be one of"):
        train_command.load_corpus("imagenet")


def test_offline_default_corpus_needs_no_data():
    corpus = train_command.load_corpus("text8")
    assert corpus.name == "text8 (pydoc topics)"
    assert corpus.vocabulary_size == 27
    n = len(corpus.train) + len(corpus.valid) + len(corpus.test)
    assert len(corpus.train) == int(n * 0.9) and n > 300_000
    assert corpus.decode(corpus.train[:200]).islower()
    corpus = train_command.load_corpus("enwik8")
    assert corpus.level == "byte" and corpus.vocabulary_size == 256


def test_tiny_training_run_then_generate(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log. " * 12)
    output = tmp_path / "run"
    out = run(command() + [
        "train", "--data", str(text), "--preset", "char_tiny_cpu",
        "--batch-size", "2", "--block-size", "8", "--max-span", "16",
        "--steps", "2", "--eval-every", "2", "--output", str(output),
    ])
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["backend"] == backend() and result["steps"] == 2
    assert result["corpus"] == "enwik8 (text.txt)"
    assert 0 < result["test_bits_per_byte"] < 16
    # The logger's progress lines come before the result.
    assert any(line.startswith("model: char_tiny_cpu") for line in lines)
    assert json.loads((output / "curve.json").read_text())["result"] == result
    assert (output / "model.keras").is_file()

    if backend() != "jax":
        return  # generation compiles slowly elsewhere: once, on the demo's backend
    # A fresh process loads the saved model (its optimizer and schedule are
    # registered on import) and samples from it.
    out = run(command() + [
        "generate", "--checkpoint", str(output / "model.keras"),
        "--prompt", "the ", "--max-length", "10", "--num-samples", "2",
        "--sampler", "greedy", "--verbose", "0",
    ])
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("--- sample")]
    assert [lines[i] for i in headers] == [
        "--- sample 0 (greedy, jax)", "--- sample 1 (greedy, jax)"
    ]
    first, second = lines[headers[0] + 1], lines[headers[1] + 1]
    assert first == second and first.startswith("the ")
