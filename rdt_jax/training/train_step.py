"""The train state, its shardings, and the jitted train / sample steps.

The train state is a plain pytree (what Orbax saves)::

    {"step": int32, "params": {...}, "opt_state": optax state, "ema": {...} float32, "rng": uint32[2]}

Randomness is a pure function of (rng, step): step ``s`` draws its noise and timesteps from
``fold_in(rng, s)``. With JAX's partitionable threefry the draws do not depend on the mesh, so any
mesh shape, and any resume point, sees the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from rdt_jax.model.block_scan import sum_of_squares
from rdt_jax.model.config import PRESETS as MODEL_PRESETS
from rdt_jax.model.config import EmaConfig, RDTConfig
from rdt_jax.model.layer_layout import is_per_layer, to_layer_layout
from rdt_jax.model.policy import RDTPolicy
from rdt_jax.model.rdt import grad_outside_scan
from rdt_jax.runner import abstract_policy, resolve_layer_layout
from rdt_jax.training import ema as ema_lib
from rdt_jax.training.config import ConfigError, ImageEncoderConfig, ModelConfig
from rdt_jax.training.sharding import batch_sharding, replicated, tree_shardings

# Batch entries the train step reads (the data pipeline also carries state_norm, image_valid,
# data_indices for validation). Either "images" (encoded in the step) or "img_tokens".
STEP_KEYS = ("lang_embeds", "lang_attn_mask", "states", "actions", "state_elem_mask", "ctrl_freqs")


# ------------------------------------------------------------------ model + image encoder
@functools.lru_cache(maxsize=8)
def _abstract_policy(rcfg: RDTConfig) -> RDTPolicy:
    # Cached: building it traces the whole model (~1 s on a CPU), and the loop, the train step and the
    # sample step all need it. Only read (graphdef / state), never modified.
    return abstract_policy(rcfg)


def model_graphdef(rcfg: RDTConfig) -> Any:
    return nnx.graphdef(_abstract_policy(rcfg))


def abstract_params(rcfg: RDTConfig) -> dict:
    """The parameters as a pure dict of ShapeDtypeStructs."""
    return nnx.state(_abstract_policy(rcfg), nnx.Param).to_pure_dict()


def rdt_config(m: ModelConfig, *, img_cond_len: int, max_lang_len: int) -> RDTConfig:
    """The RDTConfig of a run. ``tiny`` shrinks the condition tables to what the data produces."""
    kw: dict[str, Any] = dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat)
    for name in ("hidden_size", "depth", "num_heads"):
        if getattr(m, name) is not None:
            kw[name] = getattr(m, name)
    if m.init_from is not None:
        from rdt_jax.convert.pretrained_dir import read_config

        # The architecture is the checkpoint's (the preset's is not used); explicit sizes must agree with it.
        rcfg = read_config(m.init_from, param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat)
        asked = {name: getattr(m, name) for name in ("hidden_size", "depth", "num_heads", "pred_horizon")}
        clash = {k: (v, getattr(rcfg, k)) for k, v in asked.items() if v is not None and v != getattr(rcfg, k)}
        if clash:
            raise ConfigError(f"--init-from {m.init_from} holds a model with "
                             + ", ".join(f"{k} {have} (asked: {want})" for k, (want, have) in clash.items())
                             + "; drop those --model options (or set them to None) to train the checkpoint's model")
        return rcfg
    if m.preset == "tiny":
        n_img = img_cond_len // 6
        kw.update(pred_horizon=m.pred_horizon or 64, img_cond_len=img_cond_len, max_lang_cond_len=max_lang_len,
                  lang_pos_embed_config=(("lang", -max_lang_len),),
                  img_pos_embed_config=(("image", (2, 3, -n_img)),))
        return RDTConfig(**kw)
    return MODEL_PRESETS[m.preset](**kw)


@dataclasses.dataclass
class ImageEncoder:
    """Frozen image encoder: ``encode(params, images) -> (B, 6*patches, D)``; ``params`` is never trained."""

    graphdef: Any
    params: Any
    num_tokens_per_image: int
    token_dim: int
    image_size: int

    def encode(self, params: Any, images: jax.Array) -> jax.Array:
        from rdt_jax.encoders.image_encoding import encode_images

        # uint8 pixels from the pipeline are normalised on the device, by encode_images.
        return encode_images(nnx.merge(self.graphdef, params), images, channels_last=False)


def load_exported_image_encoder(export_dir: str | os.PathLike, mesh: Mesh | None = None) -> ImageEncoder:
    """The frozen image encoder a run trained with, from its export's ``image_encoder.json`` (serving must
    encode images with the same tower: the same checkpoint, or the same random tower's seed)."""
    path = pathlib.Path(export_dir) / "image_encoder.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the export of a training run records its image encoder there")
    try:
        spec = json.loads(path.read_text())
        seed = spec.pop("seed", 0)
        cfg = ImageEncoderConfig(**spec)
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, not an object, unknown or bad fields
        raise ValueError(f"{path}: not an image encoder record ({e})") from None
    encoder = make_image_encoder(cfg, seed, mesh)
    if encoder is None:
        raise ValueError(f"{path}: kind {spec.get('kind')!r} has no image encoder (precomputed features)")
    return encoder


