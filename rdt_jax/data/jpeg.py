"""JPEG frame decoding with explicit channel-order semantics (DATA.md §2).

The released ALOHA/agilex files hold JPEGs written by `cv2.imencode` from RGB arrays, so the
bytes carry R and B swapped; the official loader decodes with `cv2.imdecode(IMREAD_COLOR)`
and uses the result as RGB without conversion, which swaps them back. `color="opencv"` does
exactly that. `color="rgb"` is for JPEGs written by standard encoders from true RGB
(e.g. RLDS/tfds images): decode and convert OpenCV's BGR output to RGB.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

JpegColor = Literal["opencv", "rgb"]
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)


def decode_jpeg(data: bytes | np.ndarray, *, color: JpegColor = "rgb", where: str = "") -> np.ndarray:
    """Decode one JPEG (trailing zero padding allowed) to (H, W, 3) uint8."""
    buf = np.frombuffer(data, np.uint8) if isinstance(data, bytes | bytearray | memoryview) else data
    buf = np.ascontiguousarray(buf).view(np.uint8).reshape(-1)
    if color not in ("opencv", "rgb"):
        raise ValueError(f"unknown color convention {color!r}")
    # IMREAD_COLOR_RGB (OpenCV ≥ 4.10) has libjpeg-turbo write RGB directly: the same pixels
    # as IMREAD_COLOR + cvtColor(BGR2RGB), without the extra pass (tests check equality).
    flag = cv2.IMREAD_COLOR if color == "opencv" else _IMREAD_RGB
    img = cv2.imdecode(buf, flag) if buf.size else None
    if img is None:
        raise ValueError(f"{where or 'frame'}: not a decodable JPEG/PNG ({buf.size} bytes)")
    if color == "rgb" and flag == cv2.IMREAD_COLOR:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img
