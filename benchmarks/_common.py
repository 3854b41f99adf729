"""Helpers shared by the benchmark scripts: which device, which commit."""

import os
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
