"""RDT configuration, read from and written to the official ``config.json`` schema.

The official checkpoints store one flat JSON (the ``model:`` section of ``configs/base.yaml`` merged
with the runner's constructor arguments). :class:`RDTConfig` holds exactly that information plus the
JAX-side knobs (dtypes, norm form, attention kernel, remat) that never go into the official file.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import jax.numpy as jnp

NormForm = Literal["timm_var", "rms"]
AttentionImpl = Literal["xla", "cudnn", "pallas", "reference"]
RematPolicy = Literal["none", "full", "save_dots", "save_cond_kv", "save_cond_kv_and_tokens"]
LayerLayout = Literal["stacked", "per_layer"]

_ADAPTOR_RE = re.compile(r"^mlp(\d+)x_gelu$")

# A pos-embed config is a list of (name, length) pairs; for "image" the length may be a grid tuple.
PosEmbedConfig = tuple[tuple[str, int | tuple[int, ...]], ...]


@dataclasses.dataclass(frozen=True)
class NoiseSchedulerConfig:
    num_train_timesteps: int = 1000
    num_inference_timesteps: int = 5
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "sample"
    clip_sample: bool = False
    type: str = "ddpm"


@dataclasses.dataclass(frozen=True)
class EmaConfig:
    update_after_step: int = 0
    inv_gamma: float = 1.0
    power: float = 0.75
    min_value: float = 0.0
    max_value: float = 0.9999


@dataclasses.dataclass(frozen=True)
class RDTConfig:
    """Every size of the network comes from here; nothing in the model assumes 128 or 2048."""

    hidden_size: int = 2048
    depth: int = 28
    num_heads: int = 32
    action_dim: int = 128
    pred_horizon: int = 64
    lang_token_dim: int = 4096
    img_token_dim: int = 1152
    state_token_dim: int = 128
    max_lang_cond_len: int = 1024
    img_cond_len: int = 4374
    lang_adaptor: str = "mlp2x_gelu"
    img_adaptor: str = "mlp2x_gelu"
    state_adaptor: str = "mlp3x_gelu"
    lang_pos_embed_config: PosEmbedConfig | None = (("lang", -1024),)
    img_pos_embed_config: PosEmbedConfig | None = (("image", (2, 3, -729)),)
    cond_pos_embed_type: str = "multimodal"
    noise_scheduler: NoiseSchedulerConfig = NoiseSchedulerConfig()
    ema: EmaConfig = EmaConfig()
    # --- JAX-side options (not part of the official file) ---
    norm_form: NormForm = "timm_var"
    norm_eps: float = 1e-6
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    attention_impl: AttentionImpl = "xla"
    remat: RematPolicy = "none"
    # "stacked": blocks stored with a leading layer axis and run by lax.scan (compile time flat in
    # depth; training). "per_layer": one parameter set per block, run by a Python loop. XLA:CPU copies
    # each scanned layer's weights out of the stack on every iteration (and the condition K/V too),
    # which is half of a denoising step on CPU; the runner uses "per_layer" there.
    layer_layout: LayerLayout = "stacked"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.norm_form not in ("timm_var", "rms"):
            raise ValueError(f"norm_form must be 'timm_var' or 'rms', got {self.norm_form!r}")
        if self.hidden_size % 2:
            raise ValueError(f"hidden_size must be even for the sin-cos tables, got {self.hidden_size}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        for name in ("lang_adaptor", "img_adaptor", "state_adaptor"):
            adaptor_depth(getattr(self, name))  # validates the spec string
        if self.attention_impl not in ("xla", "cudnn", "pallas", "reference"):
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}")
        if self.layer_layout not in ("stacked", "per_layer"):
            raise ValueError(f"layer_layout must be 'stacked' or 'per_layer', got {self.layer_layout!r}")
        if self.remat not in get_args(RematPolicy):
            raise ValueError(f"unknown remat policy {self.remat!r}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")

    # ---- derived sizes ----
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def x_seq_len(self) -> int:
        """Denoiser sequence: timestep, frequency, state, then ``pred_horizon`` actions."""
        return self.pred_horizon + 3

    @property
    def num_lang_blocks(self) -> int:
        return (self.depth + 1) // 2

    @property
    def num_img_blocks(self) -> int:
        return self.depth // 2

    @property
    def jnp_param_dtype(self) -> Any:
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    def replace(self, **changes: Any) -> RDTConfig:
        return dataclasses.replace(self, **changes)

    # ---- official schema ----
    @classmethod
    def from_official(cls, cfg: Mapping[str, Any], **overrides: Any) -> RDTConfig:
        """Build from the official ``config.json`` dict of a release (rdt-1b / rdt-170m: flat sizes with nested
        ``rdt``, ``noise_scheduler`` and ``ema`` blocks). The training yaml's ``model`` section lacks the sizes
        (``action_dim``, ``pred_horizon``, ...) that the training script adds from the rest of the yaml."""
        try:
            rdt = cfg["rdt"]
            kwargs: dict[str, Any] = dict(
                hidden_size=int(rdt["hidden_size"]),
                depth=int(rdt["depth"]),
                num_heads=int(rdt["num_heads"]),
                cond_pos_embed_type=str(rdt.get("cond_pos_embed_type", "multimodal")),
                action_dim=int(cfg["action_dim"]),
                pred_horizon=int(cfg["pred_horizon"]),
                lang_token_dim=int(cfg["lang_token_dim"]),
                img_token_dim=int(cfg["img_token_dim"]),
                state_token_dim=int(cfg["state_token_dim"]),
                max_lang_cond_len=int(cfg["max_lang_cond_len"]),
                img_cond_len=int(cfg["img_cond_len"]),
                lang_adaptor=str(cfg["lang_adaptor"]),
                img_adaptor=str(cfg["img_adaptor"]),
                state_adaptor=str(cfg["state_adaptor"]),
                lang_pos_embed_config=_pos_cfg_from_json(cfg.get("lang_pos_embed_config")),
                img_pos_embed_config=_pos_cfg_from_json(cfg.get("img_pos_embed_config")),
            )
        except KeyError as e:
            raise KeyError(f"official RDT config is missing key {e.args[0]!r}") from None
        if "noise_scheduler" in cfg:
            ns = cfg["noise_scheduler"]
            known = {f.name for f in dataclasses.fields(NoiseSchedulerConfig)}
            kwargs["noise_scheduler"] = NoiseSchedulerConfig(**{k: v for k, v in ns.items() if k in known})
        if "ema" in cfg:
            known = {f.name for f in dataclasses.fields(EmaConfig)}
            kwargs["ema"] = EmaConfig(**{k: v for k, v in cfg["ema"].items() if k in known})
        jax_opts = cfg.get("rdt_jax", {})
        for key in ("norm_form", "norm_eps"):
            if key in jax_opts:
                kwargs[key] = jax_opts[key]
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_official(self) -> dict[str, Any]:
        """The official flat schema; ``rdt_jax`` holds options the official code does not know."""
        return {
            "action_dim": self.action_dim,
            "ema": dataclasses.asdict(self.ema),
            "img_adaptor": self.img_adaptor,
            "img_cond_len": self.img_cond_len,
            "img_pos_embed_config": _pos_cfg_to_json(self.img_pos_embed_config),
            "img_token_dim": self.img_token_dim,
            "lang_adaptor": self.lang_adaptor,
            "lang_pos_embed_config": _pos_cfg_to_json(self.lang_pos_embed_config),
            "lang_token_dim": self.lang_token_dim,
            "max_lang_cond_len": self.max_lang_cond_len,
            "noise_scheduler": dataclasses.asdict(self.noise_scheduler),
            "pred_horizon": self.pred_horizon,
            "rdt": {
                "cond_pos_embed_type": self.cond_pos_embed_type,
                "depth": self.depth,
                "hidden_size": self.hidden_size,
                "num_heads": self.num_heads,
            },
            "state_adaptor": self.state_adaptor,
            "state_token_dim": self.state_token_dim,
            "rdt_jax": {"norm_form": self.norm_form, "norm_eps": self.norm_eps},
        }

    @classmethod
    def from_json_file(cls, path: str | pathlib.Path, **overrides: Any) -> RDTConfig:
        path = pathlib.Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read RDT config {path}: {e}") from e
        try:
            return cls.from_official(data, **overrides)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    def save_json(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(json.dumps(self.to_official(), indent=2, sort_keys=True) + "\n")


def adaptor_depth(spec: str) -> int:
    """Number of Linear layers of an adaptor spec: ``linear`` -> 1, ``mlp{k}x_gelu`` -> k."""
    if spec == "linear":
        return 1
    m = _ADAPTOR_RE.match(spec)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"unknown adaptor spec {spec!r}; expected 'linear' or 'mlp<k>x_gelu'")
    return int(m.group(1))


def _pos_cfg_from_json(raw: Sequence[Any] | None) -> PosEmbedConfig | None:
    if raw is None:
        return None
    out = []
    for item in raw:
        name, length = item
        out.append((str(name), tuple(int(g) for g in length) if isinstance(length, (list, tuple)) else int(length)))
    return tuple(out)


def _pos_cfg_to_json(cfg: PosEmbedConfig | None) -> list[Any] | None:
    if cfg is None:
        return None
    return [[name, list(length) if isinstance(length, tuple) else length] for name, length in cfg]


def rdt_1b(**overrides: Any) -> RDTConfig:
    """The released robotics-diffusion-transformer/rdt-1b configuration."""
    return RDTConfig(**overrides)


def rdt_170m(**overrides: Any) -> RDTConfig:
    """The released robotics-diffusion-transformer/rdt-170m configuration."""
    return RDTConfig(hidden_size=1024, depth=14, num_heads=32, **overrides)


PRESETS = {"rdt-1b": rdt_1b, "rdt-170m": rdt_170m}