def make_image_encoder(cfg: ImageEncoderConfig, seed: int = 0, mesh: Mesh | None = None) -> ImageEncoder | None:
    """The frozen image encoder, its weights laid out over ``mesh`` by SigLIP's logical axis names
    (``SIGLIP_SHARDING_RULES``: the width over ``fsdp``), or on the default device."""
    if cfg.kind == "features":
        return None
    from rdt_jax.encoders.hf_import import make_sharding_fn
    from rdt_jax.encoders.siglip import SIGLIP_SHARDING_RULES, SiglipVisionConfig, SiglipVisionTower, load_siglip

    if cfg.kind == "random_tiny":
        # A randomly initialised, frozen SigLIP with the real code path: debug/demo runs need no download.
        vcfg = SiglipVisionConfig(hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size,
                                  num_hidden_layers=cfg.num_layers, num_attention_heads=2,
                                  image_size=cfg.image_size, patch_size=cfg.patch_size)
        make = lambda: SiglipVisionTower(vcfg, dtype=jnp.dtype(cfg.dtype), rngs=nnx.Rngs(seed + 12345))
        # Initialise under jit: eager initialisation dispatches hundreds of tiny ops (seconds on a CPU).
        abstract = nnx.eval_shape(make)
        graphdef = nnx.graphdef(abstract)
        out_sh = None
        if mesh is not None:
            shard = make_sharding_fn(mesh, SIGLIP_SHARDING_RULES)
            out_sh = jax.tree.map(shard, nnx.state(abstract), is_leaf=lambda x: isinstance(x, nnx.Variable))
        params = jax.jit(lambda: nnx.state(make()), out_shardings=out_sh)()
        return ImageEncoder(graphdef, params, vcfg.num_patches, vcfg.hidden_size, vcfg.image_size)
    elif cfg.kind == "siglip":
        if cfg.path is None:
            raise ConfigError("image_encoder.kind=siglip needs image_encoder.path (a SigLIP so400m checkpoint dir)")
        tower = load_siglip(cfg.path, dtype=jnp.dtype(cfg.dtype), mesh=mesh)
    else:
        raise ValueError(f"unknown image encoder kind {cfg.kind!r}")
    graphdef, params = nnx.split(tower)
    return ImageEncoder(graphdef, params, tower.cfg.num_patches, tower.cfg.hidden_size, tower.cfg.image_size)


# ------------------------------------------------------------------ state
def init_params(rcfg: RDTConfig, seed: int, init_from: str | None = None) -> dict:
    if init_from is not None:
        from rdt_jax.convert.pretrained_dir import read_params

        return read_params(init_from, abstract_params(rcfg))
    # Under jit: one compiled initialiser instead of hundreds of eagerly dispatched ops.
    return jax.jit(lambda: nnx.state(RDTPolicy(rcfg, rngs=nnx.Rngs(seed)), nnx.Param).to_pure_dict())()


