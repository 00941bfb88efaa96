"""The image tokens RDT conditions on: SigLIP ``last_hidden_state`` of the 6 images of a sample.

A sample's images come in the order ``[ext_{t-1}, right_{t-1}, left_{t-1}, ext_t, right_t,
left_t]``, already preprocessed (pad to square with (127,127,127), bicubic resize to 384,
``(x/255 - 0.5)/0.5``; the data pipeline owns that transform so training and serving see the
same pixels; :func:`preprocess_images` calls its ``rdt_jax.data.image_transform``). They
are encoded as one batch of ``B·6`` images and reshaped to ``(B, 6·729, 1152)``: token
``n = image·729 + patch``, the layout of RDT's image position table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rdt_jax.encoders.siglip import SiglipVisionTower

__all__ = ["encode_images", "make_image_encoder", "preprocess_images"]


def preprocess_images(images: Sequence[np.ndarray | None], size: int = 384) -> np.ndarray:
    """uint8 RGB ``(H, W, 3)`` images (``None`` = missing camera) -> ``(N, 3, size, size)`` float32.

    Uses the data pipeline's transform (pad to square with (127,127,127), PIL bicubic resize,
    SigLIP normalisation), and its grey background for missing images, so serving feeds the
    encoder exactly the pixels training did.
    """
    from rdt_jax.data import image_transform

    out = [
        image_transform.normalize(image_transform.background(size))
        if im is None
        else image_transform.preprocess(np.asarray(im), size)
        for im in images
    ]
    return np.stack(out).astype(np.float32, copy=False)


def _is_channels_last(shape: tuple[int, ...], channels: int) -> bool:
    if shape[-1] == channels and shape[-3] != channels:
        return True
    if shape[-3] == channels and shape[-1] != channels:
        return False
    raise ValueError(f"cannot tell the channel axis of images with shape {shape}; pass channels_last")


def encode_images(tower: SiglipVisionTower, images: jax.Array, *, channels_last: bool | None = None) -> jax.Array:
    """``images`` (B, N, 3, H, W) or (B, N, H, W, 3) -> (B, N·num_patches, hidden); one sample's
    (N, 3, H, W) or (N, H, W, 3) -> (N·num_patches, hidden) (RDT: six images -> (4374, 1152)).

    Float images are taken as normalised SigLIP input; uint8 images (the data pipeline's resized pixels)
    are normalised here with the pipeline's own table. The output dtype is the tower's compute dtype
    (bfloat16 for a bfloat16 tower).
    """
    if images.dtype == jnp.uint8:
        from rdt_jax.data.image_transform import normalisation_table

        # The host's table (transformers' rescale + normalise per value), not x/127.5 - 1, which differs
        # from it by an ulp for most values: training and serving see identical inputs.
        images = jnp.asarray(normalisation_table())[jnp.asarray(images).astype(jnp.int32)]
    if images.ndim == 4:
        return encode_images(tower, images[None], channels_last=channels_last)[0]
    if images.ndim != 5:
        raise ValueError(f"images must be (B, N, C, H, W) or (B, N, H, W, C) (or one sample's (N, C, H, W) / "
                         f"(N, H, W, C)), got shape {images.shape}")
    if channels_last is None:
        channels_last = _is_channels_last(images.shape, tower.cfg.num_channels)
    b, n = images.shape[:2]
    tokens = tower(images.reshape(b * n, *images.shape[2:]), channels_last=channels_last)
    return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])


def make_image_encoder(
    tower: SiglipVisionTower, *, channels_last: bool | None = None
) -> Callable[[jax.Array], jax.Array]:
    """A jitted ``images -> tokens`` closure over the tower's weights.

    The weights are passed to the compiled function as arguments (not baked in as constants),
    so they keep their device placement/sharding and compiling is cheap. One compilation per
    input shape and dtype.
    """
    graphdef, state = nnx.split(tower)

    @jax.jit
    def run(state: nnx.State, images: jax.Array) -> jax.Array:
        return encode_images(nnx.merge(graphdef, state), images, channels_last=channels_last)

    return lambda images: run(state, jnp.asarray(images))
