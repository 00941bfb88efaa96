"""Analytic matmul FLOP counts (1 multiply-add = 2 FLOPs), as in MODEL.md §10.

Norms, softmax, activations and residual adds (< 1 %) are not counted. Used by the benchmarks to
report achieved GFLOP/s, and to see where the work goes before optimising.
"""

from __future__ import annotations

import dataclasses

from rdt_jax.model.config import RDTConfig, adaptor_depth


def _adaptor(spec: str, tokens: int, din: int, d: int) -> float:
    k = adaptor_depth(spec)
    return 2.0 * tokens * (din * d + (k - 1) * d * d)


@dataclasses.dataclass(frozen=True)
class FlopCount:
    lang_adaptor: float
    img_adaptor: float
    state_adaptor: float
    cond_kv: float  # cross-attention K/V projections of all blocks (condition-only work)
    denoiser_rest: float  # everything else in the denoiser, summed over its evaluations

    @property
    def total(self) -> float:
        return self.lang_adaptor + self.img_adaptor + self.state_adaptor + self.cond_kv + self.denoiser_rest


def denoiser_flops(cfg: RDTConfig, lang_len: int, *, include_cond_kv: bool = True) -> tuple[float, float]:
    """(condition K/V FLOPs, all other FLOPs) of one denoiser forward, batch 1."""
    d, n, img = cfg.hidden_size, cfg.x_seq_len, cfg.img_cond_len
    common = 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 2 * n * d * d + 2 * n * d * d + 4 * n * d * d
    rest = 0.0
    kv = 0.0
    for i in range(cfg.depth):
        cond_len = lang_len if i % 2 == 0 else img
        rest += common + 4 * n * cond_len * d
        kv += 2 * cond_len * d * 2 * d
    rest += 2 * (2 * 256 * d + 2 * d * d)  # timestep + frequency embedders
    rest += 2 * n * d * d + 2 * n * d * cfg.action_dim  # final layer
    return (kv if include_cond_kv else 0.0), rest


def predict_action_flops(cfg: RDTConfig, lang_len: int, num_steps: int | None = None, *,
                         cached: bool = True, batch: int = 1) -> FlopCount:
    steps = cfg.noise_scheduler.num_inference_timesteps if num_steps is None else num_steps
    kv, rest = denoiser_flops(cfg, lang_len)
    s_in = 2 * cfg.state_token_dim
    return FlopCount(
        lang_adaptor=batch * _adaptor(cfg.lang_adaptor, lang_len, cfg.lang_token_dim, cfg.hidden_size),
        img_adaptor=batch * _adaptor(cfg.img_adaptor, cfg.img_cond_len, cfg.img_token_dim, cfg.hidden_size),
        state_adaptor=batch * (1 + steps * cfg.pred_horizon) * _adaptor(cfg.state_adaptor, 1, s_in, cfg.hidden_size),
        cond_kv=batch * kv * (1 if cached else steps),
        denoiser_rest=batch * rest * steps,
    )


def train_step_flops(cfg: RDTConfig, lang_len: int, batch: int = 1) -> float:
    """Forward + backward ~ 3x the forward of compute_loss (remat adds up to one more forward)."""
    kv, rest = denoiser_flops(cfg, lang_len)
    s_in = 2 * cfg.state_token_dim
    fwd = (_adaptor(cfg.lang_adaptor, lang_len, cfg.lang_token_dim, cfg.hidden_size)
           + _adaptor(cfg.img_adaptor, cfg.img_cond_len, cfg.img_token_dim, cfg.hidden_size)
           + (cfg.pred_horizon + 1) * _adaptor(cfg.state_adaptor, 1, s_in, cfg.hidden_size) + kv + rest)
    return 3.0 * batch * fwd
