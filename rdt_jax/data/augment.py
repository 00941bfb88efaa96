"""Training image augmentation (DATA.md §4.2 step 3), on uint8 (H, W, 3) RGB arrays.

With probability 0.5 an image is augmented by one of {corruption only, colour only, both}
(uniform; colour first when both).

* Colour: torchvision `ColorJitter(brightness=0.3, contrast=0.4, saturation=0.5, hue=0.03)`
  on PIL images, i.e. the four PIL operations torchvision's PIL backend uses
  (`ImageEnhance.Brightness/Contrast/Color`, hue shift of the HSV H channel in uint8 with
  wrap-around) in a random order, factors uniform in [1 − x, 1 + x] and hue in [−0.03, 0.03].
  Same numerics as torchvision for a given draw; only the random stream differs.
* Corruption (imgaug 0.4.0 `image_corrupt.py`, reimplemented with numpy/cv2): in random
  order, (a) one of additive Gaussian / Laplace noise (scale ∈ U[0, 12.75]) or signed
  Poisson noise (λ ∈ U[0, 12.75]), per channel with probability 0.5, else one value per pixel
  for all channels; (b) with probability 0.5 a blur: with probability 0.5 one of
  Gaussian (σ ∈ U[0, 3]), average (k ∈ {2..7}), median (k ∈ {3, 5, 7, 9, 11}), else motion
  blur (k ∈ {3..36}, random angle, line kernel). Deviations from imgaug: the same
  distributions, but blur kernels come from cv2 (`GaussianBlur` with cv2's own kernel-size
  rule, `blur`, `medianBlur`, a centred line kernel for motion blur, whose direction
  weighting imgaug applies is omitted), so pixel values differ slightly for equal parameters.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageEnhance

AUG_PROB = 0.5
NOISE_MAX = 0.05 * 255


def _hue(img: Image.Image, shift: float) -> Image.Image:
    h, s, v = img.convert("HSV").split()
    h_arr = np.asarray(h, np.uint8)
    # torchvision: uint8 add of (hue_factor · 255) truncated toward zero, wrapping around.
    h = Image.fromarray(((h_arr.astype(np.int16) + int(shift * 255)) % 256).astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def color_jitter(img: np.ndarray, rng: np.random.Generator, brightness: float = 0.3, contrast: float = 0.4,
                 saturation: float = 0.5, hue: float = 0.03) -> np.ndarray:
    pil = Image.fromarray(img)
    factors = (rng.uniform(1 - brightness, 1 + brightness), rng.uniform(1 - contrast, 1 + contrast),
               rng.uniform(1 - saturation, 1 + saturation), rng.uniform(-hue, hue))
    for op in rng.permutation(4):
        if op == 0:
            pil = ImageEnhance.Brightness(pil).enhance(factors[0])
        elif op == 1:
            pil = ImageEnhance.Contrast(pil).enhance(factors[1])
        elif op == 2:
            pil = ImageEnhance.Color(pil).enhance(factors[2])
        else:
            pil = _hue(pil, factors[3])
    return np.asarray(pil)


def _noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    kind = rng.integers(3)
    scale = rng.uniform(0, NOISE_MAX)
    shape = img.shape if rng.random() < 0.5 else (*img.shape[:2], 1)  # per_channel=0.5
    if kind == 0:
        n = rng.normal(0.0, scale, shape)
    elif kind == 1:
        n = rng.laplace(0.0, scale, shape)
    else:
        n = rng.poisson(scale, shape) * rng.choice([-1.0, 1.0], shape)
    return np.clip(np.round(img + n), 0, 255).astype(np.uint8)


def _motion_kernel(k: int, angle_deg: float) -> np.ndarray:
    kernel = np.zeros((k, k), np.float32)
    kernel[k // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D(((k - 1) / 2, (k - 1) / 2), angle_deg, 1.0)
    kernel = cv2.warpAffine(kernel, rot, (k, k))
    return kernel / max(kernel.sum(), 1e-6)


def _blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        which = rng.integers(3)
        if which == 0:
            sigma = rng.uniform(0, 3)
            return img if sigma < 0.01 else cv2.GaussianBlur(img, (0, 0), sigma)
        if which == 1:
            k = int(rng.integers(2, 8))
            return cv2.blur(img, (k, k))
        return cv2.medianBlur(img, int(rng.choice([3, 5, 7, 9, 11])))
    k = int(rng.integers(3, 37))
    return cv2.filter2D(img, -1, _motion_kernel(k, rng.uniform(0, 360)))


def corrupt(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    steps = [_noise]
    if rng.random() < 0.5:  # SomeOf((0, 1), ...)
        steps.append(_blur)
    for i in rng.permutation(len(steps)):
        img = steps[i](img, rng)
    return np.ascontiguousarray(img)


def augment(img: np.ndarray, rng: np.random.Generator, prob: float = AUG_PROB) -> np.ndarray:
    """Official image augmentation of one valid frame (uint8 (H, W, 3) RGB)."""
    if rng.random() >= prob:
        return img
    mode = rng.integers(3)  # 0 corrupt only, 1 colour only, 2 both
    if mode in (1, 2):
        img = color_jitter(img, rng)
    if mode in (0, 2):
        img = corrupt(img, rng)
    return img
