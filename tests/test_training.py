"""Tests of keras_allattn.training against independent float64 NumPy code."""

import math
import re

import keras
import numpy as np
import pytest

from keras_allattn.training import AdagradClip
from keras_allattn.training import BitsPerByte
from keras_allattn.training import BitsPerCharacter
from keras_allattn.training import LinearWarmup
from keras_allattn.training import Perplexity
from keras_allattn.training.optimizers import clip_gradients


class NumpyLambdaLR:
    """`torch.optim.lr_scheduler.LambdaLR`, transcribed.

    The constructor sets the rate for epoch 0; every `step()` advances the
    epoch, then sets `lr = base_lr * lr_lambda(epoch)`.
    """

    def __init__(self, base_lr, lr_lambda):
        self.base_lr = base_lr
        self.lr_lambda = lr_lambda
        self.last_epoch = 0
        self.lr = base_lr * lr_lambda(0)

    def step(self):
        self.last_epoch += 1
        self.lr = self.base_lr * self.lr_lambda(self.last_epoch)


def reference_scheduler(learning_rate, warmup_steps, drop_step, drop_factor):
    """The reference's warm-up `lambda s: min(1, s / warmup)`, with the
    recipes' drop to `drop_factor` after `drop_step` updates written in the
    same convention."""

    def factor(epoch):
        value = min(1.0, epoch / warmup_steps) if warmup_steps else 1.0
        if drop_step is not None and epoch > drop_step:
            value *= drop_factor
        return value

    return NumpyLambdaLR(learning_rate, factor)


class NumpyAdagradClip:
    """The reference update, literally, in float64."""

    def __init__(self, params, clip, epsilon=1e-10):
        self.params = [np.array(p, np.float64) for p in params]
        self.sums = [np.zeros_like(p) for p in self.params]
        self.clip = clip
        self.epsilon = epsilon
        self.clipped = 0
        self.unclipped = 0

    def step(self, grads, lr):
        for p, s, g in zip(self.params, self.sums, grads):
            g = np.asarray(g, np.float64)
            rate = lr
            norm = np.linalg.norm(g)
            if self.clip > 0 and norm > self.clip:
                rate *= self.clip / (norm + 1e-10)
                self.clipped += 1
            else:
                self.unclipped += 1
            s += g * g
            p -= rate * g / (np.sqrt(s) + self.epsilon)


def test_adagrad_clip_matches_numpy_over_steps():
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (5,), (2, 3, 2)]
    initial = [rng.normal(size=s).astype("float32") for s in shapes]
    variables = [keras.Variable(p) for p in initial]
    schedule = dict(
        learning_rate=0.1, warmup_steps=3, drop_step=5, drop_factor=0.1
    )
    clip = 1.0
    optimizer = AdagradClip(LinearWarmup(**schedule), grad_clip=clip)
    reference = NumpyAdagradClip(initial, clip)
    scheduler = reference_scheduler(**schedule)
    for step in range(7):
        # Tensor 0 always under the clip, tensor 1 always over, tensor 2
        # alternating.
        scales = [0.01, 5.0, 5.0 if step % 2 else 0.01]
        grads = [
            (scale * rng.normal(size=s)).astype("float32")
            for scale, s in zip(scales, shapes)
        ]
        optimizer.apply(
            [keras.ops.convert_to_tensor(g) for g in grads], variables
        )
        # The reference's loop: the scheduler steps before the update.
        scheduler.step()
        reference.step(grads, scheduler.lr)
        for variable, expected in zip(variables, reference.params):
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(variable),
                expected,
                rtol=1e-5,
                atol=1e-7,
            )
    for accumulator, expected in zip(optimizer._accumulators, reference.sums):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(accumulator), expected, rtol=1e-5
        )
    assert reference.clipped >= 7 and reference.unclipped >= 7
    assert int(optimizer.iterations) == 7


def test_adagrad_clip_without_clipping_is_plain_reference_adagrad():
    rng = np.random.default_rng(1)
    initial = rng.normal(size=(4, 4)).astype("float32")
    variable = keras.Variable(initial)
    optimizer = AdagradClip(0.05)
    reference = NumpyAdagradClip([initial], clip=0.0)
    for _ in range(4):
        grad = (100.0 * rng.normal(size=(4, 4))).astype("float32")
        optimizer.apply([keras.ops.convert_to_tensor(grad)], [variable])
        reference.step([grad], 0.05)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(variable), reference.params[0], rtol=1e-5
    )
    assert reference.clipped == 0


