"""Parity with the official PyTorch RDT on its golden outputs (fixtures/rdt_small, float32).

Every case is run through weights converted by ``convert_torch_weights`` from both release formats.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import rdt_jax
from rdt_jax.convert.params import torch_state_from_params
from tests.helpers import assert_close

FWD_TOL = 1e-5  # single forward passes
SAMPLE_TOL = 1e-4  # the 5-step sample
BF16_TOL = 2e-2

LOSS_INPUTS = ["lang_tokens", "lang_attn_mask", "img_tokens", "state_tokens", "action_gt", "action_mask", "ctrl_freqs"]
PA_INPUTS = ["lang_tokens", "lang_attn_mask", "img_tokens", "state_tokens", "action_mask", "ctrl_freqs"]


@pytest.fixture(scope="module")
def runner(converted_small):
    return rdt_jax.load_pretrained(converted_small)


def test_denoiser_forward_with_mask(runner, cases):
    c = {k[4:]: v for k, v in cases.items() if k.startswith("fwd.")}
    out, cap = runner.model(c["x"], c["freq"], c["t"], c["lang_c"], c["img_c"], c["lang_mask"], capture=True)
    assert_close(out, c["out"], FWD_TOL, "fwd.out")
    for name in ("t_emb", "freq_emb", "tokens_in", "final_out"):
        assert_close(cap[name], c[name], FWD_TOL, f"fwd.{name}")
    assert cap["block_out"].shape == c["block_out"].shape
    for i in range(c["block_out"].shape[0]):
        assert_close(cap["block_out"][i], c["block_out"][i], FWD_TOL, f"fwd.block_out[{i}]")


def test_denoiser_forward_broadcast_timestep_no_mask(runner, cases):
    out = runner.model(cases["fwd_t1.x"], cases["fwd.freq"], cases["fwd_t1.t"], cases["fwd_t1.lang_c"],
                       cases["fwd_t1.img_c"])
    assert_close(out, cases["fwd_t1.out"], FWD_TOL, "fwd_t1.out")


def _loss_args(cases):
    return [cases[f"loss.{k}"] for k in LOSS_INPUTS]


def test_compute_loss(runner, cases):
    loss = runner.compute_loss(*_loss_args(cases), noise=cases["loss.noise"], timesteps=cases["loss.timesteps"])
    assert_close(loss, cases["loss.loss"], FWD_TOL, "loss")


def test_loss_gradients_of_every_parameter(runner, cases):
    graphdef, params = nnx.split(runner.policy, nnx.Param)

    def loss_fn(p):
        return nnx.merge(graphdef, p).compute_loss(*_loss_args(cases), cases["loss.noise"], cases["loss.timesteps"])

    grads = nnx.to_pure_dict(jax.grad(loss_fn)(params))
    by_key = dict(torch_state_from_params(jax.device_get(grads), runner.config))
    names = [str(n) for n in cases["loss.param_names"]]
    assert sorted(names) == sorted(by_key), "gradient keys differ from the official parameter list"
    norms = np.array([np.linalg.norm(by_key[n].astype(np.float64)) for n in names])
    assert_close(norms, cases["loss.grad_norms"], FWD_TOL, "grad norms")
    for key in cases:
        if key.startswith("loss.grad."):
            name = key[len("loss.grad."):]
            assert_close(by_key[name].reshape(cases[key].shape), cases[key], FWD_TOL, key)


@pytest.mark.parametrize("prefix", ["pa", "pa1"])
def test_predict_action_every_step(runner, cases, prefix):
    args = [cases[f"{prefix}.{k}"] for k in PA_INPUTS]
    actions, trace = runner.predict_action(*args, noise=cases[f"{prefix}.init_noise"], capture=True)
    np.testing.assert_array_equal(np.asarray(trace["timesteps"]), cases[f"{prefix}.timesteps"])
    for name in ("lang_cond", "img_cond", "state_traj"):
        assert_close(trace[name], cases[f"{prefix}.{name}"], FWD_TOL, f"{prefix}.{name}")
    for name in ("step_model_input", "step_sample_in", "step_model_output", "step_prev_sample"):
        for step in range(trace[name].shape[0]):
            assert_close(trace[name][step], cases[f"{prefix}.{name}"][step], SAMPLE_TOL, f"{prefix}.{name}[{step}]")
    assert_close(actions, cases[f"{prefix}.actions"], SAMPLE_TOL, f"{prefix}.actions")
    # Masked-out action dims are exactly zero.
    mask = cases[f"{prefix}.action_mask"]
    assert np.all(np.asarray(actions)[np.broadcast_to(mask, actions.shape) == 0] == 0)


def test_bfloat16_stays_within_bf16_error(converted_small, cases):
    runner = rdt_jax.load_pretrained(converted_small, dtype="bfloat16")
    leaves = jax.tree.leaves(runner.params)
    assert all(leaf.dtype == jax.numpy.bfloat16 for leaf in leaves)
    out = runner.model(cases["fwd.x"], cases["fwd.freq"], cases["fwd.t"], cases["fwd.lang_c"], cases["fwd.img_c"],
                       cases["fwd.lang_mask"])
    assert out.dtype == jax.numpy.bfloat16
    assert_close(out, cases["fwd.out"], BF16_TOL, "bf16 fwd.out")
    loss = runner.compute_loss(*_loss_args(cases), noise=cases["loss.noise"], timesteps=cases["loss.timesteps"])
    assert_close(loss, cases["loss.loss"], BF16_TOL, "bf16 loss")
    for prefix in ("pa", "pa1"):
        actions = runner.predict_action(*[cases[f"{prefix}.{k}"] for k in PA_INPUTS],
                                        noise=cases[f"{prefix}.init_noise"])
        assert_close(actions, cases[f"{prefix}.actions"], BF16_TOL, f"bf16 {prefix}.actions")
