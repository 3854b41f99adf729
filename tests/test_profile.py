"""benchmarks/_profile.py: the step's device time by category, from a
profiler trace (and `throughput.py --profile`)."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _profile  # noqa: E402


def event(name, ts, dur, pid=1, tid=1, **extra):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": pid,
            "tid": tid, **extra}


def meta(kind, pid, name, tid=None):
    e = {"ph": "M", "name": kind, "pid": pid, "args": {"name": name}}
    if tid is not None:
        e["tid"] = tid
    return e


def test_categories_of_kernel_names():
    cases = {
        "all_attention_fwd": "attention kernels",
        "_bwd_dkdv_kernel": "attention kernels",
        "sm90_xmma_gemm_bf16bf16_bf16f32": "matmuls",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "matmuls",
        "aten::mm": "matmuls",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "collectives",
        "Memcpy DtoD (Device -> Device)": "copies and memory",
        "dynamic-update-slice.3": "copies and memory",
        "loop_add_fusion_2": _profile.OTHER,
        "triton_poi_fused_add_0": _profile.OTHER,
        "aten::mm_backward_helper": _profile.OTHER,
    }
    assert {name: _profile.category(name) for name in cases} == cases


def test_summary_of_jax_gpu_streams():
    # Two steps: the GPU's stream events count, its "XLA Ops" line (the
    # same time by HLO op) and the host's events do not.
    events = [
        meta("process_name", 7, "/device:GPU:0"),
        meta("thread_name", 7, "Stream #13(Compute)", tid=1),
        meta("thread_name", 7, "XLA Ops", tid=2),
        meta("process_name", 3, "/host:CPU"),
        meta("thread_name", 3, "python", tid=9),
        *[event("all_attention_fwd", 100 * s, 3000, pid=7) for s in range(2)],
        *[event("all_attention_dq", 100 * s + 10, 5000, pid=7) for s in range(2)],
        *[event("sm90_xmma_gemm_bf16", 100 * s + 20, 1000, pid=7)
          for s in range(2) for _ in range(2)],
        event("loop_fusion", 500, 1000, pid=7),
        event("all_attention_fwd", 0, 99000, pid=7, tid=2),
        event("PjitFunction(step)", 0, 99000, pid=3, tid=9),
    ]
    summary = _profile.summarise(events, 2, "jax")
    assert summary["source"] == "GPU kernels"
    assert summary["busy_ms_per_step"] == pytest.approx(10.5)
    # Overlapping events (two streams' worth) leave no idle time.
    assert summary["idle_ms_per_step"] == 0.0
    by_name = {c["name"]: c for c in summary["categories"]}
    assert list(by_name) == ["attention kernels", "matmuls", _profile.OTHER]
    assert by_name["attention kernels"]["ms_per_step"] == pytest.approx(8.0)
    assert by_name["attention kernels"]["share"] == pytest.approx(8 / 10.5, abs=1e-4)
    assert by_name["matmuls"]["launches_per_step"] == 2
    assert by_name[_profile.OTHER]["ms_per_step"] == pytest.approx(0.5)
    assert [t["name"] for t in summary["top"]] == [
        "all_attention_dq", "all_attention_fwd", "sm90_xmma_gemm_bf16",
        "loop_fusion"]


def test_summary_of_torch_gpu_kernels_and_host_self_times():
    gpu = [
        event("_fwd_kernel", 0, 4000, cat="kernel"),
        event("triton_poi_fused_mul_0", 5000, 500, cat="kernel"),
        event("Memcpy HtoD (Pageable -> Device)", 6000, 250, cat="gpu_memcpy"),
        event("aten::mm", 0, 9999, cat="cpu_op"),  # host side: not counted
    ]
    summary = _profile.summarise(gpu, 1, "torch")
    assert summary["source"] == "GPU kernels"
    assert summary["busy_ms_per_step"] == pytest.approx(4.75)
    # The GPU waited 4.0 -> 5.0 and 5.5 -> 6.0 ms.
    assert summary["idle_ms_per_step"] == pytest.approx(1.5)
    assert [t["name"] for t in summary["top"]] == [
        "_fwd_kernel", "triton_poi_fused_mul_0", "Memcpy HtoD (Pageable -> Device)"]
    # Without a GPU: host ops, each its self time (nested ops subtracted).
    host = [
        event("aten::linear", 0, 1000, cat="cpu_op"),
        event("aten::matmul", 100, 800, cat="cpu_op"),
        event("aten::mm", 150, 700, cat="cpu_op"),
        event("aten::add", 2000, 300, cat="cpu_op"),
        event("aten::mm", 2500, 100, cat="cpu_op", tid=2),
    ]
    summary = _profile.summarise(host, 1, "torch")
    assert summary["source"] == "host ops (no GPU)"
    assert "idle_ms_per_step" not in summary
    assert summary["busy_ms_per_step"] == pytest.approx(1.4)
    times = {t["name"]: t["ms_per_step"] for t in summary["top"]}
    assert times == pytest.approx({"aten::linear": 0.2, "aten::matmul": 0.1,
                                   "aten::mm": 0.8, "aten::add": 0.3})
    with pytest.raises(ValueError, match="steps=0"):
        _profile.summarise(host, 0, "torch")
    with pytest.raises(RuntimeError, match="no kernel or op events"):
        _profile.summarise([], 1, "torch")


@pytest.mark.skipif(keras.backend.backend() == "tensorflow",
                    reason="profiles are summarised for jax and torch")
def test_throughput_profile_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("KERAS_ALLATTN_TORCH_RING", "KERAS_ALLATTN_TORCH_CUDA_GRAPHS",
                 "KERAS_ALLATTN_POSITION_BYTES", "KERAS_ALLATTN_TRITON_POSITION"):
        env.pop(name, None)  # the defaults, as the row below says
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"),
         "--preset", "char_tiny_cpu", "--span", "fixed:32", "--layers", "1",
         "--steps", "1", "--warmup-steps", "1", "--jit-compile", "off",
         "--profile", str(tmp_path / "trace"), "--profile-steps", "2"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads([line for line in out.stdout.splitlines()
                         if line.startswith("{")][-1])
    settings = {"position_bytes": 2**30}
    if keras.backend.backend() == "torch":
        settings.update(triton_position="matmul", cuda_graphs=True, torch_ring=True)
    assert result["kernel_settings"] == settings
    profile = result["profile"]
    assert profile["profile_steps"] == 2
    assert profile["source"] == "host ops (no GPU)"
    assert profile["busy_ms_per_step"] > 0 and profile["wall_ms_per_step"] > 0
    assert profile["categories"] and profile["top"]
    assert sum(c["share"] for c in profile["categories"]) == pytest.approx(1, abs=1e-3)
    assert os.path.exists(profile["trace"])
    assert str(tmp_path / "trace") in profile["trace"]