def _tiny_model(vocabulary, width, outputs, length):
    tokens = keras.Input((length,), dtype="int32")
    hidden = keras.layers.Embedding(vocabulary, width, name="embedding")(tokens)
    out = keras.layers.Dense(outputs, name="dense")(hidden)
    return keras.Model(tokens, out)


def _numpy_gradients(embedding, kernel, bias, tokens, targets):
    """Gradients of mean((E[x] W + b - y)^2), the `mse` loss, in float64."""
    hidden = embedding[tokens]  # (N, T, d)
    predictions = hidden @ kernel + bias  # (N, T, k)
    d_predictions = 2.0 * (predictions - targets) / predictions.size
    d_kernel = np.einsum("ntd,ntk->dk", hidden, d_predictions)
    d_bias = d_predictions.sum(axis=(0, 1))
    d_embedding = np.zeros_like(embedding)
    np.add.at(d_embedding, tokens, d_predictions @ kernel.T)
    return [d_embedding, d_kernel, d_bias]


def fit_compile_modes():
    """jit_compile values for the fit test: XLA on TF and JAX; on torch
    (torch.compile: 25 s with a warm inductor cache, 60 s cold, for this toy
    on 2 CPU cores) eager by default and compiled under the `slow` marker.
    """
    if keras.backend.backend() == "torch":
        return [
            pytest.param(False, id="eager"),
            pytest.param(True, id="jit", marks=pytest.mark.slow),
        ]
    return [pytest.param(True, id="jit")]


@pytest.mark.parametrize("jit_compile", fit_compile_modes())
def test_adagrad_clip_in_fit_matches_numpy(tmp_path, jit_compile):
    rng = np.random.default_rng(2)
    vocabulary, width, outputs, length, batch, steps = 6, 4, 3, 5, 4, 3
    model = _tiny_model(vocabulary, width, outputs, length)
    # Repeated token ids make TensorFlow's embedding gradient sparse with
    # duplicate rows.
    tokens = rng.integers(0, vocabulary, (batch * steps, length)).astype(
        "int32"
    )
    targets = rng.normal(size=(batch * steps, length, outputs)).astype(
        "float32"
    )
    params = [np.array(w, np.float64) for w in model.get_weights()]
    norms = [
        np.linalg.norm(g)
        for g in _numpy_gradients(*params, tokens[:batch], targets[:batch])
    ]
    clip = float(np.sqrt(min(norms) * max(norms)))
    schedule = dict(
        learning_rate=0.2, warmup_steps=2, drop_step=2, drop_factor=0.5
    )
    model.compile(
        optimizer=AdagradClip(LinearWarmup(**schedule), grad_clip=clip),
        loss="mse",
        jit_compile=jit_compile,
    )
    model.fit(tokens, targets, batch_size=batch, shuffle=False, verbose=0)

    reference = NumpyAdagradClip(params, clip)
    scheduler = reference_scheduler(**schedule)
    for step in range(steps):
        rows = slice(step * batch, (step + 1) * batch)
        grads = _numpy_gradients(*reference.params, tokens[rows], targets[rows])
        scheduler.step()
        reference.step(grads, scheduler.lr)
    assert reference.clipped > 0 and reference.unclipped > 0
    for weight, expected in zip(model.get_weights(), reference.params):
        np.testing.assert_allclose(weight, expected, rtol=2e-5, atol=1e-6)

    # The optimizer, its schedule and its accumulators survive saving.
    path = str(tmp_path / "tiny.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.optimizer, AdagradClip)
    assert restored.optimizer.grad_clip == clip
    assert restored.optimizer._learning_rate.get_config() == (
        model.optimizer._learning_rate.get_config()
    )
    for a, b in zip(restored.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        )
    # One more step from the restored state equals one more step of the
    # original (eager for the copy: compiling it again adds nothing).
    restored.compile(
        optimizer=restored.optimizer, loss="mse", jit_compile=False
    )
    more = slice(0, batch)
    model.fit(tokens[more], targets[more], batch_size=batch, verbose=0)
    restored.fit(tokens[more], targets[more], batch_size=batch, verbose=0)
    for a, b in zip(restored.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_adagrad_clip_config_round_trip():
    optimizer = AdagradClip(
        LinearWarmup(0.07, 32000, drop_step=450000),
        grad_clip=0.03,
        initial_accumulator_value=0.5,
        epsilon=1e-8,
    )
    config = keras.optimizers.serialize(optimizer)
    restored = keras.optimizers.deserialize(config)
    assert isinstance(restored, AdagradClip)
    assert restored.get_config() == optimizer.get_config()
    assert restored.initial_accumulator_value == 0.5
    assert isinstance(restored._learning_rate, LinearWarmup)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"grad_clip": -0.1},
            "`grad_clip` must be a number >= 0.0. Received: grad_clip=-0.1",
        ),
        (
            {"epsilon": 0.0},
            "`epsilon` must be a number > 0.0. Received: epsilon=0.0",
        ),
        (
            {"initial_accumulator_value": -1},
            "`initial_accumulator_value` must be a number >= 0.0",
        ),
        ({"grad_clip": "big"}, "Received: grad_clip='big'"),
    ],
)
def test_adagrad_clip_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AdagradClip(**kwargs)


