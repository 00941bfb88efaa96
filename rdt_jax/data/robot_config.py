"""A robot's mapping from its HDF5 episode files into the unified vector, loaded from JSON.

The config is data only (json.load, no code execution); see configs/robots/aloha_agilex.json
for the official fine-tuning robot (DATA.md §2).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from rdt_jax.data import action_space
from rdt_jax.data.schema import CAMERA_SLOTS


class RobotConfigError(ValueError):
    """A robot config file that cannot be used; the message names the file."""


REPO_CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs" / "robots"
DEFAULT_ROBOT = "aloha_agilex"


@dataclasses.dataclass(frozen=True)
class RobotConfig:
    name: str
    dataset_name: str  # key into dataset_control_freq.json / dataset_stat.json
    ctrl_freq: float
    state_key: str  # (T, k) proprioception
    action_key: str  # (T, k') recorded actions (targets)
    state_names: tuple[str, ...]  # unified names of the k state columns
    action_names: tuple[str, ...]  # defaults to state_names
    state_divisors: Mapping[str, float]  # per-name divisor (official gripper normalisation)
    action_divisors: Mapping[str, float]
    cameras: Mapping[str, str | None]  # camera slot → HDF5 key (None: robot lacks it)
    image_shape: tuple[int, int, int] | None = None  # decoded (H, W, 3); None: any
    jpeg_color: Literal["opencv", "rgb"] = "opencv"  # see jpeg.decode_jpeg
    horizon: int = 64
    min_episode_len: int = 128  # shorter episodes get weight 0 (official)
    first_move_threshold: float = 0.01
    instruction_file: str = "expanded_instruction_gpt-4-turbo.json"
    instruction_keys: tuple[str, ...] = ("instruction", "simplified_instruction", "expanded_instruction")

    def __post_init__(self) -> None:
        action_space.indices_of(self.state_names)  # raises on unknown/duplicate names
        action_space.indices_of(self.action_names)
        for which, div, names in (("state_divisors", self.state_divisors, self.state_names),
                                  ("action_divisors", self.action_divisors, self.action_names)):
            unknown = set(div) - set(names)
            if unknown:
                raise ValueError(f"robot {self.name}: {which} names {sorted(unknown)} not in the columns")
        bad = set(self.cameras) - set(CAMERA_SLOTS)
        if bad:
            raise ValueError(f"robot {self.name}: unknown camera slots {sorted(bad)}; use {CAMERA_SLOTS}")
        if self.jpeg_color not in ("opencv", "rgb"):
            raise ValueError(f"robot {self.name}: jpeg_color must be opencv or rgb, not {self.jpeg_color!r}")

    # Divisor vectors in column order, float64 as the official code (so everything after is f64).
    @property
    def state_divisor_array(self) -> np.ndarray:
        return np.asarray([self.state_divisors.get(n, 1.0) for n in self.state_names], np.float64)

    @property
    def action_divisor_array(self) -> np.ndarray:
        return np.asarray([self.action_divisors.get(n, 1.0) for n in self.action_names], np.float64)

    @property
    def camera_keys(self) -> tuple[str | None, ...]:
        """HDF5 key per camera slot, in CAMERA_SLOTS order."""
        return tuple(self.cameras.get(slot) for slot in CAMERA_SLOTS)

    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state_divisors"], d["action_divisors"] = dict(self.state_divisors), dict(self.action_divisors)
        d["cameras"] = dict(self.cameras)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "<dict>") -> RobotConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise RobotConfigError(f"{source}: unknown robot config keys {sorted(unknown)}")
        d = dict(d)
        try:
            d["state_names"] = tuple(d["state_names"])
            d["action_names"] = tuple(d.get("action_names") or d["state_names"])
            d.setdefault("state_divisors", {})
            d.setdefault("action_divisors", {})
            if d.get("image_shape") is not None:
                d["image_shape"] = tuple(int(x) for x in d["image_shape"])
            if "instruction_keys" in d:
                d["instruction_keys"] = tuple(d["instruction_keys"])
            return cls(**d)
        except (KeyError, TypeError, ValueError) as e:  # ValueError: the field checks of __post_init__
            raise RobotConfigError(f"{source}: invalid robot config ({e})") from e


def load_robot_config(name_or_path: str | pathlib.Path = DEFAULT_ROBOT) -> RobotConfig:
    """Load `configs/robots/<name>.json` or a JSON file path."""
    p = pathlib.Path(name_or_path)
    if not p.suffix:
        p = REPO_CONFIGS / f"{name_or_path}.json"
    try:
        with open(p) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise RobotConfigError(f"{p}: no such robot config (a name from {REPO_CONFIGS} or a JSON file path)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RobotConfigError(f"{p}: not a JSON robot config ({e})") from None
    if not isinstance(d, dict):
        raise RobotConfigError(f"{p}: a robot config is a JSON object, got {type(d).__name__}")
    return RobotConfig.from_dict(d, source=str(p))
