"""A tiny RDT + optimiser + fixed batch (precomputed image features) shared by the training tests."""

from __future__ import annotations

import jax
import numpy as np

from rdt_jax.training.config import MeshConfig, ModelConfig, OptimConfig
from rdt_jax.training.mesh import make_mesh
from rdt_jax.training.optimizer import make_optimizer
from rdt_jax.training.train_step import (
    init_params,
    init_state,
    make_train_step,
    rdt_config,
    state_in_layout,
    state_shardings,
)

B, LANG, IMG = 8, 8, 24


DEFAULT_OPTIM = OptimConfig(learning_rate=1e-3)


def setup(optim: OptimConfig = DEFAULT_OPTIM):
    rcfg = rdt_config(ModelConfig(preset="tiny", hidden_size=32, depth=2, num_heads=4, pred_horizon=8,
                                  dtype="float32"), img_cond_len=IMG, max_lang_len=LANG)
    rcfg = rcfg.replace(img_token_dim=16)
    tx, schedule = make_optimizer(optim, 100)
    return rcfg, tx, schedule


def batch(seed: int = 0, b: int = B) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "lang_embeds": rng.standard_normal((b, LANG, 4096), np.float32),
        "lang_attn_mask": np.arange(LANG)[None, :] < rng.integers(2, LANG + 1, (b, 1)),
        "img_tokens": rng.standard_normal((b, IMG, 16), np.float32),
        "states": rng.standard_normal((b, 1, 128), np.float32),
        "actions": rng.standard_normal((b, 8, 128), np.float32),
        "state_elem_mask": (rng.random((b, 128)) < 0.5).astype(np.float32),
        "ctrl_freqs": np.full((b,), 25.0, np.float32),
    }


_PARAMS: dict = {}


def initial_params(rcfg) -> dict:
    """The seed-0 initial parameters as host arrays, initialised once per process (compiling the
    initialiser costs seconds; every build starts from these same values anyway)."""
    if rcfg not in _PARAMS:
        _PARAMS[rcfg] = jax.device_get(init_params(rcfg, 0))
    return _PARAMS[rcfg]


def build(rcfg, tx, schedule, mesh_shape: tuple[int, int], *, grad_accum: int = 1, b: int = B, devices=None,
          params=None, layer_layout: str = "stacked"):
    mesh = make_mesh(MeshConfig(data=mesh_shape[0], fsdp=mesh_shape[1]),
                     devices if devices is not None else jax.devices()[: mesh_shape[0] * mesh_shape[1]])
    params = initial_params(rcfg) if params is None else params
    params = state_in_layout(params, layer_layout)
    fresh = lambda p: init_state(p, tx, 0, True)
    abstract = jax.eval_shape(fresh, params)
    shardings = state_shardings(abstract, mesh)
    state = jax.jit(fresh, out_shardings=shardings)(params)
    key = (rcfg, id(tx), tuple(d.id for d in mesh.devices.flat), mesh_shape, grad_accum, b, layer_layout)
    if key not in _STEPS:  # one compiled step per configuration and process
        shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch(0, b).items()}
        step = make_train_step(rcfg, tx, schedule, rcfg.ema, mesh, abstract, shapes, None, grad_accum=grad_accum,
                               layer_layout=layer_layout)
        abstract_state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                      abstract, shardings)
        _STEPS[key] = (tx, step.lower(abstract_state, None, shapes).compile())
    return mesh, state, _STEPS[key][1], shardings


_STEPS: dict = {}  # values keep tx alive, so its id() in the key is not reused