def numpy_clip(gradients, clipnorm=None, global_clipnorm=None, clipvalue=None):
    """Keras's gradient clipping options, in float64."""
    if clipnorm:
        return [g * clipnorm / max(np.linalg.norm(g), clipnorm) for g in gradients]
    if global_clipnorm:
        norm = math.sqrt(sum(np.sum(g**2) for g in gradients))
        return [g * global_clipnorm / max(norm, global_clipnorm) for g in gradients]
    if clipvalue:
        return [np.clip(g, -clipvalue, clipvalue) for g in gradients]
    return gradients


@pytest.mark.parametrize(
    "option", [{}, {"clipnorm": 0.5}, {"global_clipnorm": 0.5},
               {"clipvalue": 0.05}],
)
def test_clip_gradients_is_the_optimizers_clipping(option, rng):
    """`clip_gradients` equals a float64 transcription of Keras's options
    and what the optimizer's own `apply` does with them (SGD at rate 1
    moves each weight by minus its clipped gradient)."""
    shapes = [(3, 4), (5,), (2, 2)]
    # One tensor inside the norm, one outside, one zero.
    gradients = [rng.normal(0, 0.1, shapes[0]), rng.normal(0, 2.0, shapes[1]),
                 np.zeros(shapes[2])]
    expected = numpy_clip(gradients, **option)
    optimizer = keras.optimizers.SGD(1.0, **option)
    clipped = clip_gradients(
        optimizer, [keras.ops.convert_to_tensor(g, "float32") for g in gradients]
    )
    variables = [keras.Variable(np.zeros(shape), dtype="float32") for shape in shapes]
    optimizer.apply(
        [keras.ops.convert_to_tensor(g, "float32") for g in gradients], variables
    )
    for actual, applied, reference in zip(clipped, variables, expected):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(actual), reference, rtol=1e-5, atol=1e-7
        )
        np.testing.assert_allclose(
            -keras.ops.convert_to_numpy(applied), reference, rtol=1e-5, atol=1e-7
        )
    if option:
        assert not np.allclose(expected[1], gradients[1])  # it clipped
    with_none = clip_gradients(optimizer, [None, keras.ops.ones((2,))])
    assert with_none[0] is None