def init_state(params: dict, tx: optax.GradientTransformation, seed: int, ema_enabled: bool) -> dict:
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "ema": ema_lib.ema_init(params) if ema_enabled else {},
        "rng": jax.random.PRNGKey(seed + 1),  # raw uint32[2]: checkpointable as a plain array
    }


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    return tree_shardings(abstract_state, mesh)


def shard_state(state: dict, mesh: Mesh) -> dict:
    return jax.device_put(state, state_shardings(state, mesh))


# Module-level so that every checkpoint save reuses one compiled conversion per state shape.
_to_layout = jax.jit(to_layer_layout, static_argnames="per_layer")


def state_in_layout(state: Any, layer_layout: str, shardings: Any = None) -> Any:
    """``state`` (a train state or a parameter dict, concrete or abstract) with its blocks as
    ``layer_layout`` runs them: params, EMA and optimiser moments alike. Checkpoints hold the stacked
    layout, so any run can resume any other. Concrete states are converted under jit (placed as
    ``shardings`` if given) and left unmodified."""
    per_layer = resolve_layer_layout(layer_layout) == "per_layer"
    if is_per_layer(state.get("params", state)) == per_layer:
        return state
    if isinstance(jax.tree.leaves(state)[0], jax.ShapeDtypeStruct):
        return jax.eval_shape(functools.partial(to_layer_layout, per_layer=per_layer), state)
    out = _to_layout(state, per_layer=per_layer)
    return out if shardings is None else jax.device_put(out, shardings)


