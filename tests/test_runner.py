"""RDTRunner API: cached sampling, the second golden fixture, rng handling, input errors, remat."""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rdt_jax
from rdt_jax.convert.params import params_from_torch
from rdt_jax.model import RDTConfig, RDTPolicy, init_policy
from tests.helpers import assert_close

PA = ["lang_tokens", "lang_attn_mask", "img_tokens", "state_tokens", "action_mask", "ctrl_freqs"]


def tiny_config(**kw) -> RDTConfig:
    base = dict(hidden_size=48, depth=3, num_heads=3, lang_token_dim=20, img_token_dim=12, state_token_dim=9,
                action_dim=9, pred_horizon=6, max_lang_cond_len=8, img_cond_len=10,
                lang_pos_embed_config=(("lang", -8),), img_pos_embed_config=(("image", (2, 1, -5)),))
    base.update(kw)
    return RDTConfig(**base)


def tiny_inputs(cfg: RDTConfig, batch: int = 2, lang_len: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, lang_len), bool)
    mask[-1, lang_len - 2 :] = False
    return {
        "lang_tokens": rng.standard_normal((batch, lang_len, cfg.lang_token_dim)).astype(np.float32),
        "lang_attn_mask": mask,
        "img_tokens": rng.standard_normal((batch, cfg.img_cond_len, cfg.img_token_dim)).astype(np.float32),
        "state_tokens": rng.standard_normal((batch, 1, cfg.state_token_dim)).astype(np.float32),
        "action_mask": (rng.random((batch, 1, cfg.action_dim)) > 0.3).astype(np.float32),
        "ctrl_freqs": np.array([25, 3, 10, 1][:batch], np.int64),
        "action_gt": rng.standard_normal((batch, cfg.pred_horizon, cfg.action_dim)).astype(np.float32),
    }


def randomised_runner(cfg: RDTConfig, seed: int = 0) -> rdt_jax.RDTRunner:
    """A runner whose every parameter is random (the official init zeroes the output layer)."""
    graphdef, state = nnx.split(init_policy(cfg, seed))
    rng = np.random.default_rng(seed + 1)
    state = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(a.dtype), state)
    return rdt_jax.RDTRunner(nnx.merge(graphdef, state))


def test_cached_condition_sampling_equals_uncached(cases, converted_small):
    runner = rdt_jax.load_pretrained(converted_small)
    args = [cases[f"pa.{k}"] for k in PA]
    cached = runner.predict_action(*args, noise=cases["pa.init_noise"], cache_cond_kv=True)
    uncached = runner.predict_action(*args, noise=cases["pa.init_noise"], cache_cond_kv=False)
    assert_close(cached, uncached, 1e-6, "cached vs uncached")
    r = randomised_runner(tiny_config())
    cfg = r.config
    x = tiny_inputs(cfg)
    noise = np.random.default_rng(3).standard_normal((2, cfg.pred_horizon, cfg.action_dim)).astype(np.float32)
    a = r.predict_action(*[x[k] for k in PA], noise=noise, cache_cond_kv=True, num_steps=7)
    b = r.predict_action(*[x[k] for k in PA], noise=noise, cache_cond_kv=False, num_steps=7)
    assert_close(a, b, 1e-6, "tiny cached vs uncached")
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1, got 0"):
        r.predict_action(*[x[k] for k in PA], noise=noise, num_steps=0)  # not silently the default


