"""TensorFlow SavedModel export of `AllAttentionLM` for TensorFlow Serving.

`export_saved_model(model, path)` writes

    path/<model_name>/<version>/saved_model.pb (+ variables/)
    path/models.config

with two signatures (tag "serve"); tokenisation stays outside the graph:

- `serving_default`: input `tokens` int32 `[batch, length]`; output
  `log_probs` float32 `[batch, length, vocabulary_size]`, the next-token
  log-probabilities at every position, from an empty segment memory.
- `step`: inputs `tokens` int32 `[batch, length]` and `memories` float32
  `[batch, num_layers, max_span, hidden_dim]` (the segment memories of all
  layers in one tensor; zeros at the start of a stream); outputs
  `log_probs` as above and `memories` after these tokens, same layout. A
  client decodes incrementally by feeding the returned `memories` back with
  the next tokens (often one per row). Batch comes first in every input so
  that TF Serving's row format ("instances") and its request batching,
  which both split and join along the first axis, work.

Both take any batch and any length. The whole batch is one computation
(the graph is traced for an unknown batch size); its tokens are read in
blocks: whole `block_size` blocks in a `tf.while_loop`, then the remainder
in power-of-two pieces (`tf.cond`), because the attention code needs static
block lengths. Nothing is padded, so the result is exact. The graph holds
plain TensorFlow ops (no XLA module), whatever backend trained the model:
on TensorFlow it is traced in-process; from JAX or PyTorch the model is
saved to a `.keras` file and exported by a subprocess running Keras on
TensorFlow (torch cannot export a SavedModel without torch_xla; a JAX
export would embed an `XlaCallModule` op whose shapes would have to be
polymorphic).
"""

import os
import posixpath
import re
import subprocess
import sys
import tempfile

import keras

from keras_allattn.models.all_attention_lm import AllAttentionLM
from keras_allattn.utils import check_non_negative

MODEL_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"


def export_saved_model(
    model, path, model_name="all_attention_lm", version=1,
    serving_base_path="/models", overwrite=False,
):
    """Exports `model` as a SavedModel for TensorFlow Serving.

    Writes `path/<model_name>/<version>/` and `path/models.config` (a TF
    Serving model config file listing every model exported under `path`,
    with base paths under `serving_base_path`, where the container sees
    `path`). See the module docstring for the signatures.

    Args:
        model: an `AllAttentionLM`, trained on any backend.
        path: the model base folder (created if needed).
        model_name: str, the served model's name (letters, digits, `_`,
            `.`, `-`), used in the request URL.
        version: int >= 0, the version folder.
        serving_base_path: str, where `path` is mounted in the server.
        overwrite: bool, replace an existing version folder.

    Returns:
        str, the version folder written.

    Raises:
        TypeError: if `model` is not an `AllAttentionLM`.
        ValueError: for a bad `model_name` or `version`.
        FileExistsError: if the version folder exists and not `overwrite`.

    Example:

    >>> model = AllAttentionLM(vocabulary_size=256, num_layers=1,
    ...     hidden_dim=16, num_heads=2, persistent_memory_size=4,
    ...     max_span=16, block_size=8, batch_size=1)
    >>> export_saved_model(model, "/tmp/serving")  # doctest: +SKIP
    '/tmp/serving/all_attention_lm/1'
    """
    if not isinstance(model, AllAttentionLM):
        raise TypeError(
            "`model` must be a keras_allattn.AllAttentionLM. "
            f"Received: model of type {type(model).__name__}"
        )
    if not isinstance(model_name, str) or not re.fullmatch(
        MODEL_NAME_PATTERN, model_name
    ):
        raise ValueError(
            "`model_name` must be letters, digits, '_', '.' or '-' (it is "
            f"a folder and part of URLs). Received: model_name={model_name!r}"
        )
    version = check_non_negative("version", version)
    export_dir = os.path.join(os.fspath(path), model_name, str(version))
    if os.path.exists(export_dir):
        if not overwrite:
            raise FileExistsError(
                f"{export_dir} exists; pass overwrite=True or a new version."
            )
        import shutil

        shutil.rmtree(export_dir)
    if keras.backend.backend() == "tensorflow":
        write_saved_model(model, export_dir)
    else:
        _export_in_subprocess(model, export_dir)
    write_models_config(path, serving_base_path)
    return export_dir


