"""Where a training step's time goes: a profiler trace, summarised.

`profile(run, directory, steps)` runs `run()` (which trains `steps` steps
and waits for them) under the backend's profiler (`jax.profiler.trace`
with a Perfetto trace, `torch.profiler.profile` with a Chrome trace),
writes the trace under `directory`, and returns `summarise(...)` of it:
the device time of the step by category and the kernels that take most,
per step. Used by `throughput.py --profile DIR`.

What is counted. On a GPU, the kernels and memory copies the device ran
(JAX: the events on the `/device:GPU` streams; PyTorch: the `kernel`,
`gpu_memcpy` and `gpu_memset` events), each its own duration. Without a
GPU (CPU runs, tests), the host ops that do the work (JAX: XLA's CPU
thunks; PyTorch: `aten` ops), each its self time (its duration minus that
of the events nested in it on the same thread). `busy_ms_per_step` is
their sum per step; next to the wall time of a step (`wall_ms_per_step`),
the difference is time the device waited (launch-bound steps, host work,
synchronisation); with several streams busy at once the sum may exceed the
wall time. On a GPU, `idle_ms_per_step` is that wait measured: the time
between the first event and the last in which no event ran on any stream
(between the profiled steps too, not before the first or after the last).

Categories, by kernel name (the first that matches, case-insensitive):
the all-attention kernels (Pallas `all_attention_*`, Triton `_fwd_kernel`,
`_bwd_*_kernel`), matmuls (cuBLAS / CUTLASS / nvjet kernels, `aten::mm`
and kin), collectives (NCCL), copies and memory (memcpy, memset, copies,
concatenations, transposes, dynamic-update-slices), and everything else
(XLA fusions, inductor's Triton kernels, elementwise ops, reductions).
"""

import collections
import glob
import gzip
import json
import os
import re
import time

CATEGORIES = (
    ("attention kernels",
     r"all_attention_|_fwd_kernel|_bwd_\w*kernel|triton_all_attention"),
    ("matmuls",
     r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_|^dot|aten::(mm|bmm|addmm|"
     r"baddbmm|matmul|linear)$"),
    ("collectives", r"nccl|all-reduce|all_reduce|allreduce|all-gather|"
     r"reduce-scatter|c10d::"),
    ("copies and memory",
     r"memcpy|memset|copy|concatenate|dynamic-update-slice|"
     r"dynamic_update_slice|transpose|aten::(cat|clone|fill_|zero_|"
     r"contiguous)$"),
)
OTHER = "other (fusions, elementwise, reductions)"
# JAX CPU thread events that are bookkeeping, not work.
_JAX_CPU_SKIP = re.compile(r"^(ThreadpoolListener|ThunkExecutor|end: )")


def category(name):
    """The category of a kernel or op named `name` (see module doc)."""
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return OTHER


def profile(run, directory, steps, backend, python_stacks=False):
    """Runs `run()` (`steps` training steps, waited for) under the
    `backend`'s profiler; returns `summarise` of the trace written under
    `directory` (created if missing). `python_stacks`: on PyTorch, the
    trace also holds the Python calls (`with_stack`, where the host's
    time between steps goes; slower)."""
    os.makedirs(directory, exist_ok=True)
    if backend == "jax":
        import jax

        before = set(_jax_traces(directory))
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            start = time.perf_counter()
            run()
            wall = time.perf_counter() - start
        new = sorted(set(_jax_traces(directory)) - before)
        if not new:
            raise RuntimeError(f"jax.profiler wrote no trace under {directory}")
        path = new[-1]
    elif backend == "torch":
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(
            activities=activities, with_stack=python_stacks
        ) as prof:
            start = time.perf_counter()
            run()
            wall = time.perf_counter() - start
        path = os.path.join(directory, f"torch_trace_{int(time.time())}.json")
        prof.export_chrome_trace(path)
    else:
        raise ValueError(
            "Profiles are summarised for the jax and torch backends. "
            f"Received: backend={backend!r}"
        )
    summary = summarise(load_events(path), steps, backend)
    summary["wall_ms_per_step"] = round(1000 * wall / steps, 2)
    summary["trace"] = path
    return summary


def _jax_traces(directory):
    return glob.glob(os.path.join(directory, "plugins", "profile", "*",
                                  "perfetto_trace.json.gz"))


def load_events(path):
    """The `traceEvents` of a Chrome/Perfetto JSON trace (gzipped or not)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def device_events(events, backend):
    """`(source, [(name, microseconds)], gpu)`: the events that are the
    step's work (see module doc), with their own (self) durations, and
    on a GPU those events themselves (None without a GPU)."""
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    if backend == "torch":
        gpu = [e for e in complete
               if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
        if gpu:
            return ("GPU kernels", [(e["name"], float(e["dur"])) for e in gpu],
                    gpu)
        ops = [e for e in complete if e.get("cat") == "cpu_op"]
        return "host ops (no GPU)", _self_times(ops), None
    meta = [e for e in events if e.get("ph") == "M"]
    processes = {e["pid"]: e["args"].get("name", "") for e in meta
                 if e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"].get("name", "")
               for e in meta if e.get("name") == "thread_name"}
    gpus = {pid for pid, name in processes.items()
            if name.startswith("/device:GPU")}
    if gpus:
        on_gpu = [e for e in complete if e["pid"] in gpus]
        streams = [e for e in on_gpu
                   if threads.get((e["pid"], e.get("tid")), "").startswith("Stream")]
        chosen = streams or on_gpu
        return ("GPU kernels", [(e["name"], float(e["dur"])) for e in chosen],
                chosen)
    work = [e for e in complete
            if threads.get((e["pid"], e.get("tid")), "").startswith(
                ("tf_XLAPjRtCpuClient", "tf_XLAEigen"))
            and not _JAX_CPU_SKIP.match(e["name"])]
    return "host ops (no GPU)", _self_times(work), None


def idle_time(events):
    """Microseconds between the first event's start and the last one's
    end in which none of `events` ran (on any stream): the time the GPU
    waited, for the host or for a copy."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]))
                   for e in events)
    idle, end = 0.0, spans[0][1]
    for start, stop in spans[1:]:
        if start > end:
            idle += start - end
        end = max(end, stop)
    return idle