# ------------------------------------------------------------------ steps
def _to_micro(x: jax.Array, k: int) -> jax.Array:
    # (B, ...) -> (k, B/k, ...): micro-batch j holds samples j, k+j, 2k+j, ... so that the (sharded)
    # leading batch axis stays the micro-batch axis and no resharding is needed.
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def make_train_step(
    rcfg: RDTConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    ema_cfg: EmaConfig,
    mesh: Mesh,
    abstract_state: Any,
    batch_shapes: dict[str, jax.ShapeDtypeStruct],
    encoder: ImageEncoder | None,
    *,
    grad_accum: int = 1,
    ema_enabled: bool = True,
    layer_layout: str = "stacked",
) -> Callable:
    """``step(state, enc_params, batch) -> (state, metrics)``, jitted with explicit shardings; ``state`` is
    donated (its buffers are reused for the new state, so params/moments are never held twice).

    ``layer_layout`` is how the step runs the blocks, and the train state must hold them the same
    way (:func:`state_in_layout`): ``stacked`` scans over layers (compile time flat in depth);
    ``per_layer`` runs a Python loop over per-layer parameters, optimiser moments and EMA, with none
    of XLA:CPU's per-iteration copies of each layer's weights, gradients and saved activations, and
    no per-step slicing of a stack or restacking of its gradients (``auto`` picks it on CPU).
    """
    per_layer = resolve_layer_layout(layer_layout) == "per_layer"
    if is_per_layer(abstract_state["params"]) != per_layer:
        have = "per layer" if is_per_layer(abstract_state["params"]) else "stacked"
        raise ValueError(f"the train state holds its blocks {have} but the step runs them "
                         f"{'per layer' if per_layer else 'stacked'}: convert it with state_in_layout")
    step_cfg = rcfg.replace(layer_layout="per_layer" if per_layer else "stacked")
    graphdef = model_graphdef(step_cfg)
    num_t = rcfg.noise_scheduler.num_train_timesteps
    k = grad_accum

    def micro_loss(params, mb, noise, t, enc_params, grad_sq=None):
        if encoder is not None:
            img = encoder.encode(enc_params, mb["images"])
        else:
            img = mb["img_tokens"]
        img = jax.lax.with_sharding_constraint(img, batch_sharding(mesh, img.ndim))
        policy = nnx.merge(graphdef, params)
        return policy.compute_loss(
            mb["lang_embeds"], mb["lang_attn_mask"], img, mb["states"][:, -1:], mb["actions"],
            mb["state_elem_mask"][:, None, :], mb["ctrl_freqs"], noise, t, grad_sq=grad_sq)

    grad_fn = jax.value_and_grad(micro_loss)
    # The second gradient is the blocks' sum of squares, taken during the backward pass: the norm
    # computed from the finished gradient would have XLA:CPU write all of it out in float32 first.
    grad_and_sq_fn = jax.value_and_grad(micro_loss, argnums=(0, 5))

    def step(state, enc_params, batch):
        params = state["params"]
        b, horizon, adim = batch["actions"].shape
        key = jax.random.fold_in(state["rng"], state["step"])
        k_noise, k_t = jax.random.split(key)
        noise = jax.random.normal(k_noise, (b, horizon, adim), jnp.float32)
        t = jax.random.randint(k_t, (b,), 0, num_t)
        if k == 1:
            loss, (grads, scanned_sq) = grad_and_sq_fn(params, batch, noise, t, enc_params, jnp.zeros((), jnp.float32))
            outside = [g for name, sub in grads.items() if name != "model" for g in jax.tree.leaves(sub)]
            grad_norm = jnp.sqrt(scanned_sq + sum_of_squares(outside + grad_outside_scan(step_cfg, grads["model"])))
        else:
            micro = jax.tree.map(lambda x: _to_micro(x, k), (batch, noise, t))

            def body(acc, xs):
                mb, n, tt = xs
                loss_i, g = grad_fn(params, mb, n, tt, enc_params)
                acc_loss, acc_g = acc
                return (acc_loss + loss_i, jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc_g, g)), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
            # Equal-size micro-batches: the mean of their means is the mean over the whole batch.
            loss = loss / k
            grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), grads, params)
            grad_norm = optax.tree.norm(grads)
        updates, opt_state = optax.with_extra_args_support(tx).update(grads, state["opt_state"], params,
                                                                      global_norm=grad_norm)
        new_params = optax.apply_updates(params, updates)
        new_ema = (ema_lib.ema_update_accumulated(ema_cfg, state["ema"], params, new_params, state["step"], k)
                   if ema_enabled else {})
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state,
                     "ema": new_ema, "rng": state["rng"]}
        # As the official log: the learning rate after the scheduler's step, i.e. the next update's.
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"] + 1)}
        return new_state, metrics

    st_sh = state_shardings(abstract_state, mesh)
    # The encoder's weights keep the layout they were placed in (SigLIP's logical axis rules).
    enc_sh = jax.tree.map(lambda x: x.sharding, encoder.params) if encoder is not None else None
    b_sh = {name: batch_sharding(mesh, len(s.shape)) for name, s in batch_shapes.items()}
    return jax.jit(step, in_shardings=(st_sh, enc_sh, b_sh), out_shardings=(st_sh, replicated(mesh)),
                   donate_argnums=(0,))


def make_sample_step(rcfg: RDTConfig, mesh: Mesh, encoder: ImageEncoder | None, num_steps: int | None,
                     layer_layout: str = "stacked") -> Callable:
    """``sample(params, enc_params, batch, noise) -> actions`` (DPM-Solver++, as the official validation);
    ``params`` in ``layer_layout``, as the train state holds them."""
    graphdef = model_graphdef(rcfg.replace(layer_layout=resolve_layer_layout(layer_layout)))

    def sample(params, enc_params, batch, noise):
        img = encoder.encode(enc_params, batch["images"]) if encoder is not None else batch["img_tokens"]
        policy = nnx.merge(graphdef, params)
        return policy.predict_action(batch["lang_embeds"], batch["lang_attn_mask"], img, batch["states"][:, -1:],
                                     batch["state_elem_mask"][:, None, :], batch["ctrl_freqs"], noise,
                                     num_steps=num_steps)

    return jax.jit(sample)


def step_batch(batch: dict, with_images: bool) -> dict:
    """The subset of a pipeline batch the train step consumes."""
    keys = (*STEP_KEYS, "images" if with_images else "img_tokens")
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}; has {sorted(batch)}")
    return {k: batch[k] for k in keys}
