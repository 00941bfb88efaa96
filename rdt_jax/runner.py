"""``RDTRunner``: the user-facing API, named like the official ``RDTRunner`` so code ports directly.

It owns an :class:`~rdt_jax.model.RDTPolicy` and exposes jitted ``model`` (the denoiser),
``compute_loss`` and ``predict_action``. Randomness is explicit: pass ``rng`` (a JAX key) or the
noise / timesteps themselves.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rdt_jax import host_memory
from rdt_jax.checks import check_index_range, check_key_mask
from rdt_jax.convert.pretrained_dir import read_config, read_params, stored_dtype
from rdt_jax.model.config import RDTConfig
from rdt_jax.model.layer_layout import stack_blocks, unstack_blocks
from rdt_jax.model.policy import RDTPolicy, init_policy


def abstract_policy(cfg: RDTConfig) -> RDTPolicy:
    """The policy's structure with ShapeDtypeStruct leaves: no memory, no compute."""
    return nnx.eval_shape(lambda: RDTPolicy(cfg, rngs=nnx.Rngs(0)))


# Module-level jitted entry points with the graph definition as a static argument: runners of the
# same architecture (e.g. the same checkpoint loaded twice, or EMA and raw weights) share compiled code.
@functools.partial(jax.jit, static_argnames=("graphdef", "capture"))
def _denoise(graphdef, state, *args, capture=False):
    return nnx.merge(graphdef, state).model(*args, capture=capture)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _loss(graphdef, state, *args):
    return nnx.merge(graphdef, state).compute_loss(*args)


def _sample_fn(graphdef, state, *args, num_steps=None, cache_cond_kv=True, capture=False):
    return nnx.merge(graphdef, state).predict_action(
        *args, num_steps=num_steps, cache_cond_kv=cache_cond_kv, capture=capture
    )


# XLA:CPU computes 16-bit dots in float32. With 16-bit weights, its loop-invariant code motion then
# hoists the weights' convert out of the denoising and layer loops and materialises every layer in
# float32 at once: rdt-1b with bf16 weights peaked at 8.4 GB and ran 1.7x slower (rdt-170m) than
# with the pass off (4.2 GB). With float32 weights the pass helps (~8 %), so it stays on there.
CPU_16BIT_WEIGHT_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
# XLA:CPU's default scheduler orders for concurrency: it ran every image block's K/V projection before
# rounding any of them (rdt-170m: 272 MB of temporaries, more than the rest of the policy's working
# set). The memory-optimised one keeps them to 153 MB at the same speed.
CPU_SAMPLING_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}

_SAMPLE_STATIC = ("graphdef", "num_steps", "cache_cond_kv", "capture")


def sampling_compiler_options(state: Any) -> dict[str, str]:
    """XLA options for compiling sampling with these weights on the default backend."""
    if jax.default_backend() != "cpu":
        return {}
    sixteen = any(jnp.dtype(x.dtype).itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating)
                  for x in jax.tree.leaves(state))
    return {**CPU_SAMPLING_OPTIONS, **(CPU_16BIT_WEIGHT_OPTIONS if sixteen else {})}


@functools.cache
def _sampler(options: tuple[tuple[str, str], ...]) -> Any:
    # One jitted sampler per option set (module-level, so runners of one architecture share compiled code).
    return jax.jit(_sample_fn, static_argnames=_SAMPLE_STATIC, compiler_options=dict(options) or None)


def sampler_for(state: Any) -> Any:
    """The jitted sampling function, compiled with :func:`sampling_compiler_options` for ``state``."""
    return _sampler(tuple(sorted(sampling_compiler_options(state).items())))


def _sample(graphdef, state, *args, **kwargs):
    return sampler_for(state)(graphdef, state, *args, **kwargs)


def resolve_layer_layout(layer_layout: str) -> str:
    """``auto``: per-layer blocks on CPU (XLA:CPU copies scanned layers' weights every step), stacked elsewhere."""
    if layer_layout == "auto":
        return "per_layer" if jax.default_backend() == "cpu" else "stacked"
    if layer_layout not in ("stacked", "per_layer"):
        raise ValueError(f"layer_layout must be 'auto', 'stacked' or 'per_layer', got {layer_layout!r}")
    return layer_layout


def _keep_host_memory_small() -> None:
    # On CPU the weights and activations are host memory: see rdt_jax/host_memory.py.
    if jax.default_backend() == "cpu":
        host_memory.trim_heap_after_compiles()


def _policy_from_params(cfg: RDTConfig, params: dict, layer_layout: str) -> RDTPolicy:
    """A policy holding ``params`` (a stacked-layout pure dict, consumed) in the given layer layout."""
    if layer_layout == "per_layer":
        params = unstack_blocks(params)
    cfg = cfg.replace(layer_layout=layer_layout)
    graphdef, state = nnx.split(abstract_policy(cfg))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


