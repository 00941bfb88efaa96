"""Declarative building blocks of the RLDS → unified-vector mapping (DATA.md §5.3).

An official per-dataset `process_step` concatenates slices of a few raw features, some
rescaled or converted to 6-D rotations, and labels them with unified names. Here each such
slice is one `Part`; a dataset is a tuple of parts plus its instruction source, episode
filter and cameras (`DatasetSpec`). `episode_state` evaluates the parts over a whole
episode at once (numpy, no TensorFlow).

Timing: `Part.lag = 1` takes the value of the *previous* step (zeros at step 0). The
official pipeline does this for base velocities (the previous step's base action) and,
for datasets without proprioception, for the whole state (the previous step's action).

Per-step presence: `Part.when = (key, value)` applies a part only at steps where the
integer step feature `key` equals `value`; elsewhere its slots are 0 and unmasked. rh20t
needs this: its official script builds the state format per step (6 or 7 joints; the
end-effector pose and the gripper only when recorded), so the mask varies by step.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Literal

import numpy as np

from rdt_jax.data import action_space, rotation

Op = Literal["linear", "quat_6d", "euler_6d", "mat4_pos", "mat4_6d"]
# How many raw values each op consumes and how many unified slots it fills.
_OP_WIDTH: dict[str, tuple[int | None, int | None]] = {
    "linear": (None, None),  # k → k
    "quat_6d": (4, 6),  # quaternion (x, y, z, w) → 6-D
    "euler_6d": (3, 6),  # roll, pitch, yaw (extrinsic xyz) → 6-D
    "mat4_pos": (16, 3),  # column-major flattened 4×4 pose → translation
    "mat4_6d": (16, 6),  # column-major flattened 4×4 pose → 6-D of its rotation
}

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_ALT = re.compile(r"\{([a-z_,]+)\}")


def expand_names(spec: str) -> tuple[str, ...]:
    """`"arm_joint_{0..2}_pos,gripper_open"` → the 4 names; `{x,y,z}` lists alternatives."""
    out: list[str] = []
    for item in _split_top(spec):
        m = _RANGE.search(item)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            out += [item[: m.start()] + str(i) + item[m.end() :] for i in range(lo, hi + 1)]
            continue
        m = _ALT.search(item)
        if m:
            out += [item[: m.start()] + a + item[m.end() :] for a in m.group(1).split(",")]
            continue
        out.append(item)
    return tuple(out)


def _split_top(spec: str) -> list[str]:
    """Split on commas that are not inside braces."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


