"""What the data-parallel engines share: mesh axes, the model's geometry,
rows per replica."""

import keras

from keras_allattn.utils import check_positive

BATCH_AXIS = "batch"
MODEL_AXIS = "model"


def model_geometry(model_or_config):
    """The model arguments the engines need, from a model or a config."""
    if isinstance(model_or_config, keras.Model):
        model_or_config = {
            key: getattr(model_or_config, key)
            for key in ("num_layers", "num_heads", "hidden_dim", "batch_size",
                        "feedforward_dim")
        }
    try:
        return {
            "num_layers": model_or_config["num_layers"],
            "num_heads": model_or_config["num_heads"],
            "hidden_dim": model_or_config["hidden_dim"],
            "batch_size": model_or_config["batch_size"],
            "feedforward_dim": model_or_config.get("feedforward_dim"),
        }
    except (KeyError, TypeError):
        raise ValueError(
            "`model_or_config` must be an AllAttentionLM or its constructor "
            "arguments (a dict with num_layers, num_heads, hidden_dim and "
            f"batch_size). Received: {model_or_config!r}"
        ) from None


def replica_batch_size(global_batch_size, num_replicas):
    """Rows per replica: `global_batch_size // num_replicas`, checked.

    Args:
        global_batch_size: int, the rows of one training step.
        num_replicas: int, replicas sharing them.

    Returns:
        The rows of each replica (its model's `batch_size` on TensorFlow
        and PyTorch).
    """
    global_batch_size = check_positive("global_batch_size", global_batch_size)
    num_replicas = check_positive("num_replicas", num_replicas)
    if global_batch_size % num_replicas:
        raise ValueError(
            "The global batch size must be a multiple of the number of "
            f"replicas. Received: global_batch_size={global_batch_size}, "
            f"num_replicas={num_replicas}"
        )
    return global_batch_size // num_replicas


def row_range(index, size):
    """`(start, stop)` of a slice along an axis of length `size`."""
    start, stop, _ = index.indices(size)
    return (start, stop)


def local_placement(variable):
    """`(spec, shards)` of a variable that lives whole in this process."""
    value = variable.value
    shards = [(str(getattr(value, "device", "cpu")), (0, variable.shape[0]))]
    return "local", shards