def write_saved_model(model, export_dir):
    """Traces the two signatures of `model` and saves them (TF backend)."""
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "write_saved_model needs the TensorFlow backend; "
            "export_saved_model exports from the other backends."
        )
    model.update_span_trimming()
    layers, span, width = model.num_layers, model.max_span, model.hidden_dim

    def step(tokens, memories):
        tokens, memories = _checked(tokens, memories, model)
        log_probs, memories = _read_tokens(model, tokens, memories)
        return {"log_probs": log_probs, "memories": memories}

    def serving_default(tokens):
        memories = tf.zeros([tf.shape(tokens)[0], layers, span, width])
        return {"log_probs": step(tokens, memories)["log_probs"]}

    tokens_spec = tf.TensorSpec([None, None], tf.int32, name="tokens")
    memories_spec = tf.TensorSpec(
        [None, layers, span, width], tf.float32, name="memories"
    )
    # Not `archive.track(model)`: that would save every model variable, the
    # training segment memory included. The archive keeps the variables
    # the signatures use, and lists the parameters under the usual names.
    # (TensorFlow's own variables: a Keras variable would be saved again
    # beside the TensorFlow variable it wraps.)
    archive = keras.export.ExportArchive()
    for name, variables in [
        ("variables", model.weights),
        ("trainable_variables", model.trainable_weights),
        ("non_trainable_variables", model.non_trainable_weights),
    ]:
        archive.add_variable_collection(name, [v.value for v in variables])
    archive.add_endpoint("serving_default", serving_default, [tokens_spec])
    archive.add_endpoint("step", step, [tokens_spec, memories_spec])
    archive.write_out(export_dir, verbose=False)


def _checked(tokens, memories, model):
    """`tokens` and `memories` once their shapes and token ids are checked.

    A loaded signature (and TF Serving) checks dtypes but not shapes:
    `EnsureShape` rejects a wrong shape at run time ("Shape of tensor
    tokens [3] is not compatible with expected shape [?,?]"), before any
    other op sees it.
    """
    import tensorflow as tf

    vocabulary = model.vocabulary_size
    tokens = tf.ensure_shape(tokens, [None, None])
    memories = tf.ensure_shape(
        memories, [None, model.num_layers, model.max_span, model.hidden_dim]
    )
    checks = [
        tf.debugging.assert_equal(
            tf.shape(tokens)[0], tf.shape(memories)[0],
            message="`tokens` and `memories` must have the same batch size",
        ),
        tf.debugging.assert_non_negative(
            tokens, message="token ids must be >= 0"
        ),
        tf.debugging.assert_less(
            tokens, vocabulary,
            message=f"token ids must be < vocabulary_size={vocabulary}",
        ),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(tokens), tf.identity(memories)


def _read_tokens(model, tokens, memories):
    """Log-probabilities `(B, T, V)` and next memories `(B, layers, L, d)`.

    The batch is read at once, its tokens in whole blocks of `block_size`
    in a while loop, then the remainder in descending powers of two, each a
    static length; the batch size may be unknown.
    """
    import tensorflow as tf

    block = model.block_size
    vocabulary = model.vocabulary_size
    batch = tf.shape(tokens)[0]
    blocks = tf.shape(tokens)[1] // block

    def read_block(i, memories, outputs):
        piece = tf.reshape(tokens[:, i * block : (i + 1) * block], [-1, block])
        log_probs, memories = _read(model, piece, memories)
        return i + 1, memories, outputs.write(i, log_probs)

    outputs = tf.TensorArray(
        tf.float32, size=blocks, element_shape=[None, block, vocabulary]
    )
    _, memories, outputs = tf.while_loop(
        lambda i, *_: i < blocks, read_block, (0, memories, outputs)
    )

    def gather_blocks():  # (blocks, B, M, V) -> (B, blocks * M, V)
        stacked = tf.transpose(outputs.stack(), [1, 0, 2, 3])
        return tf.reshape(stacked, [batch, blocks * block, vocabulary])

    # An empty TensorArray whose element shape is not fully known (the
    # batch) cannot be stacked: no whole block, no stacking.
    pieces = [
        tf.cond(
            blocks > 0, gather_blocks,
            lambda: tf.zeros([batch, 0, vocabulary]),
        )
    ]
    start = blocks * block
    for size in [2**k for k in reversed(range((block - 1).bit_length()))]:
        log_probs, memories, start = _read_piece(
            model, tokens, memories, start, size
        )
        pieces.append(log_probs)
    return tf.concat(pieces, axis=1), memories


def _read_piece(model, tokens, memories, start, size):
    """Reads `size` tokens of every row from `start` if that many are left."""
    import tensorflow as tf

    def read():
        piece = tf.reshape(tokens[:, start : start + size], [-1, size])
        log_probs, next_memories = _read(model, piece, memories)
        return log_probs, next_memories, start + size

    def skip():
        batch = tf.shape(tokens)[0]
        return tf.zeros([batch, 0, model.vocabulary_size]), memories, start

    return tf.cond(tf.shape(tokens)[1] - start >= size, read, skip)


def _read(model, tokens, memories):
    """`call_with_memory` on float32 stacked memories; log-probs `(B, M, V)`."""
    import tensorflow as tf

    dtype = model.segment_memories[0].compute_dtype
    layer_memories = [
        tf.cast(memories[:, i], dtype) for i in range(model.num_layers)
    ]
    logits, layer_memories = model.call_with_memory(tokens, layer_memories)
    log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32))
    memories = tf.cast(tf.stack(layer_memories, axis=1), tf.float32)
    return log_probs, memories