@dataclasses.dataclass(frozen=True)
class Part:
    """Unified slots `names` ← `op(offset + scale · raw[key][take])` (clipped if `clip`).

    `key` is a '/'-separated path inside one step (`observation/state`, `action`, …).
    `take` selects (and may reorder) elements of the raw vector; None = all of it (a scalar
    feature counts as a 1-vector). The affine map is applied to the raw values before `op`.
    """

    key: str
    names: str
    take: tuple[int, ...] | None = None
    op: Op = "linear"
    scale: float = 1.0
    offset: float = 0.0
    clip: float | None = None  # symmetric clip to [-clip, clip], after the affine map
    lag: int = 0  # 0: this step; 1: previous step (zeros at step 0)
    when: tuple[str, int] | None = None  # (step feature, value): only at steps where it matches

    @property
    def unified_names(self) -> tuple[str, ...]:
        return expand_names(self.names)

    def __post_init__(self) -> None:
        if self.op not in _OP_WIDTH:
            raise ValueError(f"part {self.key}: unknown op {self.op!r}")
        if self.lag not in (0, 1):
            raise ValueError(f"part {self.key}: lag must be 0 or 1")
        n_in, n_out = _OP_WIDTH[self.op]
        names = self.unified_names
        if n_out is not None and len(names) != n_out:
            raise ValueError(f"part {self.key}: op {self.op} fills {n_out} slots, names give {len(names)}")
        if n_in is not None and self.take is not None and len(self.take) != n_in:
            raise ValueError(f"part {self.key}: op {self.op} needs {n_in} raw values, take gives {len(self.take)}")
        if self.op == "linear" and self.take is not None and len(self.take) != len(names):
            raise ValueError(f"part {self.key}: {len(self.take)} raw values for {len(names)} names")
        action_space.indices_of(names)  # fail early on an unknown name

    def evaluate(self, raw: np.ndarray, where: str) -> np.ndarray:
        """(T, k) values for this part from the (T, ...) raw feature (already lagged)."""
        x = np.asarray(raw)
        if x.dtype == np.bool_ or np.issubdtype(x.dtype, np.integer):
            x = x.astype(np.float64)
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{where}: feature {self.key!r} has non-numeric dtype {x.dtype}")
        x = x.astype(np.float64).reshape(x.shape[0], -1)  # scalars → (T, 1)
        if self.take is not None:
            if max(self.take) >= x.shape[1]:
                raise ValueError(
                    f"{where}: feature {self.key!r} has {x.shape[1]} values per step, "
                    f"the mapping reads index {max(self.take)}"
                )
            x = x[:, list(self.take)]
        n_in = _OP_WIDTH[self.op][0] or len(self.unified_names)
        if x.shape[1] != n_in:
            raise ValueError(
                f"{where}: feature {self.key!r} has {x.shape[1]} values per step, the mapping expects {n_in}"
            )
        x = self.offset + self.scale * x
        if self.clip is not None:
            x = np.clip(x, -self.clip, self.clip)
        if self.op == "quat_6d":
            return rotation.quaternion_to_6d(x)
        if self.op == "euler_6d":
            return rotation.euler_to_6d(x)
        if self.op in ("mat4_pos", "mat4_6d"):
            # The 16 values are a column-major 4×4 pose (the official scripts transpose the
            # row-major reshape): m[r, c] = v[4c + r].
            m = x.reshape(-1, 4, 4).transpose(0, 2, 1)
            return m[:, :3, 3] if self.op == "mat4_pos" else rotation.matrix_to_6d(m[:, :3, :3])
        return x


InstructionKind = Literal["text", "codepoints", "constant"]
# The official cleaning (DATA.md §5.3): each pattern replaced by a space, then strip.
DEFAULT_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("_", " "),
    ("1f", " "),
    ("4f", " "),
    ("-", " "),
    ("50", " "),
    ("55", " "),
    ("56", " "),
)


@dataclasses.dataclass(frozen=True)
class Instruction:
    """Where the episode instruction comes from: a per-step text feature (the first step's
    value is used), a per-step int array of Unicode code points (language_table), or a
    constant the official script writes."""

    key: str = "observation/natural_language_instruction"
    kind: InstructionKind = "text"
    constant: str = ""
    extra_replacements: tuple[tuple[str, str], ...] = ()
    clean: bool = True

    def resolve(self, first_step_value: object) -> str:
        if self.kind == "constant":
            text = self.constant
        elif self.kind == "codepoints":
            text = "".join(chr(int(c)) for c in np.asarray(first_step_value).ravel()).replace("\x00", "")
        else:
            v = first_step_value
            text = v.decode("utf-8") if isinstance(v, bytes | np.bytes_) else str(v)
        if self.clean and self.kind != "constant":  # the scripts write constants verbatim
            for old, new in (*DEFAULT_REPLACEMENTS, *self.extra_replacements):
                text = re.sub(old, new, text)
            text = text.strip()
        return capitalize_and_period(text)


def capitalize_and_period(text: str) -> str:
    """Upper-case the first letter, append '.' if missing (empty stays empty)."""
    if not text:
        return text
    if not text[0].isupper():
        text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


