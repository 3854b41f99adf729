"""SavedModel export for TensorFlow Serving, from the backend under test.

The `tensorflow_model_server` binary cannot be installed here, so these
tests cover everything up to it: the files and `models.config` the server
reads, `saved_model_cli`, a client process with TensorFlow and no Keras,
and TF Serving's `PredictRequest` / `PredictResponse` protos fed to the
signatures by input name, as the server's Predict API does.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_allattn import AllAttentionLM
from keras_allattn import export_saved_model
from tests import reference
from tests.conftest import randomize

tf = pytest.importorskip("tensorflow")
predict_pb2 = pytest.importorskip("tensorflow_serving.apis.predict_pb2")

V, LAYERS, L, D = 23, 2, 10, 16
CONFIG = dict(
    vocabulary_size=V, num_layers=LAYERS, hidden_dim=D, num_heads=4,
    persistent_memory_size=5, max_span=L, block_size=4, batch_size=2,
    adaptive_span=True, span_ramp=3,
)
NAME = "tiny_lm"
BIN = pathlib.Path(sys.executable).parent


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def keras_log_probs(model, tokens, memories=None):
    """Log-probabilities and stacked memories `(B, layers, L, d)` by Keras."""
    if memories is None:
        memories = model.initial_memories(len(tokens))
    else:
        memories = [memories[:, i] for i in range(LAYERS)]
    logits, memories = model.call_with_memory(tokens, memories)
    log_probs = to_numpy(keras.ops.log_softmax(logits, axis=-1))
    return log_probs, np.stack([to_numpy(m) for m in memories], axis=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model trained with `fit` (weights, optimizer and training
    memory all changed), then exported; every test compares the export
    with this model."""
    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(7)
    model = AllAttentionLM(**CONFIG)
    randomize(model, rng, 0.0, 0.7)
    before = model.get_weights()
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = rng.integers(0, V, (4, 5)).astype("int32")
    model.fit(x[:, :-1], x[:, 1:], epochs=2, shuffle=False, verbose=0)
    assert any(np.any(a != b) for a, b in zip(model.get_weights(), before))
    assert np.any(model.get_memory()[0])
    base = tmp_path_factory.mktemp("serving")
    export_dir = export_saved_model(model, base, model_name=NAME, version=3)
    tokens = rng.integers(0, V, (3, 11)).astype("int32")
    return dict(model=model, base=base, dir=export_dir, tokens=tokens)


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(exported["dir"])


def serve(loaded, request):
    """Answers a `PredictRequest` as TF Serving's Predict API does.

    The signature is picked by name, every input is fed by its name from
    its `TensorProto`, and every named output goes back as a `TensorProto`.
    """
    name = request.model_spec.signature_name or "serving_default"
    signature = loaded.signatures[name]
    expected = set(signature.structured_input_signature[1])
    if set(request.inputs) != expected:
        raise ValueError(
            f"Signature {name!r} takes inputs {sorted(expected)}. "
            f"Received: {sorted(request.inputs)}"
        )
    inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
    response = predict_pb2.PredictResponse()
    response.model_spec.CopyFrom(request.model_spec)
    response.model_spec.signature_name = name
    for key, value in signature(**inputs).items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
    return response


def request(signature_name="serving_default", **inputs):
    message = predict_pb2.PredictRequest()
    message.model_spec.name = NAME
    message.model_spec.signature_name = signature_name
    for key, value in inputs.items():
        message.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return message


