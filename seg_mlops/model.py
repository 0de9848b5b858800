"""Build the UNet segmentation network (Keras 3) from the config's ``model`` section.

The architecture follows the reference TensorflowUNet: per-level kernel sizes that
shrink with depth, per-level dilation rates that shrink with depth, dropout that grows
with depth, and a decoder that mirrors the encoder through skip connections.
"""

from __future__ import annotations

import keras

from seg_mlops.config import ModelConfig, check_model
from seg_mlops.errors import SegMlopsError

__all__ = ["build_unet", "check_args", "kernel_sizes", "dilations", "average_models"]


def kernel_sizes(base_kernels: int, num_layers: int) -> list[int]:
    """Kernel size of each encoder level, from full resolution down to the bridge.

    Args:
        base_kernels: Kernel size at level 0 (odd).
        num_layers: Number of encoder levels, bridge included.

    Returns:
        ``num_layers`` sizes starting at ``base_kernels``, dropping by 2 per level,
        never below 3 (a 1x1 conv would see no spatial context). A ``base_kernels``
        below 3 is kept as is.
    """
    return [max(base_kernels - 2 * i, min(3, base_kernels)) for i in range(num_layers)]


def dilations(dilation: int, num_layers: int) -> list[int]:
    """Dilation rate of each encoder level, from full resolution down to the bridge.

    Args:
        dilation: Dilation rate at level 0.
        num_layers: Number of encoder levels, bridge included.

    Returns:
        ``num_layers`` rates starting at ``dilation``, dropping by 1 per level, never below 1.
    """
    return [max(dilation - i, 1) for i in range(num_layers)]


def check_args(**kwargs) -> None:
    """Raise SegMlopsError naming the model.* key if build_unet could not build these keyword
    arguments (cheap: lets a tuner reject a trial before any training)."""
    _check(ModelConfig(**kwargs))


def _check(m: ModelConfig) -> None:
    """The rules live in config.check_model (config loading applies them too); the activation
    needs Keras, so it is checked here."""
    check_model(m)
    try:
        keras.activations.get(m.activation)
    except (ValueError, TypeError) as exc:
        raise SegMlopsError(
            f"model.activation={m.activation!r} is not a Keras activation; "
            "use e.g. 'relu', 'elu', 'gelu', 'swish' or 'mish'"
        ) from exc


