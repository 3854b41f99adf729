"""keras_allattn: the all-attention network for Keras 3.

The model and its layers, TensorFlow Serving export, data-parallel
training and the fused kernels' deterministic switch are here; corpora,
stream batching and exact evaluation in `keras_allattn.data`; optimizers,
recipes, metrics, callbacks and checkpoints in `keras_allattn.training`;
keras-hub tokenizers in `keras_allattn.tokenizers` (needs keras-hub).
`python -m keras_allattn.info` shows the backend, the devices and whether
the fused attention kernels run.
"""

import importlib as _importlib
import warnings as _warnings

from keras_allattn.utils import install_log_handler as _install_log_handler

_install_log_handler()

# The subpackages register their Keras objects (optimizers, schedules,
# metrics), which `keras.saving.load_model` needs for a trained model.
from keras_allattn import data  # noqa: E402,F401
from keras_allattn import training  # noqa: E402,F401
from keras_allattn.distribution import DataParallelTrainer  # noqa: E402
from keras_allattn.distribution import plan_data_parallel  # noqa: E402
from keras_allattn.export import export_saved_model  # noqa: E402
from keras_allattn.layers import AdaptiveEmbedding  # noqa: E402
from keras_allattn.layers import AdaptiveSoftmax  # noqa: E402
from keras_allattn.layers import AdaptiveSpan  # noqa: E402
from keras_allattn.layers import FeedForward  # noqa: E402
from keras_allattn.layers import PersistentMemoryAttention  # noqa: E402
from keras_allattn.layers import RelativePosition  # noqa: E402
from keras_allattn.layers import SegmentMemory  # noqa: E402
from keras_allattn.models import AllAttentionLM  # noqa: E402
from keras_allattn.ops.attention import is_deterministic  # noqa: E402
from keras_allattn.ops.attention import set_deterministic  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AdaptiveEmbedding",
    "AdaptiveSoftmax",
    "AdaptiveSpan",
    "AllAttentionLM",
    "DataParallelTrainer",
    "FeedForward",
    "PersistentMemoryAttention",
    "RelativePosition",
    "SegmentMemory",
    "export_saved_model",
    "is_deterministic",
    "plan_data_parallel",
    "set_deterministic",
]

# Names this package used to export that are internal; still reachable here
# for a while, from the modules that define them.
_INTERNAL = {
    "SpanTrimming": "keras_allattn.training.callbacks",
    "DataParallelPlan": "keras_allattn.distribution",
    "data_parallel_distribution": "keras_allattn.distribution",
}


def __getattr__(name):
    if name in _INTERNAL:
        module = _INTERNAL[name]
        _warnings.warn(
            f"`keras_allattn.{name}` is not part of the public API; import "
            f"it from `{module}`.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_importlib.import_module(module), name)
    raise AttributeError(f"module 'keras_allattn' has no attribute {name!r}")
