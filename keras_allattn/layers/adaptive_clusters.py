"""The clusters of a frequency-ordered vocabulary, shared by the adaptive
embedding and the adaptive softmax: their bounds, widths and weights."""

import numbers

from keras_allattn.utils import check_positive


def check_cutoffs(cutoffs, vocabulary_size, name="cutoffs"):
    """Returns `cutoffs` as a list of ints, or raises ValueError.

    Cutoffs split a frequency-ordered vocabulary into clusters
    `[0, c_1), [c_1, c_2), ..., [c_k, vocabulary_size)`: they must be
    integers, strictly increasing, in `[1, vocabulary_size)`. An empty list
    means a single cluster.
    """
    if not isinstance(cutoffs, (list, tuple)) or not all(
        isinstance(c, numbers.Integral) and not isinstance(c, bool)
        for c in cutoffs
    ):
        raise ValueError(
            f"`{name}` must be a list of integers. Received: {name}={cutoffs!r}"
        )
    cutoffs = [int(c) for c in cutoffs]
    if any(b <= a for a, b in zip(cutoffs, cutoffs[1:])):
        raise ValueError(
            f"`{name}` must be strictly increasing, without duplicates. "
            f"Received: {name}={cutoffs}"
        )
    if cutoffs and (cutoffs[0] <= 0 or cutoffs[-1] >= vocabulary_size):
        raise ValueError(
            f"`{name}` must lie in [1, vocabulary_size) = [1, "
            f"{vocabulary_size}). Received: {name}={cutoffs}"
        )
    return cutoffs


def cluster_widths(hidden_dim, cutoffs, div_val, name="div_val"):
    """The width `hidden_dim // div_val**i` of each cluster `i`, all >= 1."""
    widths = [hidden_dim // div_val**i for i in range(len(cutoffs) + 1)]
    if widths[-1] < 1:
        raise ValueError(
            f"`{name}` is too large for `hidden_dim`: the last cluster would "
            f"have width hidden_dim // {name}**{len(cutoffs)} = 0. Received: "
            f"hidden_dim={hidden_dim}, {name}={div_val}"
        )
    return widths


def set_cluster_geometry(layer, vocabulary_size, hidden_dim, cutoffs, div_val):
    """Checks the clusters' arguments and sets them on `layer`.

    Sets `vocabulary_size`, `hidden_dim`, `cutoffs` (a list of ints),
    `div_val`, `widths` (`cluster_widths`) and `bounds` (`[0, *cutoffs,
    vocabulary_size]`: cluster `i` holds the ids `bounds[i]` to
    `bounds[i + 1] - 1`); raises ValueError naming a bad argument.
    """
    layer.vocabulary_size = check_positive("vocabulary_size", vocabulary_size)
    layer.hidden_dim = check_positive("hidden_dim", hidden_dim)
    layer.cutoffs = check_cutoffs(cutoffs, layer.vocabulary_size)
    layer.div_val = check_positive("div_val", div_val)
    layer.widths = cluster_widths(layer.hidden_dim, layer.cutoffs, layer.div_val)
    layer.bounds = [0, *layer.cutoffs, layer.vocabulary_size]


def add_cluster_weights(layer, bounds, widths, hidden_dim, div_val,
                        matrix_name, matrix_initializer,
                        projection_initializer):
    """Adds every cluster's matrix and projection to `layer`.

    Cluster `i` (tokens `bounds[i]` to `bounds[i + 1]`) gets a matrix
    `{matrix_name}_{i}` of shape `(cluster size, widths[i])` and, when
    `div_val > 1`, a projection `projection_{i}` of shape
    `(widths[i], hidden_dim)`, created in that order cluster by cluster.

    Returns:
        `(matrices, projections)`, two lists (the second empty when
        `div_val == 1`).
    """
    matrices, projections = [], []
    for i, width in enumerate(widths):
        matrices.append(
            layer.add_weight(
                name=f"{matrix_name}_{i}",
                shape=(bounds[i + 1] - bounds[i], width),
                initializer=matrix_initializer,
            )
        )
        if div_val > 1:
            projections.append(
                layer.add_weight(
                    name=f"projection_{i}",
                    shape=(width, hidden_dim),
                    initializer=projection_initializer,
                )
            )
    return matrices, projections