def _conv_block(
    x: keras.KerasTensor,
    *,
    prefix: str,
    filters: int,
    kernel: int,
    dilation: int,
    dropout: float,
    batch_norm: bool,
    activation: str,
) -> keras.KerasTensor:
    """Two same-padded convs with optional BN after each and dropout between them."""
    conv_kwargs = dict(
        filters=filters,
        kernel_size=(kernel, kernel),
        dilation_rate=(dilation, dilation),
        padding="same",
        kernel_initializer="he_normal",
        activation=activation,
    )
    x = keras.layers.Conv2D(name=f"{prefix}_conv1", **conv_kwargs)(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(name=f"{prefix}_bn1")(x)
    # A zero-rate Dropout is a no-op; leaving it out keeps the graph and summary honest.
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name=f"{prefix}_dropout")(x)
    x = keras.layers.Conv2D(name=f"{prefix}_conv2", **conv_kwargs)(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(name=f"{prefix}_bn2")(x)
    return x


def build_unet(**kwargs) -> keras.Model:
    """Build an uncompiled UNet that maps raw RGB pixels to per-pixel class probabilities.

    Args:
        **kwargs: model.* keys (config.ModelConfig fields, whose defaults fill the rest):
        image_height: Input height in pixels; must be divisible by ``2**(num_layers-1)``.
        image_width: Input width in pixels; must be divisible by ``2**(num_layers-1)``.
        num_classes: 1 for a binary mask (sigmoid head), >= 2 for a softmax over classes.
        base_filters: Filters at level 0; level ``i`` has ``base_filters * 2**i``.
        num_layers: Encoder levels including the bridge (so ``num_layers - 1`` poolings).
        base_kernels: Odd kernel size at level 0; shrinks by 2 per level, floor 3.
        dilation: Dilation rate at level 0; shrinks by 1 per level, floor 1.
        dropout_rate: Level ``i`` applies dropout ``dropout_rate * i`` between its convs.
        batch_norm: Add BatchNormalization after every conv of the encoder and decoder.
        activation: Any Keras activation name for the hidden convs ("relu", "elu", ...).

    Returns:
        A ``keras.Model`` named "unet" taking ``(H, W, 3)`` float32 pixels in 0..255 and
        returning ``(H, W, num_classes)`` float32 probabilities.

    Raises:
        SegMlopsError: If any argument is out of range, naming the ``model.*`` key.
    """
    m = ModelConfig(**kwargs)  # the one home of the defaults; an unknown keyword is a TypeError
    _check(m)  # before any layer is made
    image_height, image_width, num_classes = m.image_height, m.image_width, m.num_classes
    base_filters, num_layers, dropout_rate = m.base_filters, m.num_layers, m.dropout_rate
    kernels = kernel_sizes(m.base_kernels, num_layers)
    rates = dilations(m.dilation, num_layers)
    block = dict(batch_norm=m.batch_norm, activation=m.activation)

    inputs = keras.Input(shape=(image_height, image_width, 3), dtype="float32", name="image")
    # Scaling inside the model means every caller (training, eval, serving) feeds raw
    # pixels and none of them can forget or double the normalisation.
    # float32 even under a mixed policy: 0..255 -> 0..1 is computed at full precision, and the
    # first conv casts to the compute dtype itself.
    x = keras.layers.Rescaling(1.0 / 255, dtype="float32", name="rescale")(inputs)

    skips: list[keras.KerasTensor] = []
    for i in range(num_layers):
        x = _conv_block(
            x,
            prefix=f"enc{i}",
            filters=base_filters * 2**i,
            kernel=kernels[i],
            dilation=rates[i],
            dropout=dropout_rate * i,
            **block,
        )
        skips.append(x)
        # The deepest level is the bridge: it is not pooled, the decoder starts from it.
        if i < num_layers - 1:
            x = keras.layers.MaxPooling2D((2, 2), name=f"enc{i}_pool")(x)

    for i in range(num_layers - 1):
        level = num_layers - 2 - i  # the encoder level whose resolution we return to
        filters = base_filters * 2**level
        x = keras.layers.Conv2DTranspose(
            filters, (2, 2), strides=(2, 2), padding="same", name=f"dec{i}_up"
        )(x)
        x = keras.layers.Concatenate(name=f"dec{i}_concat")([x, skips[level]])
        x = _conv_block(
            x,
            prefix=f"dec{i}",
            filters=filters,
            kernel=kernels[level],
            dilation=rates[level],
            dropout=dropout_rate * level,
            **block,
        )

    head_activation = "sigmoid" if num_classes == 1 else "softmax"
    # float32 head: under a mixed_float16 policy the masks and the loss stay in float32.
    outputs = keras.layers.Conv2D(
        num_classes, (1, 1), activation=head_activation, dtype="float32", name="head"
    )(x)
    return keras.Model(inputs, outputs, name="unet")


def average_models(models: list[keras.Model], name: str = "fold_ensemble") -> keras.Model:
    """One model whose output is the mean of `models`' outputs (probabilities, before any
    threshold or argmax): a fold ensemble. Same contract as each of them: raw 0..255 pixels in,
    probabilities out, so evaluation, inference, serving and model logging take it unchanged.

    Args:
        models: two or more models with the same input and output shapes (e.g. the fold models of
            a cross-validation); each keeps its own weights, nested as a layer named member_<i>.
        name: the ensemble model's name.
    """
    if len(models) < 2:
        raise SegMlopsError(f"an ensemble needs at least 2 models, got {len(models)}")
    shapes = {(tuple(m.input_shape[1:]), tuple(m.output_shape[1:])) for m in models}
    if len(shapes) > 1:
        raise SegMlopsError(f"cannot average models of different input/output shapes: {sorted(shapes)}")
    inputs = keras.Input(shape=models[0].input_shape[1:], dtype="float32", name="image")
    # Each member under its own name: nested models share layer names inside (enc0_conv1...),
    # which is fine, but the members themselves must differ for the functional graph.
    members = [keras.Model(m.input, m.output, name=f"member_{i}") for i, m in enumerate(models)]
    outputs = keras.layers.Average(dtype="float32", name="mean_probabilities")([m(inputs) for m in members])
    return keras.Model(inputs, outputs, name=name)