def _self_times(events):
    """Each event's duration minus that of the events directly nested in
    it on the same thread."""
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out = []
    for group in by_thread.values():
        group.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack = []  # [end, index in out]
        for e in group:
            start, dur = float(e["ts"]), float(e["dur"])
            while stack and stack[-1][0] <= start:
                stack.pop()
            if stack:
                parent = stack[-1][1]
                out[parent] = (out[parent][0], out[parent][1] - dur)
            out.append((e["name"], dur))
            stack.append([start + dur, len(out) - 1])
    return out


def summarise(events, steps, backend, top=12):
    """Device time per step by category and the `top` kernels (see module
    doc) from a trace's events covering `steps` training steps."""
    if steps < 1:
        raise ValueError(f"`steps` must be positive. Received: steps={steps}")
    source, timed, gpu = device_events(events, backend)
    if not timed:
        raise RuntimeError("The trace holds no kernel or op events to summarise")
    total = sum(us for _, us in timed)
    per_kernel = collections.defaultdict(lambda: [0.0, 0])
    per_category = collections.defaultdict(lambda: [0.0, 0])
    for name, us in timed:
        per_kernel[name][0] += us
        per_kernel[name][1] += 1
        label = category(name)
        per_category[label][0] += us
        per_category[label][1] += 1

    def row(name, us, count):
        return {"name": name[:120], "ms_per_step": round(us / 1000 / steps, 3),
                "share": round(us / total, 4),
                "launches_per_step": round(count / steps, 2)}

    order = [label for label, _ in CATEGORIES] + [OTHER]
    idle = {} if gpu is None else {
        "idle_ms_per_step": round(idle_time(gpu) / 1000 / steps, 3)
    }
    return {
        "source": source,
        "profile_steps": steps,
        "busy_ms_per_step": round(total / 1000 / steps, 3),
        **idle,
        "categories": [row(label, *per_category[label]) for label in order
                       if label in per_category],
        "top": [row(name, us, count) for name, (us, count) in sorted(
            per_kernel.items(), key=lambda item: -item[1][0])[:top]],
    }