class RDTRunner:
    def __init__(self, policy: RDTPolicy):
        self.config: RDTConfig = policy.config
        self.graphdef, self.state = nnx.split(policy)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: RDTConfig, *, seed: int = 0, layer_layout: str = "auto") -> RDTRunner:
        """A randomly initialised model with the official initialisation (same values in either layout)."""
        layer_layout = resolve_layer_layout(layer_layout)
        _keep_host_memory_small()
        stacked_cfg = cfg.replace(layer_layout="stacked")
        # Initialised stacked, then split layer by layer: the stacked initialiser draws one layer at a
        # time (lax.map), where a per-layer program keeps every layer's random bits alive at once.
        state = nnx.state(init_policy(stacked_cfg, seed))
        params = nnx.to_pure_dict(state)
        del state
        runner = cls(_policy_from_params(stacked_cfg, params, layer_layout))
        host_memory.trim_heap()
        return runner

    @property
    def policy(self) -> RDTPolicy:
        return nnx.merge(self.graphdef, self.state)

    @property
    def params(self) -> nnx.State:
        return nnx.state(self.policy, nnx.Param)

    def param_dict(self) -> dict[str, Any]:
        """The parameters as a pure dict in the stacked (checkpoint / converter) layout."""
        params = nnx.to_pure_dict(self.params)
        return stack_blocks(params) if self.config.layer_layout == "per_layer" else params

    def _check_mask(self, name: str, mask: Any) -> None:
        # Inside the jitted calls the mask is traced: checked here, on the caller's concrete array.
        check_key_mask(name, mask, right_padded=self.config.attention_impl == "cudnn")

    # ------------------------------------------------------------------ API
    def model(self, x, freq, t, lang_c, img_c, lang_mask=None, img_mask=None, *, capture: bool = False):
        """The RDT denoiser: ``x`` (B, horizon+1, D) -> (B, horizon, action_dim); masks as the official
        ``RDT.forward``'s (True = attend)."""
        self._check_mask("lang_mask", lang_mask)
        self._check_mask("img_mask", img_mask)
        return _denoise(self.graphdef, self.state, x, freq, t, lang_c, img_c, lang_mask, img_mask, capture=capture)

    def compute_loss(
        self, lang_tokens, lang_attn_mask, img_tokens, state_tokens, action_gt, action_mask, ctrl_freqs,
        *, rng: jax.Array | None = None, noise: jax.Array | None = None, timesteps: jax.Array | None = None,
    ) -> jax.Array:
        """Diffusion training loss; ``noise``/``timesteps`` given are used as-is, missing ones drawn from ``rng``."""
        if noise is None or timesteps is None:
            if rng is None:
                raise ValueError("compute_loss needs rng=jax.random.key(...) unless both noise and timesteps are given")
            k_noise, k_t = jax.random.split(rng)
            if noise is None:
                noise = jax.random.normal(k_noise, jnp.shape(action_gt), jnp.float32).astype(
                    jnp.asarray(action_gt).dtype
                )
            if timesteps is None:
                timesteps = jax.random.randint(
                    k_t, (jnp.shape(action_gt)[0],), 0, self.config.noise_scheduler.num_train_timesteps
                )
        else:  # under jit an out-of-range step would index the noise tables clamped (PyTorch raises)
            timesteps = check_index_range("timesteps", timesteps, self.config.noise_scheduler.num_train_timesteps)
        self._check_mask("lang_attn_mask", lang_attn_mask)
        return _loss(self.graphdef, self.state, lang_tokens, lang_attn_mask, img_tokens, state_tokens, action_gt,
                          action_mask, ctrl_freqs, noise, timesteps)

    def predict_action(
        self, lang_tokens, lang_attn_mask, img_tokens, state_tokens, action_mask, ctrl_freqs,
        *, rng: jax.Array | None = None, noise: jax.Array | None = None, num_steps: int | None = None,
        cache_cond_kv: bool = True, capture: bool = False,
    ):
        """(B, horizon, action_dim) actions, zero where ``action_mask`` is 0; ``noise`` is the initial sample."""
        if noise is None:
            if rng is None:
                raise ValueError("predict_action needs rng=jax.random.key(...) or an explicit initial noise")
            b = jnp.shape(state_tokens)[0]
            noise = jax.random.normal(rng, (b, self.config.pred_horizon, self.config.action_dim), jnp.float32)
        self._check_mask("lang_attn_mask", lang_attn_mask)
        return _sample(self.graphdef, self.state, lang_tokens, lang_attn_mask, img_tokens, state_tokens, action_mask,
                            ctrl_freqs, noise, num_steps=num_steps, cache_cond_kv=cache_cond_kv, capture=capture)


def load_pretrained(
    path: str | pathlib.Path,
    dtype: Any = None,
    *,
    compute_dtype: Any | None = None,
    layer_layout: str = "auto",
    **config_overrides: Any,
) -> RDTRunner:
    """Loads a directory written by ``convert_torch_weights.py`` (or exported by training).

    ``dtype`` is the parameter dtype (default: the dtype the directory stores, e.g. bfloat16 after
    ``convert_torch_weights.py --dtype bfloat16``); computation runs in ``compute_dtype`` (default: ``dtype``).
    ``layer_layout`` (``auto``, ``stacked``, ``per_layer``) only changes how blocks are stored and
    run (``RDTConfig.layer_layout``), never the results.
    """
    if dtype is None:
        dtype = stored_dtype(path)
        if compute_dtype is None and jnp.dtype(dtype) == jnp.float16 and jax.default_backend() == "cpu":
            compute_dtype = "float32"  # float16 storage is fine; float16 compute is not (below)
    if jnp.dtype(compute_dtype or dtype) == jnp.float16 and jax.default_backend() == "cpu":
        # float16 weights with another compute dtype are fine.
        raise ValueError("float16 compute is not supported on CPU (XLA:CPU has no float16 x float16 -> float32 "
                         "products); use compute_dtype='bfloat16' or 'float32'")
    _keep_host_memory_small()
    param_dtype = jnp.dtype(dtype).name
    cfg = read_config(path, param_dtype=param_dtype, dtype=jnp.dtype(compute_dtype or dtype).name,
                      **config_overrides).replace(layer_layout="stacked")
    params_abstract = nnx.to_pure_dict(nnx.state(abstract_policy(cfg), nnx.Param))
    params = read_params(path, params_abstract)
    runner = RDTRunner(_policy_from_params(cfg, params, resolve_layer_layout(layer_layout)))
    host_memory.trim_heap()
    return runner
