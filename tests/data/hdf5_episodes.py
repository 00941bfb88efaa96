"""Writers for small test episodes in the exact official ALOHA HDF5 layout (DATA.md §2)."""

from __future__ import annotations

import json
import pathlib

import cv2
import h5py
import numpy as np

CAMS = ("cam_high", "cam_left_wrist", "cam_right_wrist")
H, W = 48, 64  # small frames keep the tests fast; the robot config is adjusted to match


def color_frame(t: int, cam: int, h: int = H, w: int = W) -> np.ndarray:
    """A frame whose flat colours encode (camera, step): left half, right half."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (40 * cam + 20, (7 * t) % 200 + 30, 200 - 40 * cam)
    img[:, w // 2 :] = (250, 10, 128)  # strongly asymmetric R/B so a swap is obvious
    return img


def encode_like_recorder(rgb: np.ndarray) -> bytes:
    # The ALOHA recorders call cv2.imencode on RGB arrays (so the file holds R/B swapped).
    ok, buf = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def write_episode(path: pathlib.Path, qpos: np.ndarray, action: np.ndarray, *, layout: str = "vlen",
                  cams: tuple[str, ...] = CAMS, frame_fn=color_frame) -> pathlib.Path:
    t = qpos.shape[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("/observations/qpos", data=qpos)
        f.create_dataset("/observations/qvel", data=np.zeros_like(qpos))
        f.create_dataset("/action", data=action)
        f.create_dataset("/base_action", data=np.zeros((t, 2)))
        for c, cam in enumerate(cams):
            frames = [frame_fn(i, c) for i in range(t)]
            key = f"/observations/images/{cam}"
            if layout == "raw":
                f.create_dataset(key, data=np.stack(frames))
                continue
            enc = [encode_like_recorder(fr) for fr in frames]
            if layout == "vlen":
                ds = f.create_dataset(key, (t,), dtype=h5py.vlen_dtype(np.uint8))
                for i, b in enumerate(enc):
                    ds[i] = np.frombuffer(b, np.uint8)
            elif layout == "rows":  # zero-padded rows, as the ALOHA recorders write them
                maxlen = max(len(b) for b in enc) + 17
                rows = np.zeros((t, maxlen), np.uint8)
                for i, b in enumerate(enc):
                    rows[i, : len(b)] = np.frombuffer(b, np.uint8)
                f.create_dataset(key, data=rows)
            elif layout == "opaque":
                maxlen = max(len(b) for b in enc) + 5
                f.create_dataset(key, data=np.array([np.void(b.ljust(maxlen, b"\0")) for b in enc]))
            else:
                raise ValueError(layout)
    return path


def write_instructions(directory: pathlib.Path, instruction="pick the cup", simplified=("pick cup",),
                       expanded=("grab the cup", "take the cup")) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "expanded_instruction_gpt-4-turbo.json").write_text(json.dumps(
        {"instruction": instruction, "simplified_instruction": list(simplified),
         "expanded_instruction": list(expanded)}))


def make_qpos(t: int, first_move: int, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
    """Still until `first_move` (tiny drift below 0.01), then moving; grippers ~[0, 4.8]."""
    q = np.tile(rng.uniform(-1, 1, size=(1, 14)), (t, 1))
    q[:, 6] = q[:, 13] = 2.0
    q[:first_move] += rng.uniform(-0.004, 0.004, size=(first_move, 14))
    q[first_move:] += np.linspace(0.02, 1.0, t - first_move)[:, None] * rng.uniform(0.5, 1, size=14)
    return q.astype(dtype)


