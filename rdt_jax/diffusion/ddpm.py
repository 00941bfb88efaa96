"""The ``squaredcos_cap_v2`` DDPM schedule and the forward (noising) process (DIFFUSION.md §1-2)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def squaredcos_cap_v2_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide cosine betas, computed in float64 and stored as float32 (as diffusers does)."""

    def abar(tau: float) -> float:
        return math.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def _cumprod_like_torch(alphas: np.ndarray) -> np.ndarray:
    # torch.cumprod on a CPU float32 tensor accumulates in double and rounds each output to float32.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class DDPMSchedule:
    betas: np.ndarray
    alphas_cumprod: np.ndarray

    @classmethod
    @functools.cache
    def create(cls, num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2") -> DDPMSchedule:
        if beta_schedule != "squaredcos_cap_v2":
            raise ValueError(f"unsupported beta_schedule {beta_schedule!r}; RDT uses 'squaredcos_cap_v2'")
        betas = squaredcos_cap_v2_betas(num_train_timesteps)
        alphas = (np.float32(1.0) - betas).astype(np.float32)
        return cls(betas=betas, alphas_cumprod=_cumprod_like_torch(alphas))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])


def add_noise(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; abar is cast to the sample dtype first, like diffusers."""
    acp = jnp.asarray(alphas_cumprod).astype(x0.dtype)[timesteps]
    acp = acp.reshape(acp.shape + (1,) * (x0.ndim - 1))
    return jnp.sqrt(acp) * x0 + jnp.sqrt(1 - acp) * noise.astype(x0.dtype)
