"""Tests for seg_mlops.model: the UNet builder's architecture, head, validation and purity."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from seg_mlops.errors import SegMlopsError
from seg_mlops.model import build_unet, dilations, kernel_sizes

TINY = dict(image_height=32, image_width=32, base_filters=4, num_layers=3)


def _layers_of(model: keras.Model, cls: type) -> list:
    return [layer for layer in model.layers if type(layer) is cls]


def test_kernel_sizes_drop_by_two_with_floor_three():
    assert kernel_sizes(9, 8) == [9, 7, 5, 3, 3, 3, 3, 3]
    assert kernel_sizes(3, 4) == [3, 3, 3, 3]
    assert kernel_sizes(7, 1) == [7]


def test_dilations_drop_by_one_with_floor_one():
    assert dilations(3, 5) == [3, 2, 1, 1, 1]
    assert dilations(1, 3) == [1, 1, 1]


def test_binary_output_shape_and_range():
    model = build_unet(**TINY)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    y = keras.ops.convert_to_numpy(model(x, training=False))
    assert model.name == "unet"
    assert y.shape == (2, 32, 32, 1)
    assert y.dtype == np.float32
    head = model.get_layer("head")
    assert head.get_config()["activation"] == "sigmoid"
    # the output is the sigmoid of the 1x1 head conv over the last features, computed in NumPy
    features = keras.ops.convert_to_numpy(keras.Model(model.input, head.input)(x, training=False))
    kernel, bias = head.get_weights()
    np.testing.assert_allclose(y, 1 / (1 + np.exp(-(features @ kernel[0, 0] + bias))), rtol=1e-5, atol=1e-6)


def test_softmax_head_sums_to_one_per_pixel():
    model = build_unet(image_height=32, image_width=64, num_classes=3, base_filters=4, num_layers=2)
    x = np.random.default_rng(1).uniform(0, 255, (1, 32, 64, 3)).astype("float32")
    y = keras.ops.convert_to_numpy(model(x, training=False))
    assert y.shape == (1, 32, 64, 3)
    assert model.get_layer("head").get_config()["activation"] == "softmax"
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, atol=1e-5)


def test_kernels_dilations_and_filters_per_level():
    model = build_unet(
        image_height=32, image_width=32, base_filters=4, num_layers=3, base_kernels=7, dilation=2
    )
    ks, ds = [7, 5, 3], [2, 1, 1]
    for i in range(3):
        for conv in ("conv1", "conv2"):
            cfg = model.get_layer(f"enc{i}_{conv}").get_config()
            assert tuple(cfg["kernel_size"]) == (ks[i], ks[i])
            assert tuple(cfg["dilation_rate"]) == (ds[i], ds[i])
            assert cfg["filters"] == 4 * 2**i
            assert cfg["padding"] == "same"
    # Decoder step i returns to encoder level 1 - i, with that level's kernel/dilation/filters.
    for i, level in enumerate([1, 0]):
        assert model.get_layer(f"dec{i}_up").get_config()["filters"] == 4 * 2**level
        for conv in ("conv1", "conv2"):
            cfg = model.get_layer(f"dec{i}_{conv}").get_config()
            assert tuple(cfg["kernel_size"]) == (ks[level], ks[level])
            assert tuple(cfg["dilation_rate"]) == (ds[level], ds[level])
            assert cfg["filters"] == 4 * 2**level
    # Bridge at 32 / 2**2 = 8 px; the decoder restores full resolution.
    assert model.get_layer("enc2_conv2").output.shape[1:] == (8, 8, 16)
    assert model.get_layer("dec1_conv2").output.shape[1:] == (32, 32, 4)


def test_dropout_rate_grows_with_level_and_level_zero_has_none():
    model = build_unet(**TINY, dropout_rate=0.1)
    rates = {layer.name: layer.rate for layer in _layers_of(model, keras.layers.Dropout)}
    assert rates == pytest.approx(
        {"enc1_dropout": 0.1, "enc2_dropout": 0.2, "dec0_dropout": 0.1}
    )
    assert _layers_of(build_unet(**TINY, dropout_rate=0.0), keras.layers.Dropout) == []


def test_batch_norm_toggles_batchnormalization_layers():
    with_bn = build_unet(**TINY, batch_norm=True)
    without_bn = build_unet(**TINY, batch_norm=False)
    # Two per block: 3 encoder levels + 2 decoder steps.
    assert len(_layers_of(with_bn, keras.layers.BatchNormalization)) == 10
    assert _layers_of(without_bn, keras.layers.BatchNormalization) == []


def test_first_layer_rescales_raw_pixels():
    model = build_unet(**TINY)
    first = model.layers[1]
    assert isinstance(model.layers[0], keras.layers.InputLayer)
    assert isinstance(first, keras.layers.Rescaling)
    assert first.get_config()["scale"] == pytest.approx(1 / 255)
    assert first.get_config()["offset"] == 0.0


def test_param_count_of_one_level_model():
    model = build_unet(image_height=8, image_width=8, base_filters=2, num_layers=1, dropout_rate=0.05)
    # conv1 3*3*3*2+2 = 56, conv2 3*3*2*2+2 = 38, head 1*1*2*1+1 = 3.
    assert model.count_params() == 56 + 38 + 3 == 97
    assert _layers_of(model, keras.layers.Dropout) == []
    assert _layers_of(model, keras.layers.MaxPooling2D) == []


def test_activation_is_applied_to_hidden_convs():
    model = build_unet(**TINY, activation="elu")
    assert model.get_layer("enc0_conv1").get_config()["activation"] == "elu"
    assert model.get_layer("dec1_conv2").get_config()["activation"] == "elu"


def test_non_divisible_size_error_suggests_both_neighbours():
    with pytest.raises(SegMlopsError) as info:
        build_unet(image_height=100, image_width=96, num_layers=4, base_filters=2)
    msg = str(info.value)
    assert "model.image_height=100" in msg
    assert "96" in msg and "104" in msg
    assert "model.num_layers=4" in msg
    assert "\n" not in msg


def test_unknown_activation_error():
    with pytest.raises(SegMlopsError, match=r"model\.activation='nonsense'"):
        build_unet(**TINY, activation="nonsense")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"num_layers": 0}, "model.num_layers=0"),
        ({"base_filters": 0}, "model.base_filters=0"),
        ({"base_kernels": 4}, "model.base_kernels=4"),
        ({"dilation": 0}, "model.dilation=0"),
        ({"dropout_rate": 1.0}, "model.dropout_rate=1.0"),
        ({"dropout_rate": -0.1}, "model.dropout_rate=-0.1"),
        ({"num_classes": 0}, "model.num_classes=0"),
        ({"image_width": 34}, "model.image_width=34"),
        # 3 levels: the bridge would drop 0.5 * 2 = everything (Keras accepts a rate of 1.0)
        ({"dropout_rate": 0.5}, "model.dropout_rate=0.5 with model.num_layers=3"),
        ({"dropout_rate": 0.3, "num_layers": 5}, "model.dropout_rate=0.3 with model.num_layers=5"),
    ],
)
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(SegMlopsError) as info:
        build_unet(**{**TINY, **override})
    assert key in str(info.value)


def test_build_is_pure():
    a = build_unet(**TINY)
    b = build_unet(**TINY)
    assert [layer.name for layer in a.layers] == [layer.name for layer in b.layers]
    assert [type(layer) for layer in a.layers] == [type(layer) for layer in b.layers]
    assert not {id(w) for w in a.weights} & {id(w) for w in b.weights}
    assert not a.compiled
