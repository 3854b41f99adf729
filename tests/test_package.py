"""The package as users see it: public API, README names, dependencies."""

import ast
import importlib
import os
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

import keras_allattn
from tests.conftest import backend

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "keras_allattn"
# Every package declares `__all__`.
WITHOUT_ALL = set()
INTERNAL = {"SpanTrimming", "DataParallelPlan", "data_parallel_distribution",
            "distribution"}


def python_files():
    return sorted(PACKAGE.rglob("*.py"))


def resolve(dotted):
    """The object a dotted path names, importing modules along the way."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if not hasattr(obj, part):
            importlib.import_module(".".join(parts[: i + 1]))
        obj = getattr(obj, part)
    return obj


def readme_references(text):
    """The keras_allattn names the README uses, as dotted paths.

    From its ```python blocks: every `import` and `from ... import` of
    keras_allattn, and every attribute chain on the name `keras_allattn`.
    From its prose and shell blocks: every `keras_allattn.a.b` written out.
    """
    names = set()
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module.startswith(
                "keras_allattn"
            ):
                names.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(
                    a.name for a in node.names
                    if a.name.startswith("keras_allattn")
                )
            elif isinstance(node, ast.Attribute):
                chain, inner = [node.attr], node.value
                while isinstance(inner, ast.Attribute):
                    chain.append(inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id == "keras_allattn":
                    names.add(".".join(["keras_allattn"] + chain[::-1]))
    for dotted in re.findall(r"\bkeras_allattn(?:\.[A-Za-z_]\w*)+", text):
        names.add(dotted)
    return names


def test_every_name_the_readme_uses_imports_by_its_path():
    text = (ROOT / "README.md").read_text()
    names = readme_references(text)
    # The README's main snippets: the test reads them.
    for expected in ("keras_allattn.AllAttentionLM",
                     "keras_allattn.data.StreamBatcher",
                     "keras_allattn.data.evaluate_stream",
                     "keras_allattn.set_deterministic",
                     "keras_allattn.tokenizers.corpus_tokenizer"):
        assert expected in names, expected
    missing = []
    for dotted in sorted(names):
        try:
            resolve(dotted)
        except (ImportError, AttributeError):
            missing.append(dotted)
    assert not missing, f"README names that do not import: {missing}"
    # And none of them reaches into a private module or name.
    private = [n for n in names if any(p.startswith("_") for p in n.split("."))]
    assert not private, private


def test_the_readme_parser_sees_a_drifted_name():
    drifted = "```python\nfrom keras_allattn.data import NoSuchBatcher\n```\n"
    names = readme_references(drifted + "and `keras_allattn.ops.nowhere`.")
    assert names == {"keras_allattn.data", "keras_allattn.data.NoSuchBatcher",
                     "keras_allattn.ops.nowhere"}
    with pytest.raises(ImportError):
        resolve("keras_allattn.data.NoSuchBatcher")


def test_every_package_declares_all_and_its_names_exist():
    packages = ["keras_allattn"] + [
        info.name
        for info in pkgutil.walk_packages(keras_allattn.__path__, "keras_allattn.")
        if info.ispkg
    ]
    assert {"keras_allattn.data", "keras_allattn.training",
            "keras_allattn.cli"} <= set(packages)
    for name in packages:
        if name in WITHOUT_ALL:
            continue
        module = importlib.import_module(name)
        assert hasattr(module, "__all__"), f"{name} has no __all__"
        assert len(set(module.__all__)) == len(module.__all__), name
        for public in module.__all__:
            assert hasattr(module, public), f"{name}.{public}"
            assert not public.startswith("_"), f"{name}.{public}"
    assert not INTERNAL & set(keras_allattn.__all__)
    with pytest.warns(DeprecationWarning, match="not part of the public API"):
        keras_allattn.SpanTrimming
    with pytest.raises(AttributeError):
        keras_allattn.no_such_name


def lines_matching(pattern):
    """`path:line` of every line of the package that matches `pattern`."""
    pattern = re.compile(pattern)
    return [
        f"{path.relative_to(ROOT)}:{number}"
        for path in python_files()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]


def test_no_private_modules_of_dependencies():
    offenders = lines_matching(r"\b(keras_hub\.src|keras\.src|tf_keras)\b")
    assert not offenders, offenders


def test_no_private_optimizer_methods():
    """A loop that must clip uses the project's `clip_gradients` or the
    optimizer's public `apply`, never its private methods."""
    offenders = lines_matching(r"\boptimizer\._[a-z]")
    assert not offenders, offenders


# Names that moved to their own module, with the old paths that still
# import them (user code and saved files may name them).
MOVED = {
    "keras_allattn.training.callbacks.SpanTrimming": (
        "keras_allattn.models.all_attention_lm.SpanTrimming",
    ),
    "keras_allattn.compiling.torch_compile": (
        "keras_allattn.models.generation.torch_compile",
    ),
    "keras_allattn.ops.kernel_settings.set_deterministic": (
        "keras_allattn.ops.attention.set_deterministic",
        "keras_allattn.set_deterministic",
    ),
    "keras_allattn.ops.kernel_settings.INTEGRATIONS": (
        "keras_allattn.ops.attention.INTEGRATIONS",
    ),
    "keras_allattn.layers.adaptive_clusters.check_cutoffs": (
        "keras_allattn.layers.adaptive_embedding.check_cutoffs",
    ),
    "keras_allattn.distribution.trainer.DataParallelTrainer": (
        "keras_allattn.distribution.DataParallelTrainer",
        "keras_allattn.DataParallelTrainer",
    ),
    "keras_allattn.distribution.jax_engine.data_parallel_distribution": (
        "keras_allattn.distribution.data_parallel_distribution",
    ),
}


def test_each_concept_in_its_module_and_the_old_paths_still_import():
    from keras_allattn.models.all_attention_lm import AllAttentionLM
    from keras_allattn.models.backbone import AllAttentionBackbone

    # The network and its memory are the backbone; the LM adds the head.
    assert issubclass(AllAttentionLM, AllAttentionBackbone)
    for name in ("_network", "reset_memory", "get_memory", "set_memory",
                 "update_span_trimming", "resolve_remat"):
        assert name in vars(AllAttentionBackbone), name
    for name in ("call_with_memory", "compute_loss", "generate", "fit",
                 "from_preset", "get_config"):
        assert name in vars(AllAttentionLM), name
    # Saved files name the class by its registered name.
    assert keras_allattn.models.AllAttentionLM is AllAttentionLM
    import keras

    assert keras.saving.get_registered_name(AllAttentionLM) == (
        "keras_allattn>AllAttentionLM"
    )
    for home, old_paths in MOVED.items():
        obj = resolve(home)
        for old in old_paths:
            assert resolve(old) is obj, old


def imported_modules(path):
    """The modules a file imports (`from M import N` counts as `M` and `M.N`)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def test_the_kernels_and_the_dispatcher_do_not_import_each_other_back():
    """`ops/attention.py` reaches the kernels; the kernels read the shared
    settings from `ops/kernel_settings.py`, which imports neither."""
    ops = PACKAGE / "ops"
    for kernel in ("pallas_attention.py", "triton_attention.py"):
        imports = imported_modules(ops / kernel)
        assert "keras_allattn.ops.attention" not in imports, kernel
        assert "keras_allattn.ops.kernel_settings" in imports, kernel
    settings = imported_modules(ops / "kernel_settings.py")
    assert not {m for m in settings if m.startswith("keras_allattn")}, settings


def private_jax_modules_used():
    """`M.N` for every `from M import N` (and `M` for `import M`) of jax._src."""
    pattern = re.compile(r"^\s*(?:from (jax\._src[\w.]*) import (\w+)"
                         r"|import (jax\._src[\w.]*))")
    used = set()
    for path in python_files():
        for line in path.read_text().splitlines():
            match = pattern.match(line)
            if match and match.group(1):
                used.add(f"{match.group(1)}.{match.group(2)}")
            elif match:
                used.add(match.group(3))
    return used


def test_the_library_imports_no_private_jax_module():
    """The Pallas kernels use public JAX only (the position-key gradient is
    a matmul outside them, so no hand-built atomic primitive is needed)."""
    assert private_jax_modules_used() == set()


def test_library_code_logs_instead_of_printing():
    """`print` only in the commands' `main` functions (their output)."""
    offenders = []
    for path in python_files():
        tree = ast.parse(path.read_text())
        allowed = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in (
                "main", "_usage"
            ):
                allowed.update(id(n) for n in ast.walk(node))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "print"
                and id(node) not in allowed
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


BLOCKED_IMPORTS = """
import sys
BLOCKED = ("tensorflow", "torch", "keras_hub", "tensorflow_text", "triton")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed")
sys.meta_path.insert(0, Block())
import numpy as np
import keras
import keras_allattn
from keras_allattn.data import StreamBatcher, evaluate_stream
from keras_allattn.cli import main
model = keras_allattn.AllAttentionLM(
    vocabulary_size=16, num_layers=1, hidden_dim=8, num_heads=2,
    persistent_memory_size=2, max_span=8, block_size=4, batch_size=2)
tokens = np.arange(40) % 16
result = evaluate_stream(model, tokens, batch_size=2, verbose=0)
assert result["tokens"] == 39, result
assert main(["info"]) == 0
try:
    model.generate([1, 2], 4)
except ImportError as error:
    assert "keras-allattn[hub]" in str(error), error
else:
    raise AssertionError("generate ran without keras-hub")
print("ok")
"""


def test_the_demo_install_needs_only_keras_and_jax():
    """What `make demo` installs (the package and JAX) is enough to import
    the package, evaluate a model and run `keras-allattn info`; generation
    names the extra it needs."""
    if backend() != "jax":
        pytest.skip("the demo's install has JAX only")
    env = dict(os.environ, PYTHONPATH=str(ROOT), KERAS_BACKEND="jax")
    out = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORTS], capture_output=True,
        text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"


LOGGING = """
import logging, sys
import keras_allattn
library = logging.getLogger("keras_allattn")
log = logging.getLogger("keras_allattn.training.callbacks")
log.info("plain")
library.setLevel(logging.WARNING)
log.info("silenced")
log.warning("warning")
library.setLevel(logging.INFO)
# absl (TensorFlow) or the application configures the root logger: the
# library's lines stay on stdout, until the application takes them over.
logging.basicConfig(stream=sys.stderr, format="L %(name)s %(message)s")
log.info("still stdout")
library.handlers.clear()
library.propagate = True
log.info("redirected")
"""


def test_library_messages_go_through_logging():
    """The `keras_allattn` logger: stdout by default, levels apply, and the
    application can route its records to its own handlers."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", LOGGING], capture_output=True, text=True,
        env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["plain", "warning", "still stdout"]
    logged = [line for line in out.stderr.splitlines() if line.startswith("L ")]
    assert logged == ["L keras_allattn.training.callbacks redirected"]
