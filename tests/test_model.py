"""kerasfrac.models: the paper CNN's layers, shapes and parameter count; sub-models; vgg16."""

import keras
import numpy as np
import pytest

from kerasfrac import models
from kerasfrac.config import ModelConfig


@pytest.fixture
def bfloat16_policy():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def test_paper_cnn_layers_and_shapes():
    m = models.paper_cnn.paper_cnn((64, 64, 1))
    names = [layer.name for layer in m.layers if not isinstance(layer, keras.layers.InputLayer)]
    assert names == [
        "conv1", "relu1", "bn1", "pool1",
        "conv2", "relu2", "bn2", "pool2",
        "conv3", "relu3", "bn3",
        "flatten", "logit", "prob",
    ]  # fmt: skip
    shapes = {n: tuple(m.get_layer(n).output.shape) for n in ("bn1", "pool1", "pool2", "bn3")}
    assert shapes == {
        "bn1": (None, 64, 64, 32),
        "pool1": (None, 32, 32, 32),
        "pool2": (None, 16, 16, 64),
        "bn3": (None, 16, 16, 128),
    }
    conv = m.get_layer("conv2")
    assert (conv.kernel_size, conv.strides, conv.padding) == ((3, 3), (1, 1), "same")
    assert tuple(m.outputs[0].shape) == (None, 1)
    out = m(np.random.default_rng(0).random((2, 64, 64, 1), dtype="float32"))
    assert out.shape == (2, 1) and np.all((out > 0) & (out < 1))


def test_paper_cnn_has_the_reports_parameter_count_at_512():
    m = models.build_model(ModelConfig("paper_cnn"), (512, 512, 1))
    assert m.count_params() == 2_190_721
    assert m.get_layer("logit").count_params() == 128 * 128 * 128 + 1


def test_layer_lookups():
    m = models.paper_cnn.paper_cnn((32, 32, 1))
    assert models.logit_layer_name(m) == "logit"
    assert models.conv_layer_names(m) == ["conv1", "conv2", "conv3"]
    assert models.block_output_names(m) == ["bn1", "bn2", "bn3"]
    assert models.last_conv_block_name(m) == "bn3"


def _bn3_features(m, x):
    sub = keras.Model(m.inputs[0], m.get_layer("bn3").output)
    return keras.ops.convert_to_numpy(sub(x))


def test_sub_model_to_bn3_fresh_and_reloaded(tmp_path):
    m = models.paper_cnn.paper_cnn((32, 32, 1))
    x = np.random.default_rng(1).random((3, 32, 32, 1), dtype="float32")
    fresh = _bn3_features(m, x)
    assert fresh.shape == (3, 8, 8, 128)
    path = tmp_path / "model.keras"
    m.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(_bn3_features(reloaded, x), fresh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), m.predict(x, verbose=0), rtol=1e-5)
    assert models.last_conv_block_name(reloaded) == "bn3"


def test_sigmoid_stays_float32_under_mixed_bfloat16(bfloat16_policy):
    m = models.paper_cnn.paper_cnn((32, 32, 1))
    assert m.get_layer("conv1").compute_dtype == "bfloat16"
    assert m.get_layer("logit").compute_dtype == "bfloat16"
    assert m.get_layer("prob").compute_dtype == "float32"
    out = m(np.zeros((1, 32, 32, 1), "float32"))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"


def test_policy_was_reset():
    assert keras.mixed_precision.dtype_policy().name == "float32"


