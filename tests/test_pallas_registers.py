"""benchmarks/pallas_registers.py: the forward Pallas kernel lowered to
Triton IR on the CPU and compiled for sm_90 (no GPU), loops counted."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

if os.environ.get("KERAS_BACKEND") != "jax":
    pytest.skip("the Pallas kernels are for the JAX backend: run with "
                "KERAS_BACKEND=jax", allow_module_level=True)
# Not imported here: triton's LLVM and TensorFlow's clash in one process
# (the script runs in a subprocess).
SPEC = importlib.util.find_spec("triton")
if SPEC is None:
    pytest.skip("triton is not installed", allow_module_level=True)
CUOBJDUMP = (pathlib.Path(SPEC.submodule_search_locations[0])
             / "backends" / "nvidia" / "bin" / "cuobjdump")


@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="triton's cuobjdump is missing")
def test_forward_compiles_for_sm90(tmp_path):
    env = dict(os.environ, KERAS_BACKEND="jax", TRITON_CACHE_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "benchmarks/pallas_registers.py", "--kernels", "forward",
         "--spans", "fixed", "--loops", "--dump-ir", str(tmp_path / "ir")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    [line] = [x for x in out.stdout.splitlines() if x.startswith("{")]
    row = json.loads(line)
    assert "error" not in row, row
    assert row["kernel"] == "forward" and row["tiles"] == [64, 64, 4, 2]
    assert 0 < row["registers"] <= 255 and row["shared_bytes"] > 0
    assert row["loops"] and all(x["instructions"] > 0 for x in row["loops"])
    [ir] = (tmp_path / "ir").iterdir()
    assert "tt.func public @all_attention_fwd" in ir.read_text()
