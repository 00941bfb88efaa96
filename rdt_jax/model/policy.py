"""``RDTPolicy``: the three condition adaptors + the denoiser + the diffusion recipes (``RDTRunner``).

Everything here is a pure function of the parameters and its inputs (randomness is passed in as
``noise``/``timesteps``), so it can be jitted, differentiated and sharded by the caller.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rdt_jax.checks import check_key_mask
from rdt_jax.diffusion import DDPMSchedule, add_noise, dpm_solver_plan
from rdt_jax.model.config import RDTConfig
from rdt_jax.model.layers import Adaptor
from rdt_jax.model.rdt import RDT


def _check(name: str, x: Any, shape: tuple[int | None, ...]) -> None:
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape, strict=True)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")


# What the network predicts: the clean action chunk (every released RDT config), or the noise (the official
# code's other branch, DIFFUSION.md §3).
PREDICTION_TYPES = ("sample", "epsilon")


class RDTPolicy(nnx.Module):
    def __init__(self, cfg: RDTConfig, *, rngs: nnx.Rngs):
        if cfg.state_token_dim != cfg.action_dim:
            raise ValueError(
                f"state_token_dim ({cfg.state_token_dim}) must equal action_dim ({cfg.action_dim}): "
                "state and action tokens share the state adaptor"
            )
        self.config = cfg
        kw = dict(rngs=rngs, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype)
        self.model = RDT(cfg, rngs=rngs)
        self.lang_adaptor = Adaptor(cfg.lang_adaptor, cfg.lang_token_dim, cfg.hidden_size, **kw)
        self.img_adaptor = Adaptor(cfg.img_adaptor, cfg.img_token_dim, cfg.hidden_size, **kw)
        self.state_adaptor = Adaptor(cfg.state_adaptor, 2 * cfg.state_token_dim, cfg.hidden_size, **kw)
        if cfg.noise_scheduler.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"noise_scheduler.prediction_type {cfg.noise_scheduler.prediction_type!r} is not "
                             f"one of {PREDICTION_TYPES} (RDT's configs use 'sample')")

    @property
    def alphas_cumprod(self) -> np.ndarray:
        # A constant of the config, not a Variable: it never trains and never goes into checkpoints.
        ns = self.config.noise_scheduler
        return DDPMSchedule.create(ns.num_train_timesteps, ns.beta_schedule).alphas_cumprod

    # ------------------------------------------------------------------ shared pieces
    def adapt_conditions(self, lang_tokens: jax.Array, img_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        _check("lang_tokens", lang_tokens, (None, None, cfg.lang_token_dim))
        _check("img_tokens", img_tokens, (lang_tokens.shape[0], cfg.img_cond_len, cfg.img_token_dim))
        return self.lang_adaptor(lang_tokens), self.img_adaptor(img_tokens)

    def adapt_state_action(self, tokens: jax.Array, action_mask: jax.Array) -> jax.Array:
        """Appends the 0/1 mask to every token's value vector and runs the state adaptor."""
        mask = jnp.broadcast_to(action_mask, tokens.shape[:-1] + action_mask.shape[-1:])
        return self.state_adaptor(jnp.concatenate([tokens, mask.astype(tokens.dtype)], axis=-1))

    def _check_common(self, lang_attn_mask, state_tokens, action_mask, ctrl_freqs, lang_tokens) -> None:
        cfg = self.config
        b = lang_tokens.shape[0]
        if lang_attn_mask is not None:
            _check("lang_attn_mask", lang_attn_mask, (b, lang_tokens.shape[1]))
            check_key_mask("lang_attn_mask", lang_attn_mask, right_padded=cfg.attention_impl == "cudnn")
        _check("state_tokens", state_tokens, (b, 1, cfg.state_token_dim))
        _check("action_mask", action_mask, (b, 1, cfg.action_dim))
        _check("ctrl_freqs", jnp.asarray(ctrl_freqs), (b,))

    # ------------------------------------------------------------------ training
    def compute_loss(
        self,
        lang_tokens: jax.Array,
        lang_attn_mask: jax.Array | None,
        img_tokens: jax.Array,
        state_tokens: jax.Array,
        action_gt: jax.Array,
        action_mask: jax.Array,
        ctrl_freqs: jax.Array,
        noise: jax.Array,
        timesteps: jax.Array,
        *,
        grad_sq: jax.Array | None = None,
    ) -> jax.Array:
        """Unmasked MSE between the prediction and its target, the clean action chunk (or the noise, for
        ``prediction_type="epsilon"``; DIFFUSION.md §3), in float32. ``grad_sq``: see ``RDT.__call__``."""
        cfg = self.config
        self._check_common(lang_attn_mask, state_tokens, action_mask, ctrl_freqs, lang_tokens)
        b = lang_tokens.shape[0]
        _check("action_gt", action_gt, (b, cfg.pred_horizon, cfg.action_dim))
        _check("noise", noise, (b, cfg.pred_horizon, cfg.action_dim))
        _check("timesteps", jnp.asarray(timesteps), (b,))
        noisy = add_noise(self.alphas_cumprod, action_gt, noise, timesteps)
        traj = jnp.concatenate([state_tokens.astype(noisy.dtype), noisy], axis=1)
        lang_c, img_c = self.adapt_conditions(lang_tokens, img_tokens)
        x = self.adapt_state_action(traj, action_mask)
        pred = self.model(x, ctrl_freqs, timesteps, lang_c, img_c, lang_attn_mask, grad_sq=grad_sq)
        target = noise if cfg.noise_scheduler.prediction_type == "epsilon" else action_gt
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))

    # ------------------------------------------------------------------ sampling
    def predict_action(
        self,
        lang_tokens: jax.Array,
        lang_attn_mask: jax.Array | None,
        img_tokens: jax.Array,
        state_tokens: jax.Array,
        action_mask: jax.Array,
        ctrl_freqs: jax.Array,
        noise: jax.Array,
        *,
        num_steps: int | None = None,
        cache_cond_kv: bool = True,
        capture: bool = False,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """DPM-Solver++ sampling from ``noise``; returns (B, horizon, action_dim) multiplied by the mask.

        Adaptors run once per call; with ``cache_cond_kv`` every block's condition K/V too, so each
        denoising step only does the work that depends on the noisy actions.
        """
        cfg = self.config
        self._check_common(lang_attn_mask, state_tokens, action_mask, ctrl_freqs, lang_tokens)
        b = lang_tokens.shape[0]
        _check("noise", noise, (b, cfg.pred_horizon, cfg.action_dim))
        steps = cfg.noise_scheduler.num_inference_timesteps if num_steps is None else num_steps
        plan = dpm_solver_plan(self.alphas_cumprod, steps)

        lang_c, img_c = self.adapt_conditions(lang_tokens, img_tokens)
        state_traj = self.adapt_state_action(state_tokens, action_mask)
        cond_kv = self.model.precompute_cond_kv(lang_c, img_c) if cache_cond_kv else None
        mask = jnp.broadcast_to(action_mask, noise.shape).astype(jnp.float32)

        predicts_noise = cfg.noise_scheduler.prediction_type == "epsilon"

        def step(carry, consts):
            x, m_prev = carry
            t, coef_sample, coef_model, inv_r0, alpha_t, sigma_t = consts
            seq = jnp.concatenate([state_traj, self.adapt_state_action(x.astype(cfg.jnp_dtype), action_mask)], 1)
            if cond_kv is None:
                out = self.model(seq, ctrl_freqs, t[None], lang_c, img_c, lang_attn_mask)
            else:
                out = self.model(seq, ctrl_freqs, t[None], lang_mask=lang_attn_mask, cond_kv=cond_kv)
            out32 = out.astype(jnp.float32)
            m32 = (x - sigma_t * out32) / alpha_t if predicts_noise else out32  # the data prediction
            d1 = inv_r0 * (m32 - m_prev)
            x_next = coef_sample * x - coef_model * m32 - 0.5 * coef_model * d1
            trace = (seq, x, out32, x_next) if capture else None
            return (x_next, m32), trace

        consts = tuple(
            jnp.asarray(a)
            for a in (plan.timesteps.astype(np.int32), plan.coef_sample, plan.coef_model, plan.inv_r0,
                      plan.alpha_t, plan.sigma_t)
        )
        x0 = noise.astype(jnp.float32)
        (x, _), trace = jax.lax.scan(step, (x0, jnp.zeros_like(x0)), consts)
        actions = x * mask
        if not capture:
            return actions
        return actions, {
            "lang_cond": lang_c, "img_cond": img_c, "state_traj": state_traj,
            "timesteps": consts[0], "step_model_input": trace[0], "step_sample_in": trace[1],
            "step_model_output": trace[2], "step_prev_sample": trace[3],
        }


def init_policy(cfg: RDTConfig, seed: int = 0) -> RDTPolicy:
    """A randomly initialised policy, built in one compiled program.

    Equivalent to ``RDTPolicy(cfg, rngs=nnx.Rngs(seed))`` but without op-by-op dispatch, which is
    slow on CPU and leaves large temporaries around for the full-size models.
    """
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: RDTPolicy(cfg, rngs=nnx.Rngs(0))))
    # Compiled afresh and dropped after use: keeping the executable cached held 0.1 GiB of host
    # memory for rdt-170m, for a program a process normally runs once.
    init = jax.jit(lambda key: nnx.split(RDTPolicy(cfg, rngs=nnx.Rngs(key)))[1])
    return nnx.merge(graphdef, init(jax.random.key(seed)))
