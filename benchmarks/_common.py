"""Helpers shared by the benchmark scripts: which device, which commit."""

import datetime
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess

from keras_allattn.utils import device_name  # noqa: F401  (re-exported)


def commit():
    """$BENCHMARK_COMMIT, else the short hash of HEAD, else "unknown".

    Set BENCHMARK_COMMIT where the checkout's git metadata is not the code
    that runs (a copied working tree on a remote machine).
    """
    if os.environ.get("BENCHMARK_COMMIT"):
        return os.environ["BENCHMARK_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def add_ab_arguments(parser, module, configs, default_configs, calls, tiles_help):
    """The arguments `pallas_ab.py` and `triton_ab.py` share: the baseline
    file of `module`, the configurations (names of `configs`), each
    version's tiles, rounds, calls a round, dropout, `--record`."""
    parser.add_argument("--baseline", required=True,
                        help=f"a file holding another version of {module}")
    parser.add_argument("--configs", default=default_configs,
                        help=f"comma-separated names among {sorted(configs)}")
    parser.add_argument("--tiles", default="{}", metavar="JSON",
                        help=f"{tiles_help} of the current version (default: its own)")
    parser.add_argument("--baseline-tiles", default="{}", metavar="JSON",
                        help="the same for the baseline")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=calls,
                        help="calls timed a round")
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--record", action="store_true",
                        help="append a row per configuration to benchmarks/RESULTS.md")


def check_ab_arguments(parser, args, configs):
    """Validates the shared A/B arguments; parses `--tiles` and
    `--baseline-tiles` into dicts and `--configs` into `args.names`."""
    for flag, value in (("--rounds", args.rounds), ("--calls", args.calls)):
        if value < 1:
            parser.error(f"{flag} must be at least 1. Received: {flag} {value}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1). Received: --dropout {args.dropout}")
    for flag in ("tiles", "baseline_tiles"):
        text = getattr(args, flag)
        option = "--" + flag.replace("_", "-")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            parser.error(f"{option} must be a JSON object ({error}). Received: {option} {text}")
        if not isinstance(value, dict):
            parser.error(f"{option} must be a JSON object. Received: {option} {text}")
        setattr(args, flag, value)
    args.names = [n for n in args.configs.split(",") if n]
    for name in args.names:
        if name not in configs:
            parser.error(f"--configs takes names among {sorted(configs)}. Received: {name!r}")


def median_min_max(samples):
    """[median, min, max] of timings, rounded to 3 decimals."""
    return [round(statistics.median(samples), 3), round(min(samples), 3),
            round(max(samples), 3)]


def tiles_text(tiles):
    return json.dumps(tiles) if tiles else "default"


def append_ab_row(benchmark, device, backend, result, kernels, per, details):
    """Appends an A/B script's row to RESULTS.md: the medians of every
    kernel both versions ran (`{kernel}_current_ms` / `_baseline_ms` of
    `result`, "per" a layer or per layer), then `details`."""
    medians = ", ".join(
        f"{k.lstrip('_')} {result[f'current_{k}_ms'][0]} vs "
        f"{result[f'baseline_{k}_ms'][0]} ms"
        for k in kernels
        if f"current_{k}_ms" in result and f"baseline_{k}_ms" in result
    )
    row = (
        f"| {datetime.date.today()} | {benchmark} | {device} | {backend} | {commit()} | "
        f"current vs baseline, medians {per}: {medians} | {details} |\n"
    )
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
              "a") as f:
        f.write(row)


def load_module_file(path, name):
    """The module in the file at `path` (an A/B script's `--baseline`),
    imported under `name`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise SystemExit(f"--baseline must be a file. Received: --baseline {path}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_names(parser, flag, text, allowed):
    """The comma-separated names of `text` (an argument `flag`), each one
    of `allowed`, else a parser error naming the flag and the value."""
    names = [n for n in text.split(",") if n]
    for name in names:
        if name not in allowed:
            parser.error(f"{flag} takes names among {sorted(allowed)}. Received: {name!r}")
    return names


def append_peers_row(benchmark, device, backend, record, names, details, path=None):
    """Appends a peers script's row to RESULTS.md (or `path`): each
    implementation of `names` with its forward+backward ms and TFLOP/s (or
    "failed"), then `details`."""
    parts = []
    for name in names:
        if f"{name}_fwd_bwd_ms" in record:
            parts.append(f"{name} {record[f'{name}_fwd_bwd_ms']} ms "
                         f"({record[f'{name}_tflops']} TFLOP/s)")
        else:
            parts.append(f"{name} failed")
    row = (
        f"| {datetime.date.today()} | {benchmark} | {device} | {backend} | {commit()} | "
        f"forward+backward a layer: {', '.join(parts)} | {details} |\n"
    )
    if path is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
    with open(path, "a") as f:
        f.write(row)