def write_models_config(path, serving_base_path="/models"):
    """Writes `path/models.config` listing every model exported in `path`.

    A model is a folder of `path` with a numeric version folder holding a
    `saved_model.pb`. TF Serving serves the highest version of each.

    Returns:
        str, the config file's path.
    """
    path = os.fspath(path)
    names = sorted(
        name
        for name in os.listdir(path)
        if os.path.isdir(os.path.join(path, name))
        and any(
            version.isdigit()
            and os.path.isfile(
                os.path.join(path, name, version, "saved_model.pb")
            )
            for version in os.listdir(os.path.join(path, name))
        )
    )
    entries = "".join(
        "  config {\n"
        f'    name: "{name}"\n'
        f'    base_path: "{posixpath.join(serving_base_path, name)}"\n'
        '    model_platform: "tensorflow"\n'
        "  }\n"
        for name in names
    )
    config_path = os.path.join(path, "models.config")
    with open(config_path, "w") as f:
        f.write("model_config_list {\n" + entries + "}\n")
    return config_path


def _export_in_subprocess(model, export_dir):
    """Saves `model` as `.keras` and exports it under Keras on TensorFlow."""
    package_root = os.path.dirname(
        os.path.dirname(os.path.abspath(__file__))
    )
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    code = (
        "import sys\n"
        "from keras_allattn.export import export_keras_file\n"
        "export_keras_file(sys.argv[1], sys.argv[2])\n"
    )
    with tempfile.TemporaryDirectory() as folder:
        keras_path = os.path.join(folder, "model.keras")
        model.save(keras_path)
        result = subprocess.run(
            [sys.executable, "-c", code, keras_path, export_dir],
            env=env,
            capture_output=True,
            text=True,
        )
    if result.returncode:
        raise RuntimeError(
            "Exporting under KERAS_BACKEND=tensorflow failed "
            f"(exit code {result.returncode}):\n{result.stderr[-4000:]}"
        )


def export_keras_file(keras_path, export_dir):
    """Loads a `.keras` `AllAttentionLM` and writes its SavedModel.

    Runs with the TensorFlow backend (the subprocess of
    `export_saved_model`). The attention uses the portable path there:
    fused kernels are for training backends.
    """
    # compile=False: the compile config names the optimizer class of the
    # training backend (Keras's torch optimizer module after PyTorch), and
    # importing torch next to TensorFlow aborts the process
    # ("LLVM ERROR: inconsistency in registered CommandLine options").
    model = keras.saving.load_model(keras_path, compile=False)
    if not isinstance(model, AllAttentionLM):
        raise TypeError(
            f"{keras_path} does not hold an AllAttentionLM. "
            f"Received: a {type(model).__name__}"
        )
    for attention in model.attention_layers:
        attention.implementation = "portable"
    write_saved_model(model, export_dir)
