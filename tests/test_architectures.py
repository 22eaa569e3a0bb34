"""The architectures beyond the report's CNN: resnet_small (sizes, stochastic depth), its box
head and box strides, the classifier heads, keras.applications backbones, save and load."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasfrac import config, models
from kerasfrac.config import ConfigError, ModelConfig


def test_resnet_small_is_one_channel_and_sized_for_the_cpu():
    m = models.build_model(ModelConfig("resnet_small"), (320, 320, 1))
    assert m.get_layer("stem_conv").kernel.shape == (5, 5, 1, 32)  # a 1-channel stem
    assert 2_700_000 < m.count_params() < 2_900_000
    assert tuple(m.get_layer(models.FEATURES).output.shape) == (None, 10, 10, 256)
    assert models.block_output_names(m) == ["stage1", "stage2", "stage3", "stage4", "features"]
    assert models.last_conv_block_name(m) == "features"
    assert len(m.outputs) == 1 and not models.has_box_head(m)


@pytest.mark.slow
def test_resnet_small_width_and_depth_are_config_keys(tmp_path):
    cfg = config.load_config(
        overrides=["model.name=resnet_small", "model.width=48", "model.blocks_per_stage=1"]
    )
    m = models.build_model(cfg.model, (64, 64, 1))
    assert [m.get_layer(f"stage{s}").output.shape[-1] for s in (1, 2, 3, 4)] == [48, 96, 192, 384]
    assert not any(layer.name.startswith("s1b2") for layer in m.layers)  # one block per stage
    # parameters grow about as width squared: 1.5x the width, about 2.25x the parameters
    base = models.build_model(ModelConfig("resnet_small", blocks_per_stage=1), (64, 64, 1))
    assert 2.1 < m.count_params() / base.count_params() < 2.3
    x = np.random.default_rng(5).random((2, 64, 64, 1), dtype="float32")
    m.save(tmp_path / "wide.keras")
    np.testing.assert_allclose(
        models.load_model(tmp_path / "wide.keras").predict(x, verbose=0),
        m.predict(x, verbose=0),
        rtol=1e-6,
    )
    with pytest.raises(ConfigError, match=r"'model.width' applies to resnet_small only.*paper_cnn"):
        config.load_config(overrides=["model.width=48"])
    with pytest.raises(ConfigError, match="model.blocks_per_stage"):
        config.load_config(overrides=["model.name=resnet_small", "model.blocks_per_stage=0"])


@pytest.mark.slow
def test_resnet_small_drop_path_drops_whole_residual_branches_in_training_only(tmp_path):
    import tensorflow as tf

    cfg = config.load_config(overrides=["model.name=resnet_small", "model.drop_path=0.2"])
    m = models.build_model(cfg.model, (64, 64, 1))
    drops = {layer.name: layer.rate for layer in m.layers if layer.name.endswith("_drop")}
    # 8 blocks: rates 0, 0.2/7, ..., 0.2 rising linearly; the first block keeps its branch
    assert "s1b1_drop" not in drops and len(drops) == 7
    order = [f"s{s}b{b}_drop" for s in (1, 2, 3, 4) for b in (1, 2)][1:]
    np.testing.assert_allclose(
        [drops[name] for name in order], [0.2 * i / 7 for i in range(1, 8)], rtol=1e-6
    )
    assert drops["s4b2_drop"] == pytest.approx(0.2)
    # In training, a branch is kept or dropped for a whole image (scaled by 1/(1-p) if kept).
    layer = m.get_layer("s4b2_drop")
    branch = tf.ones((400, 3, 3, 8))
    out = layer(branch, training=True).numpy().reshape(400, -1)
    assert all(np.unique(row).size == 1 for row in out)  # one draw per image
    assert set(np.round(np.unique(out), 5)) == {0.0, round(1 / 0.8, 5)}
    assert 0.1 < (out[:, 0] == 0).mean() < 0.3  # p = 0.2 of 400 images: sd 0.02, 5 sd apart
    # At inference the model is deterministic and equals the one without drop path.
    plain = models.build_model(ModelConfig("resnet_small"), (64, 64, 1))
    for layer in plain.layers:
        layer.set_weights(m.get_layer(layer.name).get_weights())
    x = np.random.default_rng(5).random((4, 64, 64, 1), dtype="float32")
    np.testing.assert_allclose(m.predict(x, verbose=0), plain.predict(x, verbose=0), rtol=1e-5)
    trained = [m(x, training=True).numpy() for _ in range(3)]
    assert not all(np.allclose(trained[0], t) for t in trained[1:])  # random in training
    m.save(tmp_path / "dp.keras")
    reloaded = models.load_model(tmp_path / "dp.keras")
    assert reloaded.get_layer("s4b2_drop").rate == pytest.approx(0.2)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), m.predict(x, verbose=0), rtol=1e-6)
    # the default builds no dropout layers in the blocks
    assert not any(layer.name.endswith("_drop") for layer in plain.layers)
    with pytest.raises(
        ConfigError, match=r"'model.drop_path' must be in \[0.0, 1.0\) \(a probability.*1.5"
    ):
        config.load_config(overrides=["model.name=resnet_small", "model.drop_path=1.5"])
    with pytest.raises(
        ConfigError, match=r"'model.drop_path' applies to resnet_small only.*paper_cnn"
    ):
        config.load_config(overrides=["model.drop_path=0.1"])


def test_box_head_is_a_second_output_and_the_classifier_shares_its_weights():
    m = models.build_model(ModelConfig("resnet_small", box_head=True), (128, 128, 1))
    assert models.has_box_head(m) and len(m.outputs) == 2
    x = np.random.default_rng(0).random((2, 128, 128, 1), dtype="float32")
    prob, heat = m(x, training=False)
    assert prob.shape == (2, 1) and heat.shape == (2, 4, 4, 1)
    clf = models.classifier(m)
    assert len(clf.outputs) == 1 and not models.has_box_head(clf)
    np.testing.assert_array_equal(np.asarray(clf(x, training=False)), np.asarray(prob))
    assert models.classifier(clf) is clf


@pytest.mark.slow
def test_box_stride_16_doubles_the_heat_maps_grid_and_reaches_stage_3():
    cfg = config.load_config(
        overrides=["model.name=resnet_small", "model.box_head=true", "model.box_stride=16"]
    )
    m = models.build_model(cfg.model, (128, 128, 1))
    coarse = models.build_model(ModelConfig("resnet_small", box_head=True), (128, 128, 1))
    x = np.random.default_rng(6).random((2, 128, 128, 1), dtype="float32")
    assert m(x, training=False)[1].shape == (2, 8, 8, 1)  # 16 px cells; 4x4 at stride 32
    assert coarse(x, training=False)[1].shape == (2, 4, 4, 1)
    # the cells read stage 3 (BN -> ReLU, 128 channels) and the 256 upsampled features
    assert m.get_layer(models.BOX_LOGITS).kernel.shape == (1, 1, 384, 1)
    # the classifier is unchanged: same parameters as the stride-32 model's classifier
    assert models.classifier(m).count_params() == models.classifier(coarse).count_params()
    # the box loss's gradient reaches stage 3 through the fine branch, not only via stage 4
    with tf.GradientTape() as tape:
        heat = m(x, training=True)[1]
    fine = m.get_layer("box_fine_bn")
    grads = tape.gradient(heat, fine.trainable_weights)
    assert all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)
    # an odd stage-3 size (200 px: 13x13) still lines up: the features are resized to it
    odd = models.resnet_small.resnet_small((200, 200, 1), box_head=True, box_stride=16)
    assert tuple(odd.outputs[1].shape) == (None, 13, 13, 1)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["model.name=resnet_small", "model.box_head=true", "model.box_stride=4"],
            r"'model.box_stride' must be one of \[32, 16, 8\].*got 4",
        ),
        (["model.box_stride=16", "model.box_head=true"], r"model.name is 'paper_cnn'"),
        (["model.name=resnet_small", "model.box_stride=16"], r"set model.box_head=true"),
    ],
)
def test_box_stride_is_refused_where_it_means_nothing(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config.load_config(overrides=overrides)


@pytest.mark.parametrize("name", ["paper_cnn", "vgg16"])
def test_box_head_is_refused_where_there_is_no_pooled_feature_map(name):
    with pytest.raises(ValueError, match="model.box_head not available"):
        models.build_model(ModelConfig(name, box_head=True), (64, 64, 1))
    with pytest.raises(ValueError, match="model.head=avgmax not available"):
        models.build_model(ModelConfig(name, head="avgmax"), (64, 64, 1))
    with pytest.raises(ValueError, match="model.meta_head not available"):
        models.build_model(ModelConfig(name, meta_head=True), (64, 64, 1))


def test_heatmap_head_classifies_by_its_most_fractured_cell():
    m = models.resnet_small.resnet_small((64, 64, 1), box_head=True, head="heatmap")
    x = np.random.default_rng(4).random((2, 64, 64, 1), dtype="float32")
    prob, heat = m(x, training=False)
    cells = keras.Model(m.inputs, m.get_layer("box_logits").output)(x, training=False)
    dense = m.get_layer(models.LOGIT)
    w, b = (float(np.ravel(v)[0]) for v in dense.get_weights())
    logit = np.asarray(cells).reshape(2, -1).max(1) * w + b
    np.testing.assert_allclose(np.asarray(prob).ravel(), 1 / (1 + np.exp(-logit)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(heat), 1 / (1 + np.exp(-np.asarray(cells))), rtol=1e-5)
    with pytest.raises(ValueError, match="model.head must be one of"):
        models.resnet_small.resnet_small((64, 64, 1), head="transformer")


def test_heatmap_head_scale_starts_at_one_and_never_turns_negative():
    """A negative scale would make an image the less fractured the more fractured its most
    fractured cell (seen on phantoms: Grad-CAM then pointed away from the box head's cells).
    An optimizer step that pulls the scale below 0 stops it at 0."""
    m = models.resnet_small.resnet_small((64, 64, 1), head="heatmap")
    dense = m.get_layer(models.LOGIT)
    assert float(np.ravel(dense.get_weights()[0])[0]) == 1.0
    opt = keras.optimizers.SGD(1.0)
    opt.apply_gradients([(np.full((1, 1), 0.25, "float32"), dense.kernel)])
    assert float(np.ravel(dense.kernel.numpy())[0]) == pytest.approx(0.75)  # moves freely
    opt.apply_gradients([(np.full((1, 1), 5.0, "float32"), dense.kernel)])
    assert float(np.ravel(dense.kernel.numpy())[0]) == 0.0  # 0.75 - 5 clipped at 0
    # the gap head's Dense is unconstrained
    free = models.resnet_small.resnet_small((64, 64, 1)).get_layer(models.LOGIT)
    assert free.kernel_constraint is None and dense.kernel_constraint is not None


@pytest.mark.parametrize("stride", [32, 16])
def test_attention_head_pools_the_features_where_the_cells_point(stride):
    m = models.resnet_small.resnet_small(
        (64, 64, 1), box_head=True, head="attention", box_stride=stride
    )
    x = np.random.default_rng(8).random((2, 64, 64, 1), dtype="float32")
    source = "box_features" if stride == 16 else models.FEATURES
    parts = keras.Model(
        m.inputs,
        [m.get_layer(n).output for n in (source, "box_logits", "gap_attention", models.FEATURES)],
    )
    feats, cells, pooled, last = (np.asarray(t, "float64") for t in parts(x, training=False))
    flat = cells.reshape(2, -1)
    weights = np.exp(flat - flat.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    want = np.einsum("bk,bkc->bc", weights, feats.reshape(2, flat.shape[1], -1))
    np.testing.assert_allclose(pooled[:, last.shape[-1] :], want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(pooled[:, : last.shape[-1]], last.mean((1, 2)), rtol=1e-5)
    # a flat heat map (what box supervision teaches on normal images) pools to the average
    conv = m.get_layer("box_logits")
    conv.set_weights([np.zeros_like(w) for w in conv.get_weights()])
    _, _, pooled, _ = (np.asarray(t, "float64") for t in parts(x, training=False))
    np.testing.assert_allclose(
        pooled[:, last.shape[-1] :], feats.mean((1, 2)), rtol=1e-4, atol=1e-6
    )


def test_presence_head_reads_the_average_and_the_highest_cell():
    m = models.resnet_small.resnet_small((64, 64, 1), box_head=True, head="presence", box_stride=8)
    x = np.random.default_rng(9).random((2, 64, 64, 1), dtype="float32")
    parts = keras.Model(
        m.inputs, [m.get_layer(n).output for n in ("box_logits", "gap_presence", models.FEATURES)]
    )
    cells, pooled, last = (np.asarray(t, "float64") for t in parts(x, training=False))
    assert cells.shape == (2, 8, 8, 1) and pooled.shape == (2, last.shape[-1] + 1)
    np.testing.assert_allclose(pooled[:, :-1], last.mean((1, 2)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pooled[:, -1], cells.reshape(2, -1).max(1), rtol=1e-5)
    # the Dense reads both: one weight per feature channel, one for the highest cell
    assert m.get_layer(models.LOGIT).kernel.shape == (last.shape[-1] + 1, 1)


def test_avgmax_head_reads_each_channels_average_and_peak():
    m = models.resnet_small.resnet_small((64, 64, 1), head="avgmax")
    x = np.random.default_rng(5).random((2, 64, 64, 1), dtype="float32")
    feats = np.asarray(
        keras.Model(m.inputs, m.get_layer(models.FEATURES).output)(x, training=False)
    )
    w, b = m.get_layer(models.LOGIT).get_weights()
    pooled = np.concatenate([feats.mean(axis=(1, 2)), feats.max(axis=(1, 2))], axis=1)
    assert pooled.shape[1] == w.shape[0] == 2 * feats.shape[-1]
    logit = pooled @ w + b
    prob = np.asarray(m(x, training=False))
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-logit)), rtol=1e-4, atol=1e-6)
    # A plain global-average model of the same body gives other probabilities: the peak counts.
    mean_only = pooled[:, : feats.shape[-1]] @ w[: feats.shape[-1]] + b
    assert not np.allclose(1 / (1 + np.exp(-mean_only)), prob, atol=1e-3)


def test_resnet_small_has_no_imagenet_weights():
    with pytest.raises(ValueError, match="no ImageNet weights"):
        models.build_model(ModelConfig("resnet_small", weights="imagenet"), (64, 64, 1))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50v2", "efficientnetv2b0"])
def test_application_backbones_take_grayscale_and_a_weights_file(tmp_path, name):
    constructor = getattr(keras.applications, models.applications._APPLICATIONS[name][0])
    kwargs = {"include_preprocessing": True} if name == "efficientnetv2b0" else {}
    reference = constructor(include_top=False, weights=None, input_shape=(64, 64, 3), **kwargs)
    rng = np.random.default_rng(1)
    reference.set_weights(
        [rng.normal(0, 0.05, w.shape).astype("float32") for w in reference.get_weights()]
    )
    path = tmp_path / "backbone.weights.h5"
    reference.save_weights(path)

    m = models.build_model(ModelConfig(name, weights=str(path)), (64, 64, 1))
    conv = next(layer for layer in reference.layers if isinstance(layer, keras.layers.Conv2D))
    np.testing.assert_array_equal(m.get_layer(conv.name).get_weights()[0], conv.get_weights()[0])
    # Grayscale is repeated to 3 channels: the features equal the reference's on gray RGB.
    x = rng.random((2, 64, 64, 1), dtype="float32")
    scale = {"resnet50v2": lambda v: v * 2.0 - 1.0, "efficientnetv2b0": lambda v: v * 255.0}
    want = reference(scale[name](np.repeat(x, 3, axis=-1)), training=False)
    got = keras.Model(m.inputs, m.get_layer(models.FEATURES).output)(x, training=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)

    with pytest.raises(ValueError, match="neither 'none', 'imagenet' nor an existing file"):
        models.build_model(ModelConfig(name, weights=str(tmp_path / "missing.h5")), (64, 64, 1))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,box_head,head",
    [
        ("resnet_small", False, "gap"),
        ("resnet_small", True, "gap"),
        ("resnet_small", True, "avgmax"),
        ("resnet_small", True, "stride16"),
        ("resnet_small", False, "attention"),
        ("resnet_small", True, "presence"),
        ("resnet50v2", False, "gap"),
        ("efficientnetv2b0", True, "gap"),
    ],
)
def test_saved_new_architectures_load_and_predict_identically(tmp_path, name, box_head, head):
    stride16 = head == "stride16"  # the fine box head (model.box_stride)
    cfg = ModelConfig(name, box_head=box_head, head="gap" if stride16 else head)
    cfg.box_stride = 16 if stride16 else cfg.box_stride
    m = models.build_model(cfg, (64, 64, 1), fused_batchnorm=True)
    x = np.random.default_rng(2).random((3, 64, 64, 1), dtype="float32")
    m(x, training=True)  # moves BatchNorm statistics away from their initial values
    m.save(tmp_path / "m.keras")
    loaded = models.load_model(tmp_path / "m.keras")
    for a, b in zip(keras.tree.flatten(m(x)), keras.tree.flatten(loaded(x))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
