"""The jitted train step: identical on every mesh shape, parameters sharded as the rules say,
k micro-batches == one k x batch, and it overfits a fixed batch."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from rdt_jax.model.layer_layout import to_layer_layout
from rdt_jax.training.config import OptimConfig
from tests.training import tiny

STEPS = 3


@pytest.fixture(scope="module")
def setup():
    # Adam's eps at 1e-6 rather than 1e-8: some tiny-model gradients are ~5e-7, where m / (sqrt(v) + 1e-8)
    # turns a reduction-order difference of 1e-9 into ~1 % of a step. These tests compare layouts and
    # meshes, not Adam's conditioning.
    return tiny.setup(OptimConfig(learning_rate=1e-3, eps=1e-6))


def _run(setup, mesh_shape, grad_accum=1, steps=STEPS, layer_layout="stacked", history=None):
    _, state, step, _ = tiny.build(*setup, mesh_shape, grad_accum=grad_accum, layer_layout=layer_layout)
    losses = []
    for i in range(steps):
        if history is not None:
            history.append(jax.device_get(state["params"]))
        state, m = step(state, None, tiny.batch(i))
        losses.append(float(m["loss"]))
    if history is not None:
        history.append(jax.device_get(state["params"]))
    return state, losses


@pytest.fixture(scope="module")
def reference(setup):
    state, losses = _run(setup, (1, 1), layer_layout="per_layer")
    return jax.device_get(state), losses


@pytest.mark.parametrize(("mesh_shape", "layer_layout"),
                         [((8, 1), "per_layer"), ((2, 4), "per_layer"), ((1, 8), "per_layer"), ((2, 4), "stacked")])
def test_mesh_step_equals_single_device(setup, reference, mesh_shape, layer_layout):
    """The reference runs on one device with the blocks per layer (CPU default); every mesh and both
    ways of running the blocks (scan over the stack, or a loop over sliced layers) agree with it."""
    state, losses = _run(setup, mesh_shape, layer_layout=layer_layout)
    ref_state, ref_losses = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    # The state holds the blocks as the step runs them; compared in the stacked (checkpoint) layout.
    stacked = lambda p: to_layer_layout(jax.device_get(p), per_layer=False)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(stacked(state["params"])),
                            jax.tree.leaves(stacked(ref_state["params"])), strict=True):
        # Adam divides by sqrt(v): for the few entries whose gradient is ~0 a reduction-order difference of
        # 1e-9 changes the update by up to ~lr. atol = 1 % of one step's update size (lr 1e-3).
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # really sharded per the rules (fsdp shards the input dim of kernels when it divides it), per-layer
    # blocks without the stack's leading layer axis
    fsdp = mesh_shape[1]
    per_layer = layer_layout == "per_layer"
    block = (lambda tree: tree["model"]["lang_blocks"][0]) if per_layer else (lambda tree: tree["model"]["lang_blocks"])
    k = block(state["params"])["attn"]["qkv"]["kernel"]
    want = PartitionSpec(*([] if per_layer else [None]), "fsdp" if fsdp > 1 else None, None)
    assert k.sharding.spec == want
    if fsdp > 1:
        assert k.addressable_shards[0].data.shape == (*(() if per_layer else (1,)), 32 // fsdp, 96)
        mu = block(state["opt_state"][1][0].mu)["attn"]["qkv"]["kernel"]
        assert mu.sharding.spec == want  # optimiser moments follow the parameters
        assert block(state["ema"])["attn"]["qkv"]["kernel"].sharding.spec == want
        assert state["ema"]["lang_adaptor"]["layers"][0]["kernel"].sharding.spec == PartitionSpec("fsdp", None)


@pytest.mark.parametrize("layer_layout", ["stacked", "per_layer"])
def test_grad_accumulation_equals_big_batch(setup, layer_layout):
    """k=2 micro-batches of 4 give the same update as one batch of 8 (same noise, same timesteps)."""
    history = []
    a, la = _run(setup, (1, 1), grad_accum=2, steps=2, layer_layout=layer_layout, history=history)
    b, lb = _run(setup, (1, 1), grad_accum=1, steps=2, layer_layout=layer_layout)
    np.testing.assert_allclose(la, lb, rtol=2e-5)
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)  # see above
    # The EMA steps on every micro-step, as the official loop's ema.step (TRAINING.md §6): calls n = 0..3 with
    # decay 0, 0, 1 - 2^-0.75, 1 - 3^-0.75 (default config), calls 0 and 2 before their optimiser step's
    # update, 1 and 3 after it. So n=1 sets the EMA to p1, n=2 pulls it towards p1 (no change) and n=3 towards
    # p2. One EMA update per optimiser step would leave p2.
    _, p1, p2 = ([np.asarray(x, np.float64) for x in jax.tree.leaves(h)] for h in history)
    d3 = 1 - 3**-0.75
    for got, x1, x2 in zip(jax.tree.leaves(a["ema"]), p1, p2, strict=True):
        np.testing.assert_allclose(np.asarray(got), d3 * x1 + (1 - d3) * x2, rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(x1, x2) for x1, x2 in zip(p1, p2, strict=True))  # the check can fail


def test_clipping_norm_from_the_backward_pass_is_the_gradients_norm(setup):
    """With one micro-batch the stacked step sums the blocks' squares during the backward pass; per layer,
    and over micro-batches, it takes the norm of the finished gradient: the same norm (the clip's use of a
    given norm: test_units)."""
    norms = {}
    for layout, k in (("stacked", 1), ("per_layer", 1), ("stacked", 2)):
        _, state, step, _ = tiny.build(*setup, (1, 1), grad_accum=k, layer_layout=layout)
        norms[layout, k] = float(step(state, None, tiny.batch(0))[1]["grad_norm"])
    np.testing.assert_allclose(norms["stacked", 1], norms["per_layer", 1], rtol=1e-5)
    np.testing.assert_allclose(norms["stacked", 1], norms["stacked", 2], rtol=1e-5)
    assert norms["stacked", 1] > 0.01


def test_overfits_a_fixed_batch(setup):
    """The diffusion loss on 8 fixed samples falls to a small fraction of its start."""
    _, state, step, _ = tiny.build(*setup, (1, 1))
    fixed = tiny.batch(0)
    # Robot-like targets: 14 used slots with smooth trajectories, the other slots 0 (as in real data).
    t = np.linspace(0, 1, 8)[None, :, None]
    phase = np.random.default_rng(1).uniform(0, 6, (8, 1, 14))
    fixed["actions"] = np.zeros((8, 8, 128), np.float32)
    fixed["actions"][:, :, :14] = np.sin(2 * t + phase)
    losses = []
    for _ in range(150):
        state, m = step(state, None, fixed)
        losses.append(float(m["loss"]))
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert np.all(np.isfinite(losses))
    assert last < 0.1 * first, (first, last)


def test_padding_the_language_further_changes_nothing():
    """A batch padded to 8 language tokens and the same batch padded to 16 ("bucket" padding gives one
    batch one length, the next another; one jitted step serves both) give the same loss and update."""
    from rdt_jax.data import language
    from rdt_jax.training.config import MeshConfig, ModelConfig
    from rdt_jax.training.mesh import make_mesh
    from rdt_jax.training.optimizer import make_optimizer
    from rdt_jax.training.train_step import init_params, init_state, make_train_step, rdt_config, state_shardings

    rcfg = rdt_config(ModelConfig(preset="tiny", hidden_size=32, depth=2, num_heads=4, pred_horizon=8,
                                  dtype="float32"), img_cond_len=tiny.IMG, max_lang_len=16).replace(img_token_dim=16)
    # eps as in the setup fixture: Adam's first step is ~lr * sign(g), which turns summation-order noise in a
    # near-zero gradient into a whole step.
    tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-3, eps=1e-6), 100)
    mesh = make_mesh(MeshConfig(data=2, fsdp=1), jax.devices()[:2])
    # Perturbed: RDT's zero-initialised final layer makes every initial loss independent of the conditions.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype),
                          jax.device_get(init_params(rcfg, 0)))
    fresh = lambda p: init_state(p, tx, 0, True)
    abstract = jax.eval_shape(fresh, params)
    shardings = state_shardings(abstract, mesh)
    short = tiny.batch(3)
    long = dict(short)
    long["lang_embeds"], long["lang_attn_mask"] = language.extend_padding(short["lang_embeds"],
                                                                          short["lang_attn_mask"], 16)
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in short.items()}
    step = make_train_step(rcfg, tx, schedule, rcfg.ema, mesh, abstract, shapes, None)
    results = []
    for b in (short, long):
        state, m = step(jax.jit(fresh, out_shardings=shardings)(params), None, b)
        results.append((float(m["loss"]), jax.device_get(state["params"])))
    (loss_a, pa), (loss_b, pb) = results
    assert np.isfinite(loss_a)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
    # The check can fail: putting a token where the padding was does change the step.
    unmasked = dict(long, lang_attn_mask=np.ones_like(long["lang_attn_mask"]))
    _, m = step(jax.jit(fresh, out_shardings=shardings)(params), None, unmasked)
    assert abs(float(m["loss"]) - loss_a) > 1e-4
