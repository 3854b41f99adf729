import os
import pathlib

# The compiled PyTorch training step (`jit_compile=True`) is traced and
# compiled by torch.compile's "eager" backend in the tests: the graph, the
# state it carries and its numbers are what they check; inductor's C++ code
# generation takes minutes per graph on a 2-core CPU.
os.environ.setdefault("KERAS_ALLATTN_TORCH_COMPILE_BACKEND", "eager")

import keras
import numpy as np
import pytest

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


# Fixes the `rng` fixture's seed (every test draws from it) to rerun a
# failure with the inputs it had.
SEED_VARIABLE = "KERAS_ALLATTN_TEST_SEED"


@pytest.fixture
def rng(request):
    """A fresh NumPy generator per test, also seeding Keras.

    The seed follows the test's name and the process's string hashing
    (`PYTHONHASHSEED`), so runs draw fresh inputs; a failing test's report
    names its seed, which `KERAS_ALLATTN_TEST_SEED` sets again.
    """
    fixed = os.environ.get(SEED_VARIABLE)
    if fixed:
        seed = int(fixed)
    else:
        seed = abs(hash(request.node.nodeid)) % (2**31)
    request.node.user_properties.append(("rng seed", seed))
    keras.utils.set_random_seed(seed)
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Adds the `rng` seed to a failing test's report."""
    report = (yield).get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "rng seed":
                report.sections.append((
                    "rng seed",
                    f"{value}: rerun with {SEED_VARIABLE}={value}",
                ))


@pytest.fixture
def data_dir():
    if not DATA.is_dir():
        pytest.skip(f"shared corpora not found at {DATA}")
    return DATA


def randomize(layer_or_model, rng, span_low=0.0, span_high=1.0):
    """Random values for weights whose initial values are special.

    LayerNorm gains/biases are 1/0 and span ratios 0 at initialisation;
    tests draw them at random so that every term of the function counts.
    """
    for variable in layer_or_model.weights:
        name = variable.path
        if name.endswith("gamma") or name.endswith("beta") or name.endswith(
            "bias"
        ):
            variable.assign(rng.normal(0.3, 0.5, variable.shape))
        elif name.endswith("span_ratio"):
            variable.assign(rng.uniform(span_low, span_high, variable.shape))


def backend():
    return keras.backend.backend()


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
