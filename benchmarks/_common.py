"""Helpers shared by the benchmark scripts: which device, which commit."""

import subprocess

from keras_allattn.utils import device_name  # noqa: F401  (re-exported)


def commit():
    """The short hash of HEAD, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