def test_unknown_model_and_bad_weights(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'resnet'.*paper_cnn"):
        models.build_model(ModelConfig("resnet"), (32, 32, 1))
    missing = str(tmp_path / "nope.weights.h5")
    with pytest.raises(ValueError, match="nope.weights.h5"):
        models.build_model(ModelConfig("paper_cnn", missing), (32, 32, 1))
    with pytest.raises(ValueError, match="nope.weights.h5"):
        models.build_model(ModelConfig("vgg16", missing), (32, 32, 1))
    with pytest.raises(ValueError, match="ImageNet"):
        models.build_model(ModelConfig("paper_cnn", "imagenet"), (32, 32, 1))


def test_paper_cnn_loads_a_weights_file(tmp_path):
    src = models.paper_cnn.paper_cnn((32, 32, 1))
    path = tmp_path / "w.weights.h5"
    src.save_weights(path)
    m = models.build_model(ModelConfig("paper_cnn", str(path)), (32, 32, 1))
    np.testing.assert_array_equal(
        m.get_layer("conv1").get_weights()[0], src.get_layer("conv1").get_weights()[0]
    )


@pytest.mark.slow
def test_vgg16_grayscale_flat_graph_and_weights_file(tmp_path):
    pretrained = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg.weights.h5"
    pretrained.save_weights(path)
    m = models.build_model(ModelConfig("vgg16", str(path)), (32, 32, 1))
    assert tuple(m.input.shape) == (None, 32, 32, 1) and tuple(m.output.shape) == (None, 1)
    np.testing.assert_array_equal(
        m.get_layer("block3_conv2").get_weights()[0],
        pretrained.get_layer("block3_conv2").get_weights()[0],
    )
    assert models.last_conv_block_name(m) == "block5_conv3"
    assert models.logit_layer_name(m) == "logit"
    # Grad-CAM style sub-model straight from the outer graph.
    sub = keras.Model(m.inputs[0], [m.get_layer("block5_conv3").output, m.output])
    feats, prob = sub(np.ones((2, 32, 32, 1), "float32"))
    assert feats.shape == (2, 2, 2, 512) and prob.shape == (2, 1)
    # Identical channels: the gray image and its 3-channel copy give the same prediction.
    rgb = models.build_model(ModelConfig("vgg16", str(path)), (32, 32, 3))
    rgb.set_weights(m.get_weights())
    x = np.random.default_rng(2).random((2, 32, 32, 1), dtype="float32")
    np.testing.assert_allclose(
        m.predict(x, verbose=0), rgb.predict(np.repeat(x, 3, axis=-1), verbose=0), rtol=1e-4
    )


def test_vgg16_survives_save_and_load(tmp_path):
    m = models.build_model(ModelConfig("vgg16"), (32, 32, 1))
    m.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    x = np.random.default_rng(3).random((2, 32, 32, 1), dtype="float32")
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), m.predict(x, verbose=0), rtol=1e-5)
    sub = keras.Model(reloaded.inputs[0], reloaded.get_layer("block5_conv3").output)
    assert sub(x).shape == (2, 2, 2, 512)


def _bn_pair(momentum=0.9):
    """A Keras BatchNormalization and a FusedBatchNormalization with equal, non-trivial weights."""
    rng = np.random.default_rng(4)
    plain = keras.layers.BatchNormalization(momentum=momentum)
    fused = models.FusedBatchNormalization(momentum=momentum)
    for layer in (plain, fused):
        layer.build((None, 6, 5, 4))
    weights = [rng.normal(1, 0.3, 4), rng.normal(0, 0.3, 4), rng.normal(0, 1, 4), rng.random(4) + 1]
    for layer in (plain, fused):
        layer.set_weights([w.astype("float32") for w in weights])  # gamma, beta, moving stats
    return plain, fused


