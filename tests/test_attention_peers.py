"""benchmarks/attention_peers.py and attention_peers_jax.py: the fused kernels
beside the fastest attention kernels (flop counts, CPU runs, arguments)."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

torch_only = pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="the script times PyTorch's kernels",
)
jax_only = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="the script times JAX's kernels",
)


def _run(script, *args, **env):
    """Runs benchmarks/`script` with `args`: (return code, stderr, last JSON line)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT), **env),
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return out.returncode, out.stderr, json.loads(lines[-1]) if lines else None


def _script():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import attention_peers

    return attention_peers


@torch_only
def test_useful_flops_count_the_layer_and_the_peer():
    peers = _script()
    shape = dict(B=2, M=8, H=3, D=4, A=20, N=5, max_span=None, span=None)
    # Forward multiply-adds: Q K^T and A V over A + N keys, plus Q P over
    # the A distances for the library; 2 flops each, backward 2.5 times.
    assert peers.useful_flops(shape, peer=True) == 3.5 * 2 * (2 * 3 * 8 * 4) * 2 * 25
    assert peers.useful_flops(shape, peer=False) == 3.5 * 2 * (2 * 3 * 8 * 4) * (2 * 25 + 20)
    # Under a span only the distances it reaches count (span + ramp).
    spanned = dict(shape, A=100, max_span=200, span=10)
    reach = 10 + 32
    assert peers.useful_flops(spanned, peer=True) == 3.5 * 2 * (2 * 3 * 8 * 4) * 2 * (reach + 5)


@torch_only
def test_smoke_run_prints_both_implementations():
    code, err, record = _run("attention_peers.py", "--smoke", "--rounds", "1",
                             "--calls", "1", TRITON_INTERPRET="1")
    assert code == 0, err[-3000:]
    assert record["config"] == "tiny" and record["dropout"] == 0.3
    for name in ("library", "math"):
        assert f"{name}_error" not in record, record
        assert record[f"{name}_fwd_bwd_ms"] > 0 and record[f"{name}_fwd_ms"] > 0


@torch_only
def test_bad_arguments_name_the_flag():
    code, err, _ = _run("attention_peers.py", "--smoke", "--configs", "nope")
    assert code != 0 and "--configs" in err and "'nope'" in err
    code, err, _ = _run("attention_peers.py", "--peers", "flash,nope")
    assert code != 0 and "--peers" in err and "'nope'" in err



@jax_only
def test_jax_script_counts_flops_as_the_torch_script():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import attention_peers_jax

    cfg = dict(batch=2, queries=8, heads=3, head_dim=4, length=20, persistent=5)
    assert attention_peers_jax.useful_flops(cfg, 2, peer=True) == 3.5 * 2 * (2 * 3 * 8 * 4) * 2 * 25
    assert attention_peers_jax.useful_flops(cfg, 2, peer=False) == (
        3.5 * 2 * (2 * 3 * 8 * 4) * (2 * 25 + 20))


@jax_only
def test_jax_smoke_run_prints_both_implementations():
    code, err, record = _run("attention_peers_jax.py", "--smoke", "--repeats", "1")
    assert code == 0, err[-3000:]
    for name in ("library", "xla"):
        assert f"{name}_error" not in record, record
        assert record[f"{name}_fwd_bwd_ms"] > 0


def test_row_names_each_implementation_and_its_failures(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _common

    monkeypatch.setenv("BENCHMARK_COMMIT", "abc1234")
    record = {"library_fwd_bwd_ms": 6.5, "library_tflops": 144.5,
              "flash_fwd_bwd_ms": 3.4, "flash_tflops": 208.7,
              "cudnn_error": "RuntimeError('no kernel')"}
    path = tmp_path / "RESULTS.md"
    _common.append_peers_row("attention_peers", "NVIDIA H200", "torch", record,
                             ["library", "flash", "cudnn"], "config fixed", path=path)
    row = path.read_text()
    assert row.endswith(" | config fixed |\n") and row.count("\n") == 1
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    assert cells[1:5] == ["attention_peers", "NVIDIA H200", "torch", "abc1234"]
    assert cells[5] == ("forward+backward a layer: library 6.5 ms (144.5 TFLOP/s), "
                        "flash 3.4 ms (208.7 TFLOP/s), cudnn failed")