def run(args):
    """Runs a TensorFlow tool; with KERAS_BACKEND=tensorflow, since TF
    imports Keras, and Keras on torch after TF aborts (two LLVMs)."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_layout_and_models_config(exported):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    base = exported["base"]
    assert (base / NAME / "3" / "saved_model.pb").is_file()
    assert (base / NAME / "3" / "variables").is_dir()
    config = text_format.Parse(
        (base / "models.config").read_text(),
        model_server_config_pb2.ModelServerConfig(),
    )
    (entry,) = config.model_config_list.config
    assert entry.name == NAME
    assert entry.base_path == f"/models/{NAME}"
    assert entry.model_platform == "tensorflow"


def test_saved_model_holds_the_parameters_not_the_memory(exported, loaded):
    """The variables are the parameters: no segment memory, no optimizer
    state, no random seeds."""
    model = exported["model"]
    assert len(loaded.variables) == len(model.weights)
    assert len(loaded.trainable_variables) == len(model.trainable_weights)
    sizes = sum(int(np.prod(v.shape)) for v in loaded.variables)
    assert sizes == model.count_params()
    reader = tf.train.load_checkpoint(
        os.path.join(exported["dir"], "variables", "variables")
    )
    stored = sum(
        int(np.prod(shape))
        for key, shape in reader.get_variable_to_shape_map().items()
        if key.endswith("VARIABLE_VALUE")
    )
    assert stored == model.count_params()


def test_signatures(loaded):
    default = loaded.signatures["serving_default"]
    _, inputs = default.structured_input_signature
    assert inputs["tokens"].dtype == tf.int32
    assert inputs["tokens"].shape.as_list() == [None, None]
    assert default.structured_outputs["log_probs"].shape.as_list() == [None, None, V]
    step = loaded.signatures["step"]
    _, inputs = step.structured_input_signature
    assert inputs["memories"].shape.as_list() == [None, LAYERS, L, D]
    assert inputs["memories"].dtype == tf.float32
    assert set(step.structured_outputs) == {"log_probs", "memories"}


def test_a_batch_is_one_computation(exported, loaded):
    """No loop over rows: one while loop (over blocks), batched ops inside.

    A batch gives every row what that row gets alone, for any batch size.
    """
    for name in ("serving_default", "step"):
        graph = loaded.signatures[name].graph.as_graph_def()
        ops = [node.op for function in graph.library.function
               for node in function.node_def] + [node.op for node in graph.node]
        assert ops.count("While") + ops.count("StatelessWhile") == 1, name
        assert "TensorListFromTensor" not in ops, name  # rows unstacked
    tokens = exported["tokens"]
    default = loaded.signatures["serving_default"]
    batch = default(tokens=tf.constant(tokens))["log_probs"].numpy()
    for i in range(len(tokens)):
        row = default(tokens=tf.constant(tokens[i : i + 1]))["log_probs"]
        assert reference.relative_error(row.numpy(), batch[i : i + 1]) < 1e-5
    empty = default(tokens=tf.zeros([0, 5], tf.int32))["log_probs"]
    assert empty.shape == (0, 5, V)


def test_saved_model_cli_show_and_run(exported, tmp_path):
    cli = str(BIN / "saved_model_cli")
    shown = run([cli, "show", "--dir", exported["dir"], "--all"])
    for text in ("signature_def['serving_default']", "signature_def['step']",
                 "inputs['tokens']", "inputs['memories']", "outputs['log_probs']",
                 "outputs['memories']", "DT_INT32", "(-1, -1, 23)"):
        assert text in shown, text
    tokens = exported["tokens"]
    np.save(tmp_path / "tokens.npy", tokens)
    run([cli, "run", "--dir", exported["dir"],
         "--tag_set", "serve", "--signature_def", "serving_default",
         "--inputs", f"tokens={tmp_path / 'tokens.npy'}",
         "--outdir", str(tmp_path / "out")])
    expected, _ = keras_log_probs(exported["model"], tokens)
    actual = np.load(tmp_path / "out" / "log_probs.npy")
    assert reference.relative_error(actual, expected) < 1e-5


def test_tensorflow_only_client_matches_keras(exported, tmp_path):
    """A process with TensorFlow but no Keras loads and runs the export.

    Importing TensorFlow 2.21 imports Keras when it is installed; the
    client blocks `keras` and `keras_allattn` from being imported at all,
    so loading and running cannot depend on them.
    """
    tokens = exported["tokens"]
    np.save(tmp_path / "tokens.npy", tokens)
    client = textwrap.dedent(
        """
        import json, sys
        BLOCKED = ("keras", "keras_allattn", "keras_hub", "tf_keras")
        for name in BLOCKED:
            sys.modules[name] = None  # any import of it now fails
        import numpy as np
        import tensorflow as tf
        export_dir, folder = sys.argv[1:]
        tokens = np.load(folder + "/tokens.npy")
        model = tf.saved_model.load(export_dir)
        default = model.signatures["serving_default"](tokens=tf.constant(tokens))
        step = model.signatures["step"]
        memories = tf.zeros([len(tokens), %d, %d, %d])
        pieces = []
        for begin, end in [(0, 6), (6, 7), (7, 11)]:
            out = step(tokens=tf.constant(tokens[:, begin:end]), memories=memories)
            memories = out["memories"]
            pieces.append(out["log_probs"].numpy())
        np.savez(folder + "/client.npz", default=default["log_probs"].numpy(),
                 steps=np.concatenate(pieces, 1), memories=memories.numpy())
        loaded = [m for m in sys.modules
                  if m.split(".")[0] in BLOCKED and sys.modules[m] is not None]
        print(json.dumps(loaded))
        """ % (LAYERS, L, D)
    )
    stdout = run([sys.executable, "-c", client, exported["dir"], str(tmp_path)])
    assert json.loads(stdout.strip().splitlines()[-1]) == []
    result = np.load(tmp_path / "client.npz")
    expected, memories = keras_log_probs(exported["model"], tokens)
    assert reference.relative_error(result["default"], expected) < 1e-5
    assert reference.relative_error(result["steps"], expected) < 1e-5
    assert reference.relative_error(result["memories"], memories) < 1e-5


def test_predict_request_gets_the_same_numbers(exported, loaded):
    tokens = exported["tokens"]
    expected, memories = keras_log_probs(exported["model"], tokens)
    response = serve(loaded, request(tokens=tokens))
    assert response.model_spec.name == NAME
    assert response.outputs["log_probs"].dtype == tf.float32.as_datatype_enum
    actual = tf.make_ndarray(response.outputs["log_probs"])
    assert actual.shape == (3, 11, V)
    assert reference.relative_error(actual, expected) < 1e-5
    zeros = np.zeros((3, LAYERS, L, D), "float32")
    response = serve(loaded, request("step", tokens=tokens, memories=zeros))
    assert reference.relative_error(
        tf.make_ndarray(response.outputs["memories"]), memories) < 1e-5


def test_step_signature_reproduces_incremental_decoding(exported, loaded):
    """Greedy decoding through `step` (prompt, then one token per request)."""
    model, prompt = exported["model"], exported["tokens"][:, :6]
    memories = np.zeros((3, LAYERS, L, D), "float32")
    tokens, feed = prompt, prompt
    while tokens.shape[1] < 14:
        response = serve(loaded, request("step", tokens=feed, memories=memories))
        memories = tf.make_ndarray(response.outputs["memories"])
        log_probs = tf.make_ndarray(response.outputs["log_probs"])
        feed = log_probs[:, -1].argmax(-1)[:, None].astype("int32")
        tokens = np.concatenate([tokens, feed], axis=1)
    np.testing.assert_array_equal(tokens, model.generate(prompt, 14))
    expected, keras_memories = keras_log_probs(model, tokens[:, :-1])
    assert reference.relative_error(memories, keras_memories) < 1e-5
    default = loaded.signatures["serving_default"](tokens=tf.constant(tokens[:, :-1]))
    assert reference.relative_error(default["log_probs"], expected) < 1e-5


def test_bad_requests(loaded):
    tokens = np.array([[1, 2, 3]], "int32")
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError),
                       match="int32"):
        serve(loaded, request(tokens=tokens.astype("float32")))
    wrong_shape = r"Shape of tensor {} \[{}\] is not compatible with expected shape"
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=wrong_shape.format("tokens", "3") + r" \[\?,\?\]"):
        serve(loaded, request(tokens=tokens[0]))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="token ids must be < vocabulary_size=23"):
        serve(loaded, request(tokens=np.array([[1, V]], "int32")))
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be >= 0"):
        serve(loaded, request(tokens=np.array([[-1, 2]], "int32")))
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=wrong_shape.format("memories", "1,2,9,16") + r" \[\?,2,10,16\]",
    ):
        serve(loaded, request("step", tokens=tokens,
                              memories=np.zeros((1, LAYERS, L - 1, D), "float32")))
    with pytest.raises(tf.errors.InvalidArgumentError, match="same batch size"):
        serve(loaded, request("step", tokens=tokens,
                              memories=np.zeros((2, LAYERS, L, D), "float32")))
    with pytest.raises(ValueError, match=r"takes inputs \['memories', 'tokens'\]"):
        serve(loaded, request("step", tokens=tokens))


def test_bad_export_arguments(exported, tmp_path):
    model = exported["model"]
    with pytest.raises(TypeError, match="must be a keras_allattn.AllAttentionLM"):
        export_saved_model(keras.Sequential([keras.layers.Dense(2)]), tmp_path)
    with pytest.raises(ValueError, match="`model_name` must be"):
        export_saved_model(model, tmp_path, model_name="a/b")
    with pytest.raises(ValueError, match="`version` must be a non-negative"):
        export_saved_model(model, tmp_path, version=-1)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_saved_model(model, exported["base"], model_name=NAME, version=3)