def test_second_golden_fixture_horizon_64(shared_dir):
    """reference/data/golden_tiny_rdt_fp32.npz: hidden 64, depth 4, horizon 64, 14 ALOHA slots."""
    g = np.load(shared_dir / "reference" / "data" / "golden_tiny_rdt_fp32.npz")
    cfg = RDTConfig(hidden_size=64, depth=4, num_heads=4, lang_token_dim=48, img_token_dim=32, state_token_dim=128,
                    action_dim=128, pred_horizon=64, max_lang_cond_len=16, img_cond_len=24,
                    lang_pos_embed_config=(("lang", -16),), img_pos_embed_config=(("image", (2, 3, -4)),))

    class NpzReader:
        path = "golden_tiny_rdt_fp32.npz"

        def keys(self):
            return [k[2:] for k in g.files if k.startswith("w/")]

        def shape(self, key):
            return g[f"w/{key}"].shape

        def get(self, key):
            return g[f"w/{key}"]

        def release(self, key):
            pass

    policy = nnx.eval_shape(lambda: RDTPolicy(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(policy)
    nnx.replace_by_pure_dict(state, params_from_torch(NpzReader(), cfg))
    runner = rdt_jax.RDTRunner(nnx.merge(graphdef, state))
    i = {k[3:]: g[k] for k in g.files if k.startswith("in/")}
    loss = runner.compute_loss(i["lang_tokens"], i["lang_attn_mask"], i["img_tokens"], i["state_tokens"],
                               i["action_gt"], i["action_mask"], i["ctrl_freqs"], noise=i["loss_noise"],
                               timesteps=i["loss_timesteps"])
    assert_close(loss, g["out/loss"], 1e-5, "loss")
    actions, trace = runner.predict_action(i["lang_tokens"], i["lang_attn_mask"], i["img_tokens"], i["state_tokens"],
                                           i["action_mask"], i["ctrl_freqs"], noise=i["sample_init_noise"],
                                           capture=True)
    np.testing.assert_array_equal(np.asarray(trace["timesteps"]), g["out/sample_timesteps"])
    for k in range(5):
        assert_close(trace["step_sample_in"][k], g["out/sample_x_in"][k], 1e-4, f"x_in[{k}]")
        assert_close(trace["step_model_output"][k], g["out/sample_model_out"][k], 1e-4, f"x0[{k}]")
    assert_close(actions, g["out/predict_action"], 1e-4, "predict_action")


@pytest.fixture(scope="module")
def tiny_runner() -> rdt_jax.RDTRunner:
    return randomised_runner(tiny_config())


def test_rng_paths_are_deterministic_and_validated(tiny_runner):
    cfg, r = tiny_runner.config, tiny_runner
    x = tiny_inputs(cfg)
    loss_args = [x[k] for k in ["lang_tokens", "lang_attn_mask", "img_tokens", "state_tokens", "action_gt",
                                "action_mask", "ctrl_freqs"]]
    l1 = r.compute_loss(*loss_args, rng=jax.random.key(0))
    l2 = r.compute_loss(*loss_args, rng=jax.random.key(0))
    l3 = r.compute_loss(*loss_args, rng=jax.random.key(1))
    assert float(l1) == float(l2) and float(l1) != float(l3) and np.isfinite(float(l1))
    with pytest.raises(ValueError, match="rng"):
        r.compute_loss(*loss_args)
    a1 = r.predict_action(*[x[k] for k in PA], rng=jax.random.key(5))
    a2 = r.predict_action(*[x[k] for k in PA], rng=jax.random.key(5))
    np.testing.assert_array_equal(a1, a2)
    assert a1.shape == (2, cfg.pred_horizon, cfg.action_dim)
    assert np.all(np.asarray(a1)[np.broadcast_to(x["action_mask"], a1.shape) == 0] == 0)
    with pytest.raises(ValueError, match="rng"):
        r.predict_action(*[x[k] for k in PA])
    # Explicit timesteps outside the schedule are an error (the official indexing raises too), lists work.
    noise = np.zeros(np.shape(x["action_gt"]), np.float32)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\); got values in \[3, 1000\]"):
        r.compute_loss(*loss_args, noise=noise, timesteps=[3, 1000])
    assert float(r.compute_loss(*loss_args, noise=noise, timesteps=[3, 999])) == float(
        r.compute_loss(*loss_args, noise=noise, timesteps=np.array([3, 999])))


def test_float16_compute_on_cpu_is_refused(converted_small):
    with pytest.raises(ValueError, match="float16 compute is not supported on CPU"):
        rdt_jax.load_pretrained(converted_small, dtype="float16")
    r = rdt_jax.load_pretrained(converted_small, dtype="float16", compute_dtype="float32")  # 16-bit storage only
    assert r.config.jnp_param_dtype == np.float16


@pytest.mark.parametrize(
    "name,bad,message",
    [
        ("lang_tokens", np.zeros((2, 5, 19), np.float32), r"lang_tokens must have shape \(\*, \*, 20\)"),
        ("img_tokens", np.zeros((2, 11, 12), np.float32), r"img_tokens must have shape \(2, 10, 12\)"),
        ("state_tokens", np.zeros((2, 9), np.float32), r"state_tokens must have shape \(2, 1, 9\)"),
        ("action_mask", np.zeros((2, 1, 8), np.float32), r"action_mask must have shape \(2, 1, 9\)"),
        ("lang_attn_mask", np.ones((2, 4), bool), r"lang_attn_mask must have shape \(2, 5\)"),
        ("lang_tokens", np.zeros((2, 9, 20), np.float32), "max_lang_cond_len=8"),
    ],
)
def test_bad_shapes_are_clear_errors(tiny_runner, name, bad, message):
    cfg, r = tiny_runner.config, tiny_runner
    x = tiny_inputs(cfg)
    x[name] = bad
    if name == "lang_tokens" and bad.shape[1] != 5:
        x["lang_attn_mask"] = np.ones(bad.shape[:2], bool)
    with pytest.raises(ValueError, match=message):
        r.predict_action(*[x[k] for k in PA], rng=jax.random.key(0))


def test_language_masks_every_kernel_cannot_honour_are_refused(tiny_runner):
    """A row with no valid token (the official code returns NaN, our kernels would average padding) is an
    error for concrete inputs; so is a mask that is not right-padded for the cuDNN kernel, which takes
    sequence lengths (it would attend to the first n tokens instead)."""
    x = tiny_inputs(tiny_runner.config)
    empty = x["lang_attn_mask"].copy()
    empty[1] = False
    args = {**x, "lang_attn_mask": empty}
    with pytest.raises(ValueError, match=r"lang_attn_mask rows \[1\] have no valid token"):
        tiny_runner.predict_action(*[args[k] for k in PA], rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"lang_attn_mask rows \[1\] have no valid token"):
        tiny_runner.compute_loss(*[args[k] for k in ["lang_tokens", "lang_attn_mask", "img_tokens", "state_tokens",
                                                     "action_gt", "action_mask", "ctrl_freqs"]], rng=jax.random.key(0))
    cudnn = rdt_jax.RDTRunner(init_policy(tiny_config(attention_impl="cudnn"), 0))
    left = np.ones_like(x["lang_attn_mask"])
    left[0, :2] = False  # left-padded
    with pytest.raises(ValueError, match=r"rows \[0\] are not right-padded .*attention_impl='xla'"):
        cudnn.predict_action(*[{**x, "lang_attn_mask": left}[k] for k in PA], rng=jax.random.key(0))


@pytest.mark.parametrize("layout", ["stacked", "per_layer"])
def test_image_mask_hides_the_masked_image_tokens(layout):
    """The official RDT.forward's img_mask: masked image tokens cannot change the output (whatever their
    values), an all-True mask is no mask, and masking does change the output."""
    cfg = tiny_config(layer_layout=layout)
    runner = randomised_runner(cfg)
    rng = np.random.default_rng(3)
    b, h = 2, cfg.hidden_size
    x = rng.standard_normal((b, cfg.pred_horizon + 1, h)).astype(np.float32)
    lang_c = rng.standard_normal((b, 5, h)).astype(np.float32)
    img_c = rng.standard_normal((b, cfg.img_cond_len, h)).astype(np.float32)
    freq, t = np.full((b,), 25.0, np.float32), np.array([10, 700])
    lang_mask = np.ones((b, 5), bool)
    img_mask = np.ones((b, cfg.img_cond_len), bool)
    img_mask[1, 7:] = False
    plain = np.asarray(runner.model(x, freq, t, lang_c, img_c, lang_mask))
    np.testing.assert_array_equal(np.asarray(runner.model(x, freq, t, lang_c, img_c, lang_mask,
                                                          np.ones_like(img_mask))), plain)
    masked = np.asarray(runner.model(x, freq, t, lang_c, img_c, lang_mask, img_mask))
    other = img_c.copy()
    other[1, 7:] = rng.standard_normal(other[1, 7:].shape) * 10
    np.testing.assert_allclose(np.asarray(runner.model(x, freq, t, lang_c, other, lang_mask, img_mask)), masked,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(masked[0], plain[0])  # sample 0 masks nothing
    assert np.abs(masked[1] - plain[1]).max() > 1e-3
    # The cached-condition path (K/V computed once, as predict_action does) masks the same way.
    from flax import nnx

    rdt = nnx.merge(runner.graphdef, runner.state).model
    cached = rdt(jnp.asarray(x), freq, t, lang_mask=lang_mask, img_mask=img_mask,
                 cond_kv=rdt.precompute_cond_kv(jnp.asarray(lang_c), jnp.asarray(img_c)))
    np.testing.assert_allclose(np.asarray(cached), masked, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"img_mask rows \[0, 1\] have no valid token"):
        runner.model(x, freq, t, lang_c, img_c, lang_mask, np.zeros_like(img_mask))


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_remat_changes_nothing_numerically(dtype, tol):
    cfg = tiny_config(depth=4, dtype=dtype)
    x = tiny_inputs(cfg)
    args = [x[k] for k in ["lang_tokens", "lang_attn_mask", "img_tokens", "state_tokens", "action_gt",
                           "action_mask", "ctrl_freqs"]]
    noise = np.ones((2, cfg.pred_horizon, cfg.action_dim), np.float32)
    t = np.array([3, 900])

    def grads(r):
        graphdef, params = nnx.split(r.policy, nnx.Param)
        fn = lambda p: nnx.merge(graphdef, p).compute_loss(*args, noise, t)
        return jax.jit(jax.value_and_grad(fn))(params)

    l1, g1 = grads(randomised_runner(cfg))
    for remat in ("full", "save_dots", "save_cond_kv", "save_cond_kv_and_tokens"):
        l2, g2 = grads(randomised_runner(cfg.replace(remat=remat)))
        assert_close(l2, l1, tol / 10, f"{remat} loss")
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
            assert_close(b, a, tol, f"{remat} grad")


def _count_dots(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count_dots(sub)
    return n


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # 16-bit K/V are saved as bit patterns
def test_save_cond_kv_remat_does_not_recompute_the_condition_products(dtype):
    """Under "save_cond_kv" the backward recomputes each remat region's block pair except its two
    cross-attention K/V products (K and V of the language and of the image block): exactly four
    fewer products than "full"."""
    cfg = tiny_config(depth=4, dtype=dtype)
    x = tiny_inputs(cfg)
    args = [x[k] for k in ["lang_tokens", "lang_attn_mask", "img_tokens", "state_tokens", "action_gt",
                           "action_mask", "ctrl_freqs"]]
    noise, t = np.ones((2, cfg.pred_horizon, cfg.action_dim), np.float32), np.array([3, 900])

    def dots(remat):
        graphdef, params = nnx.split(init_policy(cfg.replace(remat=remat)), nnx.Param)
        fn = lambda p: nnx.merge(graphdef, p).compute_loss(*args, noise, t)
        return _count_dots(jax.make_jaxpr(jax.grad(fn))(params).jaxpr)

    none, full, saved = dots("none"), dots("full"), dots("save_cond_kv")
    assert full > none  # the stacked scan body is one remat region: its forward runs again
    assert full - saved == 4
    # "save_cond_kv_and_tokens" also keeps each block's six linear products over the action tokens
    # (qkv and output projection of self-attention, query and output projection of cross-attention,
    # the two MLP layers): 11 more products per pair not recomputed, as the pair's last one (the image
    # block's second MLP layer) is not needed by the backward and "full" skips it already; and the
    # cross-attention kernel's output and log-sum-exp, so neither cross-attention's head loop (its two
    # products, scores and weighted values) runs again: 2 x 2 more.
    assert full - dots("save_cond_kv_and_tokens") == 4 + 11 + 4


def test_random_init_follows_official_recipe():
    cfg = tiny_config()
    p = nnx.to_pure_dict(nnx.state(init_policy(cfg), nnx.Param))
    m = p["model"]
    assert np.all(np.asarray(m["final_layer"]["ffn_final"]["fc2"]["kernel"]) == 0)
    assert np.all(np.asarray(m["lang_blocks"]["attn"]["qkv"]["bias"]) == 0)
    assert np.all(np.asarray(m["img_blocks"]["norm1"]["weight"]) == 1)
    # Xavier-uniform over the fused qkv matrix: bound sqrt(6 / (D + 3D)).
    qkv = np.asarray(m["lang_blocks"]["attn"]["qkv"]["kernel"])
    assert np.abs(qkv).max() <= np.sqrt(6 / (4 * 48)) and np.abs(qkv).max() > 0.8 * np.sqrt(6 / (4 * 48))
    assert not np.array_equal(qkv[0], qkv[1])  # stacked layers are initialised independently
    assert 0.015 < np.std(np.asarray(m["t_embedder"]["mlp0"]["kernel"])) < 0.025
    bias = np.asarray(p["lang_adaptor"]["layers"][0]["bias"])
    assert np.abs(bias).max() <= 1 / np.sqrt(20) and np.abs(bias).max() > 0  # torch default bias init
    fresh = rdt_jax.RDTRunner.from_config(cfg)
    x = tiny_inputs(cfg)
    out = fresh.model(jnp.ones((2, cfg.pred_horizon + 1, 48)), x["ctrl_freqs"], jnp.array([1, 2]),
                      jnp.ones((2, 5, 48)), jnp.ones((2, 10, 48)))
    assert np.all(np.asarray(out) == 0)  # zero-initialised output layer


def test_config_json_round_trip(shared_dir, tmp_path):
    import json

    raw = json.loads((shared_dir / "fixtures" / "rdt_small" / "config.json").read_text())
    cfg = RDTConfig.from_official(raw)
    official = cfg.to_official()
    assert official.pop("rdt_jax") == {"norm_form": "timm_var", "norm_eps": 1e-6}
    assert official == raw
    cfg.replace(norm_form="rms").save_json(tmp_path / "c.json")
    assert RDTConfig.from_json_file(tmp_path / "c.json").norm_form == "rms"
    del raw["rdt"]
    with pytest.raises(KeyError, match="rdt"):
        RDTConfig.from_official(raw)
    with pytest.raises(ValueError, match="divisible"):
        RDTConfig(hidden_size=100, num_heads=3)


def test_bf16_weight_sampling_keeps_weights_16bit_on_cpu():
    """With bf16 weights the sampling program must not hold a float32 copy of the block weights."""
    from rdt_jax import runner as runner_mod

    cfg = tiny_config(hidden_size=256, depth=6, num_heads=4, param_dtype="bfloat16", dtype="float32")
    r0 = randomised_runner(cfg)
    r = rdt_jax.RDTRunner(nnx.merge(r0.graphdef, jax.tree.map(lambda a: a.astype(jnp.bfloat16), r0.state)))
    x = tiny_inputs(cfg, batch=1)
    args = [x[k] for k in PA] + [np.zeros((1, cfg.pred_horizon, cfg.action_dim), np.float32)]
    assert runner_mod.sampling_compiler_options(r.state) == {
        **runner_mod.CPU_SAMPLING_OPTIONS, **runner_mod.CPU_16BIT_WEIGHT_OPTIONS}
    block_f32_bytes = sum(a.size * 4 for a in jax.tree.leaves(nnx.state(r.policy.model.lang_blocks)))
    block_f32_bytes += sum(a.size * 4 for a in jax.tree.leaves(nnx.state(r.policy.model.img_blocks)))
    compiled = runner_mod.sampler_for(r.state).lower(r.graphdef, r.state, *args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 0.5 * block_f32_bytes, (temp, block_f32_bytes)  # with the pass on: 1.16x
    # Same actions as float32 arithmetic on the same (bf16-valued) weights.
    f32 = rdt_jax.RDTRunner(nnx.merge(r.graphdef, jax.tree.map(lambda a: a.astype(jnp.float32), r.state)))
    assert runner_mod.sampling_compiler_options(f32.state) == runner_mod.CPU_SAMPLING_OPTIONS
    assert_close(r.predict_action(*args[:-1], noise=args[-1]), f32.predict_action(*args[:-1], noise=args[-1]),
                 1e-5, "bf16 weights vs the same weights in f32")


def test_cpu_sampling_keeps_one_blocks_kv_projection_alive():
    """The condition K/V precompute must not hold every image block's float32 projection at once.

    The bound is the K/V cache itself plus a few single-block projections; XLA:CPU's default
    (concurrency-ordered) scheduler needs about one projection per image block on top of it.
    """
    from rdt_jax import runner as runner_mod

    cfg = tiny_config(hidden_size=128, depth=12, num_heads=4, img_cond_len=2048, img_token_dim=64,
                      img_pos_embed_config=(("image", (2, 1, -1024)),), layer_layout="per_layer",
                      param_dtype="bfloat16", dtype="bfloat16")
    r = rdt_jax.RDTRunner(init_policy(cfg, 0))
    x = tiny_inputs(cfg, batch=1)
    args = [x[k] for k in PA] + [np.zeros((1, cfg.pred_horizon, cfg.action_dim), np.float32)]

    def temp_bytes(options: dict) -> int:
        jitted = runner_mod._sampler(tuple(sorted(options.items())))
        return jitted.lower(r.graphdef, r.state, *args).compile().memory_analysis().temp_size_in_bytes

    n_img_blocks = cfg.depth // 2
    projection = cfg.img_cond_len * cfg.hidden_size * 4  # one block's K (or V) in float32, before rounding
    cache = n_img_blocks * 2 * cfg.img_cond_len * cfg.hidden_size * 2  # every image block's bf16 K and V
    ours = temp_bytes(runner_mod.sampling_compiler_options(r.state))
    assert ours < cache + 4 * projection, (ours, cache, projection)
    # The guard is real: without the memory-ordered scheduler the same program needs more.
    assert temp_bytes({}) > cache + n_img_blocks * projection, "default scheduler no longer piles up; revisit"
