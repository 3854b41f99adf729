"""What keras_allattn will run on: backend, devices, fused kernels.

    python -m keras_allattn.info        # or: keras-allattn info

prints the Keras backend and versions, the devices the backend sees, and
whether `implementation="auto"` will run the attention through a fused
kernel (Pallas on JAX with a GPU, Triton on PyTorch with CUDA) or through
the portable `keras.ops` path, and why. Run it after installing, e.g.
`pip install keras-allattn[jax-cuda]`, to check that the GPU is used.
"""

import importlib.metadata
import sys

import keras

import keras_allattn

__all__ = ["format_info", "main", "system_info"]

# Head width of the probe query: a width every fused kernel accepts.
_PROBE_HEAD_DIM = 64
_BACKEND_PACKAGES = {
    "jax": ("jax", "jaxlib"),
    "torch": ("torch", "triton"),
    "tensorflow": ("tensorflow",),
}
_KERNELS = {"jax": "Pallas", "torch": "Triton"}


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _devices(backend):
    """The backend's devices, as short strings."""
    if backend == "jax":
        import jax

        return [f"{d.platform}:{d.id} ({d.device_kind})" for d in jax.devices()]
    if backend == "torch":
        import torch

        devices = ["cpu"]
        for i in range(torch.cuda.device_count()):
            devices.append(f"cuda:{i} ({torch.cuda.get_device_name(i)})")
        return devices
    if backend == "tensorflow":
        import tensorflow as tf

        return [d.name for d in tf.config.list_physical_devices()]
    return []


def system_info():
    """The backend, versions, devices and fused-kernel status, as a dict.

    Returns:
        A dict with `keras_allattn`, `keras`, `backend`, `backend_versions`
        (package -> version, None when absent), `keras_hub` (version or
        None), `devices` (list of str), `fused_kernels` (bool: whether
        `implementation="auto"` takes a fused kernel here for heads of width
        64, attention dropout included), `kernel` (its name or None) and
        `reason` (why not, or "").
    """
    from keras_allattn.ops.attention import fused_kernel_applies

    backend = keras.backend.backend()
    applies, reason = fused_kernel_applies(_PROBE_HEAD_DIM, dropout_rate=0.3)
    kernel = True if applies else None
    return {
        "keras_allattn": keras_allattn.__version__,
        "keras": keras.__version__,
        "backend": backend,
        "backend_versions": {
            package: _version(package)
            for package in _BACKEND_PACKAGES.get(backend, ())
        },
        "keras_hub": _version("keras-hub"),
        "devices": _devices(backend),
        "fused_kernels": kernel is not None,
        "kernel": _KERNELS.get(backend) if kernel is not None else None,
        "reason": reason,
    }


def format_info(info):
    """`system_info()` as the lines `keras-allattn info` prints."""
    versions = ", ".join(
        f"{package} {version or 'not installed'}"
        for package, version in info["backend_versions"].items()
    )
    if info["fused_kernels"]:
        fused = (
            f"yes ({info['kernel']}); training with attention dropout "
            "(`dropout` > 0) uses the portable path"
        )
    else:
        fused = f"no, the portable keras.ops path runs: {info['reason']}"
    hub = info["keras_hub"] or (
        "not installed (generation and the tokenizers need it)"
    )
    return "\n".join([
        f"keras_allattn: {info['keras_allattn']}",
        f"keras: {info['keras']}",
        f"backend: {info['backend']}" + (f" ({versions})" if versions else ""),
        f"keras-hub: {hub}",
        f"devices: {', '.join(info['devices']) or 'none found'}",
        f"fused attention kernels: {fused}",
    ])


def main(argv=None, prog=None):
    """Prints `format_info(system_info())`; the `info` command."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--json", action="store_true", help="print the fields as JSON"
    )
    args = parser.parse_args(argv)
    info = system_info()
    if args.json:
        import json

        print(json.dumps(info))
    else:
        print(format_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
