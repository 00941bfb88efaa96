"""The compiled exact resize (`pil_resample`) against Pillow itself, bit for bit; the faster
decode/normalise paths against their reference formulations."""

import cv2
import numpy as np
import pytest
from PIL import Image

from rdt_jax.data import image_transform as it
from rdt_jax.data import pil_resample as pr
from rdt_jax.data.jpeg import decode_jpeg

needs_kernel = pytest.mark.skipif(not pr.available(), reason="no C compiler: Pillow fallback in use")


def _pil_pad_resize(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    side = max(h, w)
    canvas = Image.new("RGB", (side, side), (127, 127, 127))
    canvas.paste(Image.fromarray(img), ((side - w) // 2, (side - h) // 2))
    return np.asarray(canvas.resize((size, size), Image.Resampling.BICUBIC)).transpose(2, 0, 1)


def _camera_like(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 255], -1)
    img = img + rng.normal(0, 20, img.shape)
    img[h // 4: h // 2, w // 5: w // 2] = (255, 0, 10)  # hard edges: ringing, clipping at 0/255
    return np.clip(img, 0, 255).astype(np.uint8)


@needs_kernel
def test_square_resize_matches_pillow():
    rng = np.random.default_rng(0)
    for _ in range(60):
        side, size = (int(v) for v in rng.integers(2, 400, 2))
        img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        want = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(pr.resize_square(img, size), want, err_msg=f"{side} → {size}")


@needs_kernel
@pytest.mark.parametrize("shape", [(480, 640), (479, 640), (360, 640), (720, 1280), (301, 400), (47, 64), (1, 9)])
@pytest.mark.parametrize("size", [384, 224, 17])
def test_pad_resize_landscape_matches_pillow(shape, size):
    img = _camera_like(*shape, np.random.default_rng(shape[0] + size))
    want = _pil_pad_resize(img, size)
    np.testing.assert_array_equal(pr.pad_resize_landscape(img, size, 127), want)
    out = np.full((3, size, size), 9, np.uint8)  # written in place, every pixel
    assert pr.pad_resize_landscape(img, size, 127, out) is out
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("shape", [(480, 640, 3), (640, 480, 3), (384, 384, 3), (200, 384, 3), (500, 500, 3)])
def test_preprocess_same_with_kernel_and_with_pillow(shape, monkeypatch):
    img = _camera_like(*shape[:2], np.random.default_rng(7))
    fast = it.preprocess_uint8(img)
    slot = np.zeros((3, 384, 384), np.uint8)
    it.preprocess_uint8(img, out=slot)
    monkeypatch.setattr(pr, "_kernel", False)  # what a machine without a C compiler runs
    assert not pr.available()
    slow = it.preprocess_uint8(img)
    np.testing.assert_array_equal(fast, slow)
    np.testing.assert_array_equal(slot, slow)
    np.testing.assert_array_equal(slow, _pil_pad_resize(img, 384))


def test_coeffs_sum_to_one_in_fixed_point():
    b, k, ks = pr.coeffs(640, 384)
    assert b.shape == (384, 2) and k.shape == (384, ks) and ks == 9
    assert np.all(np.abs(k.sum(1) - (1 << pr.PRECISION_BITS)) <= ks)


def test_decode_rgb_equals_bgr_decode_then_convert():
    img = _camera_like(48, 64, np.random.default_rng(3))
    for enc in (cv2.imencode(".jpg", img)[1], cv2.imencode(".png", img)[1]):
        ref = cv2.cvtColor(cv2.imdecode(enc, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(decode_jpeg(enc.tobytes(), color="rgb"), ref)
        np.testing.assert_array_equal(decode_jpeg(enc, color="opencv"), cv2.imdecode(enc, cv2.IMREAD_COLOR))


@pytest.mark.parametrize("shape", [(3, 384, 384), (6, 3, 16, 16), (5,), (2, 3), (0, 3)])
def test_normalize_equals_table_lookup(shape):
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    got = it.normalize(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, it._LUT[x])
    np.testing.assert_array_equal(it.normalize(x[..., ::-1]), it._LUT[x[..., ::-1]])  # non-contiguous
    out = np.full(shape, np.nan, np.float32)  # into a given array (a batch slot)
    assert it.normalize(x, out) is out
    np.testing.assert_array_equal(out, it._LUT[x])
    strided = np.full((*shape, 2), np.nan, np.float32)[..., 0]  # a non-contiguous slot
    assert it.normalize(x, strided) is strided
    np.testing.assert_array_equal(strided, it._LUT[x])
    with pytest.raises(ValueError, match="out must be float32"):
        it.normalize(x, np.empty(shape, np.float64))


def _kernel_without_avx2(tmp_path):
    """The portable loop alone (what a compiler without AVX2 intrinsics builds)."""
    import ctypes
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    (tmp_path / "k.c").write_text(pr._C_SOURCE)
    subprocess.run([cc, "-O2", "-fPIC", "-shared", "-DRDT_NO_AVX2", "-o", str(tmp_path / "k.so"),
                    str(tmp_path / "k.c")], check=True)
    fn = ctypes.CDLL(str(tmp_path / "k.so")).rdt_resample_rows
    fn.argtypes = pr._load().argtypes
    return fn


@needs_kernel
@pytest.mark.parametrize(("rows", "n", "out_rows", "channels"),
                         [(640, 1440, 384, 0), (640, 1152, 384, 3), (61, 97, 23, 0), (50, 150, 120, 3),
                          (400, 96, 25, 0)])
def test_vector_path_equals_portable_loop(tmp_path, rows, n, out_rows, channels):
    """The AVX2 (16-bit split-weight) path gives the portable int32 loop's bytes, tails included:
    downscales (odd and even tap counts, negative lobes), upscales, clipping at 0 and 255."""
    portable = _kernel_without_avx2(tmp_path)
    rng = np.random.default_rng(rows + n)
    src = rng.integers(0, 256, (rows, n), dtype=np.uint8)
    src[rows // 3: rows // 2, : n // 2] = 255  # hard edges: over/undershoot → clipping
    src[rows // 2: rows // 2 + 3] = 0
    b, k, ks = pr.coeffs(rows, out_rows)
    w = n // channels if channels else n
    outs = []
    for fn in (pr._load(), portable):
        dst = np.zeros((channels or 1) * out_rows * w, np.uint8)
        plane = out_rows * w if channels else 0
        fn(src.ctypes.data, n, dst.ctypes.data, w if channels else n, n, out_rows, b.ctypes.data, k.ctypes.data,
           ks, channels, plane)
        outs.append(dst)
    np.testing.assert_array_equal(outs[0], outs[1])
