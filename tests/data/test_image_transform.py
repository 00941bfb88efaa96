"""Image preprocessing: pad-to-square by hand, the whole chain against transformers' PIL SigLIP processor."""

import numpy as np
import pytest

from rdt_jax.data import image_transform as it


def test_pad_to_square_by_hand():
    img = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
    out = it.pad_to_square(img)
    assert out.shape == (10, 10, 3)
    np.testing.assert_array_equal(out[2:8], img)  # top offset (10 − 6) // 2 = 2
    assert (out[:2] == 127).all() and (out[8:] == 127).all()
    tall = np.ones((7, 4, 3), np.uint8)
    out = it.pad_to_square(tall)
    assert (out[:, 1:5] == 1).all() and (out[:, :1] == 127).all() and (out[:, 5:] == 127).all()  # (7−4)//2 = 1
    sq = np.zeros((5, 5, 3), np.uint8)
    assert it.pad_to_square(sq) is sq
    with pytest.raises(ValueError, match="H, W, 3"):
        it.pad_to_square(np.zeros((4, 4)))


def test_matches_transformers_siglip_pil_processor():
    from PIL import Image
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    proc = SiglipImageProcessorPil(do_resize=True, size={"height": 384, "width": 384}, resample=3,
                                   do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                   image_mean=[0.5] * 3, image_std=[0.5] * 3)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    img[100:200, 50:300] = (255, 0, 0)
    # official: pad with (127,127,127) via PIL paste, then the processor
    side = 640
    canvas = Image.new("RGB", (side, side), (127, 127, 127))
    canvas.paste(Image.fromarray(img), (0, (side - 480) // 2))
    want = proc(images=canvas, return_tensors="np")["pixel_values"][0]
    got = it.preprocess(img)
    assert got.shape == (3, 384, 384) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    # the uint8 path normalised later is the same thing
    np.testing.assert_array_equal(it.normalize(it.preprocess_uint8(img)), want)


def test_background_value():
    bg = it.normalize(it.background(384))
    assert bg.shape == (3, 384, 384)
    np.testing.assert_array_equal(bg, np.float32(np.float32(127 / 255) - 0.5) / np.float32(0.5))
    assert abs(float(bg[0, 0, 0]) + 0.003921) < 1e-6


@pytest.mark.parametrize("shape", [(480, 640, 3), (301, 400, 3), (47, 64, 3), (64, 47, 3), (20, 20, 3)])
@pytest.mark.parametrize("size", [384, 16])
def test_fast_landscape_path_is_bit_exact(shape, size):
    from PIL import Image

    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    side = max(shape[:2])
    canvas = Image.new("RGB", (side, side), (127, 127, 127))
    canvas.paste(Image.fromarray(img), ((side - shape[1]) // 2, (side - shape[0]) // 2))
    want = np.asarray(canvas.resize((size, size), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    np.testing.assert_array_equal(it.preprocess_uint8(img, size), want)