def test_fused_batchnorm_matches_keras_batchnorm():
    import tensorflow as tf

    plain, fused = _bn_pair()
    before = plain.get_weights()[2:]
    x = tf.constant(np.random.default_rng(5).normal(2, 3, (8, 6, 5, 4)).astype("float32"))
    upstream = tf.constant(np.random.default_rng(6).normal(0, 1, (8, 6, 5, 4)).astype("float32"))
    results = []
    for layer in (plain, fused):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * upstream)
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append((y.numpy(), [g.numpy() for g in grads], layer.get_weights()))
    (y0, g0, w0), (y1, g1, w1) = results
    # Training: batch statistics normalise to mean 0, std 1 per channel, then gamma, beta.
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g0, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    # Moving mean and (biased) moving variance updated the same way.
    for a, b in zip(w1[2:], w0[2:], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    assert not np.allclose(w1[2], before[0]) and not np.allclose(w1[3], before[1])  # they moved
    # Inference uses the moving statistics (the parent's path).
    np.testing.assert_allclose(fused(x, training=False), plain(x, training=False), rtol=1e-5)


@pytest.mark.slow
def test_fused_paper_cnn_saves_reloads_and_trains_like_the_plain_one(tmp_path):
    import os
    import subprocess
    import sys

    import tensorflow as tf

    from kerasfrac.training import kernels

    if kernels.onednn_enabled() and os.environ.get(kernels.ENV) != "0":
        # oneDNN's multithreaded kernels (on by default on AVX-512 CPUs) are not run-to-run
        # reproducible: 5 SGD steps then amplify their noise past the bounds below in about
        # 1 run in 4, fused or not. This compares the BatchNorm maths, so it runs the same
        # test, assertions unchanged, in a process with TensorFlow's own kernels.
        test = f"{__file__}::test_fused_paper_cnn_saves_reloads_and_trains_like_the_plain_one"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
            env={**os.environ, kernels.ENV: "0"},
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        return

    plain = models.paper_cnn.paper_cnn((16, 16, 1), sync_batchnorm=False)
    fused = models.paper_cnn.paper_cnn((16, 16, 1), sync_batchnorm=False, fused_batchnorm=True)
    assert isinstance(fused.get_layer("bn1"), models.FusedBatchNormalization)
    assert type(plain.get_layer("bn1")) is keras.layers.BatchNormalization
    # sync_batchnorm wins: the fused kernel cannot share statistics across replicas.
    assert type(models.paper_cnn.paper_cnn((16, 16, 1), fused_batchnorm=True).get_layer("bn1")) is (
        keras.layers.BatchNormalization
    )
    fused.set_weights(plain.get_weights())
    start = plain.get_weights()
    rng = np.random.default_rng(7)
    x = tf.constant(rng.random((8, 16, 16, 1), dtype="float32"))
    y = tf.constant(rng.integers(0, 2, (8, 1)).astype("float32"))
    losses = {}
    for name, m in (("plain", plain), ("fused", fused)):
        # 0.01, not 0.05: at 0.05 the 5 steps ran chaotically (loss 0.79 -> 1.01 -> 2e-5) and
        # amplified the two kernels' float32 rounding to 1% by step 4 in 1 run in 4.
        m.compile(optimizer=keras.optimizers.SGD(0.01), loss="binary_crossentropy")
        losses[name] = [float(m.train_on_batch(x, y)) for _ in range(5)]
    # atol: the last losses are ~1e-4, where float32 kernel order alone moves the 4th digit
    np.testing.assert_allclose(losses["fused"], losses["plain"], rtol=1e-4, atol=1e-7)
    assert losses["fused"][-1] < losses["fused"][0]  # it learns the batch
    # The two trajectories agree to 1% of how far each weight array moved in the 5 steps. An
    # absolute bound on the weights failed CI once (2.2e-5 against atol 1e-5 on one of 32 biases
    # that had moved by ~1e-2): float32 summation order differs between the kernels, even with
    # TensorFlow's own (Eigen, multithreaded) ones.
    for a, b, w0 in zip(fused.get_weights(), plain.get_weights(), start, strict=True):
        moved = np.abs(b - w0).max()
        assert moved > 0  # every array moves: weights, biases, BatchNorm statistics
        np.testing.assert_allclose(a - w0, b - w0, rtol=0, atol=0.01 * moved + 1e-7)
    fused.save(tmp_path / "fused.keras")
    reloaded = models.load_model(tmp_path / "fused.keras")
    assert isinstance(reloaded.get_layer("bn2"), models.FusedBatchNormalization)
    np.testing.assert_allclose(
        reloaded.predict(x, verbose=0), fused.predict(x, verbose=0), rtol=1e-5
    )


def test_plain_keras_swaps_the_fused_layers_and_keeps_the_outputs():
    fused = models.build_model(
        ModelConfig("resnet_small", sync_batchnorm=False), (32, 32, 1), fused_batchnorm=True
    )
    x = np.random.default_rng(3).random((2, 32, 32, 1), dtype="float32")
    fused(x, training=True)  # move the moving statistics away from their initial values
    plain = models.plain_keras(fused)
    assert models.uses_fused_batchnorm(fused) and not models.uses_fused_batchnorm(plain)
    assert [layer.name for layer in plain.layers] == [layer.name for layer in fused.layers]
    np.testing.assert_allclose(plain(x, training=False), fused(x, training=False), rtol=1e-6)
    unfused = models.paper_cnn.paper_cnn((16, 16, 1))
    assert models.plain_keras(unfused) is unfused


def test_functional_rebuilds_an_older_sequential_paper_cnn(tmp_path):
    old = keras.Sequential(
        [keras.Input((16, 16, 1), name="image"), *_old_layers()],
        name="paper_cnn",
    )
    old.save(tmp_path / "old.keras")
    reloaded = models.functional(keras.saving.load_model(tmp_path / "old.keras"))
    assert not isinstance(reloaded, keras.Sequential)
    x = np.random.default_rng(2).random((2, 16, 16, 1), dtype="float32")
    np.testing.assert_allclose(reloaded(x), old(x), rtol=1e-6)
    assert models.block_output_names(reloaded) == ["bn1", "bn2"]
    sub = keras.Model(reloaded.inputs[0], [reloaded.get_layer("relu2").output, reloaded.output])
    import tensorflow as tf

    with tf.GradientTape() as tape:
        fmap, logit = sub(x)
    assert tape.gradient(logit, fmap) is not None  # the feature map feeds the output


def _old_layers():
    return [
        keras.layers.Conv2D(4, 3, padding="same", name="conv1"),
        keras.layers.ReLU(name="relu1"),
        keras.layers.BatchNormalization(name="bn1"),
        keras.layers.MaxPool2D(2, name="pool1"),
        keras.layers.Conv2D(4, 3, padding="same", name="conv2"),
        keras.layers.ReLU(name="relu2"),
        keras.layers.BatchNormalization(name="bn2"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(1, name="logit"),
        keras.layers.Activation("sigmoid", name="prob"),
    ]