def test_linear_warmup_values_and_config():
    schedule = LinearWarmup(0.07, warmup_steps=4, drop_step=10, drop_factor=0.1)
    scheduler = reference_scheduler(0.07, 4, 10, 0.1)
    # Keras reads the schedule at `iterations` = k - 1 for the k-th update.
    for iterations in range(30):
        scheduler.step()
        assert float(schedule(iterations)) == pytest.approx(
            scheduler.lr, rel=1e-6
        )
    assert float(schedule(0)) == pytest.approx(0.07 / 4)
    assert float(schedule(9)) == pytest.approx(0.07)
    assert float(schedule(10)) == pytest.approx(0.007)
    no_warmup = LinearWarmup(0.5, warmup_steps=0)
    assert float(no_warmup(0)) == pytest.approx(0.5)
    assert float(no_warmup(10**6)) == pytest.approx(0.5)
    config = schedule.get_config()
    assert config == {
        "learning_rate": 0.07,
        "warmup_steps": 4,
        "drop_step": 10,
        "drop_factor": 0.1,
        "name": "linear_warmup",
    }
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(schedule)
    )
    assert isinstance(restored, LinearWarmup)
    assert restored.get_config() == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"learning_rate": 0.0, "warmup_steps": 1},
            "`learning_rate` must be a number > 0.0. Received: learning_rate=0.0",
        ),
        (
            {"learning_rate": 0.1, "warmup_steps": -1},
            "`warmup_steps` must be a non-negative integer. Received: warmup_steps=-1",
        ),
        (
            {"learning_rate": 0.1, "warmup_steps": 1.5},
            "Received: warmup_steps=1.5",
        ),
        (
            {"learning_rate": 0.1, "warmup_steps": 1, "drop_step": 0},
            "`drop_step` must be a positive integer. Received: drop_step=0",
        ),
        (
            {"learning_rate": 0.1, "warmup_steps": 1, "drop_factor": 0},
            "`drop_factor` must be a number > 0.0. Received: drop_factor=0",
        ),
    ],
)
def test_linear_warmup_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LinearWarmup(**kwargs)


def _numpy_nll(logits, targets):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def test_metrics_match_numpy_over_uneven_batches():
    rng = np.random.default_rng(3)
    batches = [
        (rng.integers(0, 11, (2, 7)), 3.0 * rng.normal(size=(2, 7, 11))),
        (rng.integers(0, 11, (5, 3)), 3.0 * rng.normal(size=(5, 3, 11))),
    ]
    bpc, bpb, ppl = BitsPerCharacter(), BitsPerByte(), Perplexity()
    for targets, logits in batches:
        for metric in (bpc, bpb, ppl):
            metric.update_state(targets, logits.astype("float32"))
    nll = np.concatenate([_numpy_nll(l, t).ravel() for t, l in batches])
    mean = nll.mean()  # over all 29 tokens, not a mean of batch means
    assert float(bpc.result()) == pytest.approx(mean / math.log(2), rel=1e-5)
    assert float(bpb.result()) == pytest.approx(mean / math.log(2), rel=1e-5)
    assert float(ppl.result()) == pytest.approx(math.exp(mean), rel=1e-5)
    assert bpc.name == "bits_per_character" and bpb.name == "bits_per_byte"
    bpc.reset_state()
    targets, logits = batches[0]
    weights = rng.uniform(size=targets.shape)
    bpc.update_state(targets, logits.astype("float32"), sample_weight=weights)
    weighted = (_numpy_nll(logits, targets) * weights).sum() / weights.sum()
    assert float(bpc.result()) == pytest.approx(
        weighted / math.log(2), rel=1e-5
    )
    ppl.reset_state()
    for targets, logits in batches:
        ppl.update_state(
            targets,
            logits.astype("float32"),
            sample_weight=[1.0] * len(targets),
        )
    ppl.update_state(*batches[0], sample_weight=[0.0, 0.0])
    assert float(ppl.result()) == pytest.approx(math.exp(mean), rel=1e-5)


def test_metrics_config_and_use_in_evaluate():
    for cls in (BitsPerCharacter, BitsPerByte, Perplexity):
        metric = cls(name="m", dtype="float32")
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(metric)
        )
        assert type(restored) is cls
        assert restored.get_config() == metric.get_config()
    rng = np.random.default_rng(4)
    model = _tiny_model(vocabulary=9, width=4, outputs=9, length=6)
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[BitsPerCharacter(), Perplexity()],
    )
    tokens = rng.integers(0, 9, (8, 6)).astype("int32")
    targets = rng.integers(0, 9, (8, 6)).astype("int32")
    results = model.evaluate(
        tokens, targets, batch_size=3, return_dict=True, verbose=0
    )
    logits = model.predict(tokens, verbose=0)
    mean = _numpy_nll(logits, targets).mean()
    assert results["bits_per_character"] == pytest.approx(
        mean / math.log(2), rel=1e-5
    )
    assert results["perplexity"] == pytest.approx(math.exp(mean), rel=1e-5)