@dataclasses.dataclass(frozen=True)
class EpisodeFilter:
    """Keep an episode only if `value(key) <op> threshold`. `level="episode"` reads an
    episode-level feature, `"first_step"` the first step's value."""

    key: str
    level: Literal["episode", "first_step"]
    op: Literal["true", "gt", "eq"]
    value: float | str = 0.0

    def keep(self, raw: object) -> bool:
        v = np.asarray(raw).ravel()
        if v.size != 1:
            raise ValueError(f"filter key {self.key!r} is not a scalar (shape {np.shape(raw)})")
        x = v[0]
        if self.op == "true":
            return bool(x)
        if self.op == "gt":
            return float(x) > float(self.value)
        x = x.decode("utf-8") if isinstance(x, bytes | np.bytes_) else x
        return x == self.value


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Everything needed to turn one RLDS episode into unified per-step states."""

    name: str
    parts: tuple[Part, ...]
    instruction: Instruction
    # Observation keys for the model's camera slots (exterior, right wrist, left wrist);
    # None = the robot has no such camera (dataset_img_keys.json with mask 0).
    cameras: tuple[str | None, str | None, str | None]
    ctrl_freq: float
    version: str = "0.1.0"  # published tfds version directory (official dataset_to_path)
    episode_filter: EpisodeFilter | None = None
    bgr: bool = False  # frames are stored BGR (fmb): swap to RGB
    note: str = ""

    def __post_init__(self) -> None:
        names = [n for p in self.parts for n in p.unified_names]
        action_space.indices_of(names)  # raises if two parts write the same slot

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(n for p in self.parts for n in p.unified_names)

    def mask(self) -> np.ndarray:
        return action_space.mask_of(self.state_names, dtype=np.float32)

    def step_keys(self) -> tuple[str, ...]:
        keys = {p.key for p in self.parts} | {p.when[0] for p in self.parts if p.when}
        if self.instruction.kind != "constant":
            keys.add(self.instruction.key)
        return tuple(sorted(keys))


def episode_states(spec: DatasetSpec, steps: Mapping[str, np.ndarray], where: str) -> np.ndarray:
    """(T, 128) float32 unified states of one episode from its flat per-step features
    `{"observation/state": (T, ...), ...}`. Float32 like the official `assemble_state_vec`."""
    return episode_states_and_masks(spec, steps, where)[0]


def _step_feature(spec: DatasetSpec, steps: Mapping[str, np.ndarray], key: str, t: int, where: str) -> np.ndarray:
    if key not in steps:
        raise KeyError(f"{where}: dataset {spec.name} needs step feature {key!r}; the episode has {sorted(steps)}")
    raw = np.asarray(steps[key])
    if len(raw) != t:
        raise ValueError(f"{where}: feature {key!r} has {len(raw)} steps, expected {t}")
    return raw


def episode_states_and_masks(
    spec: DatasetSpec, steps: Mapping[str, np.ndarray], where: str
) -> tuple[np.ndarray, np.ndarray]:
    """(T, 128) float32 states and (T, 128) float32 0/1 masks of one episode. The mask is
    the same at every step unless a part has a `when` condition."""
    lengths = {k: len(v) for k, v in steps.items()}
    if not lengths:
        raise ValueError(f"{where}: episode has no step features")
    t = next(iter(lengths.values()))
    state = np.zeros((t, action_space.STATE_DIM), dtype=np.float32)
    mask = np.zeros((t, action_space.STATE_DIM), dtype=np.float32)
    for part in spec.parts:
        values = part.evaluate(_step_feature(spec, steps, part.key, t, where), where)
        present = np.ones((t, 1), dtype=bool)
        if part.when is not None:
            flag = _step_feature(spec, steps, part.when[0], t, where).reshape(t, -1)
            present = flag[:, :1].astype(np.int64) == part.when[1]
            values = np.where(present, values, 0.0)
        if part.lag:
            values = np.concatenate([np.zeros_like(values[:1]), values[:-1]], axis=0)
        idx = action_space.indices_of(part.unified_names)
        state[:, idx] = values
        mask[:, idx] = present
    return state, mask
