"""Model-free pieces: EMA schedule, clipping, schedules, sharding rules, metrics, checkpoint pruning and
restoring onto another mesh."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rdt_jax.model.config import EmaConfig
from rdt_jax.training import checkpoints as ckpt
from rdt_jax.training import ema as ema_lib
from rdt_jax.training.config import CheckpointConfig, MeshConfig, OptimConfig
from rdt_jax.training.mesh import make_mesh
from rdt_jax.training.metrics import validation as val
from rdt_jax.training.optimizer import make_optimizer, make_schedule
from rdt_jax.training.sharding import spec_for, tree_shardings


def test_ema_decay_matches_hand_computed_values():
    cfg = EmaConfig()  # update_after_step 0, inv_gamma 1, power 0.75, max 0.9999
    # n=0,1: step<=0 -> 0; n=2: step 1 -> 1 - 2^-0.75; n=11: step 10 -> 1 - 11^-0.75
    want = {0: 0.0, 1: 0.0, 2: 1 - 2 ** -0.75, 11: 1 - 11 ** -0.75, 461: 1 - 461 ** -0.75, 10**7: 0.9999}
    for n, d in want.items():
        assert float(ema_lib.ema_decay(cfg, n)) == pytest.approx(d, rel=1e-6, abs=1e-7), n
    cfg2 = EmaConfig(update_after_step=5, inv_gamma=2.0, power=0.5, min_value=0.1)
    assert float(ema_lib.ema_decay(cfg2, 5)) == 0.0  # step 0 -> 0 even below min_value
    assert float(ema_lib.ema_decay(cfg2, 10)) == pytest.approx(1 - (1 + 4 / 2.0) ** -0.5)
    # the update itself, in float32 even for bf16 params
    e = {"w": jnp.zeros(3, jnp.float32)}
    p = {"w": jnp.ones(3, jnp.bfloat16)}
    out = ema_lib.ema_update(cfg, e, p, jnp.asarray(2))
    d = 1 - 2 ** -0.75
    np.testing.assert_allclose(out["w"], (1 - d) * np.ones(3), rtol=1e-6)
    assert out["w"].dtype == jnp.float32


def test_accumulated_ema_equals_the_official_micro_step_sequence():
    """One optimiser step of k micro-batches = k official ema.step calls, all but the last before the update."""
    cfg = EmaConfig(update_after_step=1, inv_gamma=2.0, power=0.6, min_value=0.05, max_value=0.9)
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(4) for _ in range(5)]  # the parameters after 0..4 optimiser steps
    k, ema, n = 3, params[0].copy(), 0
    for step in range(4):
        for j in range(k):
            s = max(0, n - 1 - 1)
            d = 0.0 if s <= 0 else min(max(1 - (1 + s / 2.0) ** -0.6, 0.05), 0.9)
            target = params[step + 1] if j == k - 1 else params[step]
            ema, n = d * ema + (1 - d) * target, n + 1
    got = {"w": jnp.asarray(params[0], jnp.float32)}
    for step in range(4):
        got = ema_lib.ema_update_accumulated(cfg, got, {"w": jnp.asarray(params[step], jnp.float32)},
                                             {"w": jnp.asarray(params[step + 1], jnp.float32)}, jnp.asarray(step), k)
    assert got["w"].dtype == jnp.float32
    np.testing.assert_allclose(got["w"], ema, rtol=1e-5, atol=1e-6)
    one = ema_lib.ema_update_accumulated(cfg, {"w": jnp.zeros(4)}, {"w": jnp.ones(4)}, {"w": jnp.ones(4)},
                                         jnp.asarray(5), 1)
    np.testing.assert_allclose(one["w"], ema_lib.ema_update(cfg, {"w": jnp.zeros(4)}, {"w": jnp.ones(4)}, 5)["w"])


def test_clipping_really_clips():
    cfg = OptimConfig(learning_rate=0.1, max_grad_norm=1.0, weight_decay=0.0)
    tx, _ = make_optimizer(cfg, 10)
    params = {"a": jnp.ones(4), "b": jnp.ones((2, 2))}
    grads = {"a": jnp.full(4, 3.0), "b": jnp.full((2, 2), 4.0)}  # norm 10
    clipped = jax.tree.map(lambda g: g / 10.0, grads)
    ref = optax.adamw(0.1, weight_decay=0.0)
    # Adam's first step is sign-like: compare the second step, where the clipped scale matters.
    s, s_ref = tx.init(params), ref.init(params)
    for _ in range(2):
        _, s = tx.update(grads, s, params)
        _, s_ref = ref.update(clipped, s_ref, params)
    np.testing.assert_allclose(s[1][0].mu["a"], s_ref[0].mu["a"], rtol=1e-6)  # moments saw clipped grads
    np.testing.assert_allclose(s[1][0].nu["b"], s_ref[0].nu["b"], rtol=1e-6)
    unclipped, _ = make_optimizer(OptimConfig(max_grad_norm=0.0), 10)
    s0 = unclipped.init(params)
    _, s0 = unclipped.update(grads, s0, params)
    assert not np.allclose(s0[0].mu["a"], s[1][0].mu["a"])


def test_clipping_takes_a_norm_the_caller_already_has():
    """The train step passes the norm it summed during the backward pass; the clip then uses it."""
    from rdt_jax.training.optimizer import clip_by_global_norm

    grads = {"a": jnp.full(4, 3.0), "b": jnp.full((2, 2), 4.0)}  # norm 10
    clip = clip_by_global_norm(1.0)
    own, _ = clip.update(grads, clip.init(grads))
    given, _ = clip.update(grads, clip.init(grads), global_norm=jnp.float32(20.0))
    np.testing.assert_allclose(own["a"], 3.0 / (10 + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(given["a"], 3.0 / (20 + 1e-6), rtol=1e-6)
    tx, _ = make_optimizer(OptimConfig(max_grad_norm=1.0), 10)  # the chain hands it on
    params = {"a": jnp.ones(4), "b": jnp.ones((2, 2))}
    _, s_own = tx.update(grads, tx.init(params), params)
    _, s_given = tx.update(grads, tx.init(params), params, global_norm=jnp.float32(20.0))
    np.testing.assert_allclose(s_given[1][0].mu["a"], s_own[1][0].mu["a"] / 2, rtol=1e-5)


@pytest.mark.parametrize("scale", [0.01, 1.0, 7.0])  # below, at about, above the threshold
def test_scalar_factor_clipping_equals_torch(scale):
    torch = pytest.importorskip("torch")  # the [torch] extra, which CI installs
    from rdt_jax.training.optimizer import clip_by_global_norm

    rng = np.random.default_rng(0)
    grads = {"a": jnp.asarray(rng.standard_normal(5) * scale, jnp.float32),
             "b": jnp.asarray(rng.standard_normal((3, 2)) * scale, jnp.float32)}
    ours, _ = clip_by_global_norm(2.0).update(grads, None)
    ref = {k: torch.nn.Parameter(torch.zeros(g.shape)) for k, g in grads.items()}
    for k, p in ref.items():
        p.grad = torch.tensor(np.array(grads[k]))
    torch.nn.utils.clip_grad_norm_(list(ref.values()), 2.0)  # the official accelerate path's clipping
    for k in grads:
        np.testing.assert_allclose(ours[k], ref[k].grad.numpy(), rtol=1e-6)
    assert float(optax.tree.norm(ours)) <= 2.0 + 1e-5


def test_schedules_follow_diffusers():
    c = make_schedule(OptimConfig(learning_rate=1.0, schedule="constant_with_warmup", warmup_steps=4), 100)
    assert [float(c(i)) for i in (0, 2, 4, 50)] == [0.0, 0.5, 1.0, 1.0]
    cos = make_schedule(OptimConfig(learning_rate=1.0, schedule="cosine", warmup_steps=10), 110)
    assert float(cos(5)) == pytest.approx(0.5)
    assert float(cos(10)) == pytest.approx(1.0)
    assert float(cos(60)) == pytest.approx(0.5, abs=1e-6)
    assert float(cos(110)) == pytest.approx(0.0, abs=1e-6)
    # decay_steps fixes the cosine's length whatever --num-steps says (a run stopped early and resumed)
    _, fixed = make_optimizer(OptimConfig(learning_rate=1.0, schedule="cosine", warmup_steps=10, decay_steps=110), 40)
    assert float(fixed(60)) == pytest.approx(0.5, abs=1e-6)
    # Past its end the cosine stays at 0 (diffusers' formula would climb back to the peak at 2x the length).
    assert [float(fixed(i)) for i in (110, 160, 210, 1000)] == [pytest.approx(0.0, abs=1e-6)] + [0.0] * 3


def test_step_intervals_must_be_positive():
    from rdt_jax.training.config import LogConfig

    with pytest.raises(ValueError, match="save_every must be >= 1"):
        CheckpointConfig(save_every=0)
    with pytest.raises(ValueError, match="log_every must be >= 1"):
        LogConfig(log_every=0)
    with pytest.raises(ValueError, match=r"mesh\.data must be -1 .* or >= 1, got 0"):
        MeshConfig(data=0)
    from rdt_jax.training.config import TrainConfig, ValidationConfig

    for bad in (dict(grad_accum=0), dict(grad_accum=-2), dict(batch_size=0)):
        with pytest.raises(ValueError, match="batch_size and grad_accum must be >= 1"):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match=r"validation\.batch_size and validation\.num_batches must be >= 1"):
        ValidationConfig(num_batches=0)
    with pytest.raises(ValueError, match=r"validation.every must be >= 0"):
        ValidationConfig(every=-1)
    with pytest.raises(ValueError, match=r"validation\.num_inference_steps must be >= 1"):
        ValidationConfig(num_inference_steps=0)
    with pytest.raises(ValueError, match="keep_period must be >= 1"):
        CheckpointConfig(keep_period=0)
    with pytest.raises(ValueError, match=r"seed must lie in \[0, 2\*\*32\)"):
        TrainConfig(seed=-1)
    from rdt_jax.training.config import DataConfig

    with pytest.raises(ValueError, match=r"cond_mask_prob is a probability, got 1\.5"):
        DataConfig(cond_mask_prob=1.5)


@pytest.mark.parametrize("bad, message", [
    (dict(learning_rate=float("nan")), "learning_rate must be a finite number > 0"),
    (dict(learning_rate=0.0), "learning_rate must be a finite number > 0"),
    (dict(b2=1.0), r"b1 and b2 must lie in \[0, 1\)"),
    (dict(eps=0.0), "eps must be a finite number > 0"),
    (dict(max_grad_norm=-1.0), "max_grad_norm must be a finite number >= 0"),
    (dict(weight_decay=float("inf")), "weight_decay must be a finite number >= 0"),
    (dict(warmup_steps=-5), "warmup_steps must be >= 0"),
    (dict(decay_steps=0), "decay_steps must be >= 1"),
    (dict(schedule="cosine", warmup_steps=4, decay_steps=2), "decay_steps 2 must exceed warmup_steps 4"),
])
def test_optimizer_settings_that_would_break_adamw_are_refused(bad, message):
    """Each of these turns a finite gradient into a NaN/inf or meaningless update (an audit's NaN
    parameters came from --optim.learning-rate nan and --optim.eps 0)."""
    with pytest.raises(ValueError, match=f"^optim: .*{message}"):
        OptimConfig(**bad)


def test_sharding_rules():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    assert spec_for("model/lang_blocks/attn/qkv/kernel", (14, 2048, 6144), mesh) == PartitionSpec(None, "fsdp", None)
    assert spec_for("lang_adaptor/layers/0/kernel", (4096, 2048), mesh) == PartitionSpec("fsdp", None)
    assert spec_for("model/x_pos_embed", (1, 67, 2048), mesh) == PartitionSpec(None, None, "fsdp")
    assert spec_for("model/img_blocks/norm1/weight", (14, 2048), mesh) == PartitionSpec(None, None)
    assert spec_for("lang_adaptor/layers/0/bias", (2048,), mesh) == PartitionSpec(None)
    assert spec_for("lang_adaptor/layers/0/kernel", (4094, 2048), mesh) == PartitionSpec(None, None)  # 4 ∤ 4094
    # optimiser-state leaves carry the parameter path as a suffix: same layout
    opt = {"0": {"mu": {"model": {"x_pos_embed": jax.ShapeDtypeStruct((1, 67, 2048), jnp.float32)}}},
           "count": jax.ShapeDtypeStruct((), jnp.int32)}
    sh = tree_shardings(opt, mesh)
    assert sh["0"]["mu"]["model"]["x_pos_embed"].spec == PartitionSpec(None, None, "fsdp")
    assert sh["count"].spec == PartitionSpec()


def test_official_metrics_by_hand():
    pred = np.zeros((2, 3, 4), np.float32)
    act = np.ones((2, 3, 4), np.float32)
    act[1] = 2.0
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], np.float32)
    norm = np.full((2, 4), 1.0, np.float32)
    m = val.batch_metrics(pred, act, mask, norm)
    # sample 0: 6 entries of error 1; sample 1: 3 entries of error 4 -> batch (6 + 12) / 9
    assert m["mse"] == pytest.approx(18 / 9)
    np.testing.assert_allclose(m["sample_mse"], [1.0, 4.0])
    np.testing.assert_allclose(m["sample_l2err"], [1 / 1.001, 2 / 1.001], rtol=1e-6)
    agg = val.aggregate([m, m], [np.array([0, 1]), np.array([0, 1])], ["a", "b"])
    assert agg["overall_avg_sample_mse"] == 2.0 and agg["a_sample_mse"] == 1.0 and agg["b_sample_mse"] == 4.0
    # Two devices of one sample each: their local ratios 1 and 4 averaged, not the pooled 18 / 9.
    two = val.batch_metrics(pred, act, mask, norm, shards=2)
    assert two["mse"] == pytest.approx(2.5)
    assert two["l2err"] == pytest.approx((1 / 1.001 + 2 / 1.001) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="does not split"):
        val.batch_metrics(pred, act, mask, norm, shards=3)
    # A NaN sample makes its dataset's value NaN, as the official sums do (an average without it hid it).
    bad = pred.copy()
    bad[1, 0, 0] = np.nan
    agg = val.aggregate([m, val.batch_metrics(bad, act, mask, norm)], [np.array([0, 1])] * 2, ["a", "b"])
    assert agg["a_sample_mse"] == 1.0 and np.isnan(agg["b_sample_mse"]) and np.isnan(agg["b_sample_l2err"])


def _toy_state(mesh):
    x = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    state = {"step": np.int32(3), "params": {"model": {"x_pos_embed": x[None]}, "k": {"kernel": x}},
             "rng": np.array([1, 2], np.uint32)}
    return jax.device_put(state, tree_shardings(state, mesh))


def test_checkpoint_pruning_and_restore_onto_another_mesh(tmp_path):
    mesh_a = make_mesh(MeshConfig(data=1, fsdp=8))
    state = _toy_state(mesh_a)
    assert state["params"]["k"]["kernel"].sharding.spec == PartitionSpec("fsdp", None)
    mngr = ckpt.make_manager(tmp_path / "ck", CheckpointConfig(max_to_keep=2, keep_period=4))
    for s in range(1, 8):
        ckpt.save(mngr, s, state, {"next_index": s}, {"step": s})
    mngr.wait_until_finished()
    assert sorted(mngr.all_steps()) == [4, 6, 7]  # last two + multiples of keep_period
    mngr.close()
    # a different mesh (4 x 2): the target's shardings decide the restored layout
    mesh_b = make_mesh(MeshConfig(data=4, fsdp=2))
    mngr = ckpt.make_manager(tmp_path / "ck", CheckpointConfig(max_to_keep=2))
    abstract = jax.eval_shape(lambda: jax.device_get(state))
    target = ckpt.abstract_with_shardings(abstract, tree_shardings(abstract, mesh_b))
    restored, data_state, meta = ckpt.restore(mngr, None, target)
    assert meta["step"] == 7 and data_state == {"next_index": 7}
    k = restored["params"]["k"]["kernel"]
    assert k.sharding == NamedSharding(mesh_b, PartitionSpec("fsdp", None))
    assert len(k.addressable_shards[0].data) == 4  # 8 rows over fsdp=2
    np.testing.assert_array_equal(np.asarray(k), np.asarray(state["params"]["k"]["kernel"]))
    mngr.close()


def test_pretrain_preset_ships_the_official_lists(shared_dir):
    """The pretrain preset's weights, dataset list and statistics are packaged copies of the official files,
    usable from any working directory."""
    from rdt_jax.training.config import PRESETS
    from rdt_jax.training.data import _dataset_list

    data = PRESETS["pretrain"]().data
    for path in (data.weights_file, data.datasets_file, data.stats_file):
        name = pathlib.Path(path).name
        assert pathlib.Path(path).is_absolute()
        assert pathlib.Path(path).read_bytes() == (shared_dir / "reference" / "data" / name).read_bytes()
    names = _dataset_list(data.datasets_file, ["fractal20220817_data"])
    assert len(names) == 46 and names[0] == "fractal20220817_data"


def test_unsharded_fraction_flags_fsdp_sizes_that_do_not_divide():
    from jax.sharding import Mesh

    from rdt_jax.training.sharding import unsharded_fraction

    tree = {"lang_adaptor": {"layers": {"0": {"kernel": jax.ShapeDtypeStruct((4096, 2048), jnp.float32),
                                              "bias": jax.ShapeDtypeStruct((2048,), jnp.float32)}}}}
    devices = np.array(jax.devices())
    six = Mesh(devices[:6].reshape(1, 6), ("data", "fsdp"))
    four = Mesh(devices[:4].reshape(1, 4), ("data", "fsdp"))
    kernel_share = 4096 * 2048 / (4096 * 2048 + 2048)
    assert unsharded_fraction(tree, six) == pytest.approx(kernel_share)  # 6 divides neither 4096 nor 2048
    assert unsharded_fraction(tree, four) == 0.0  # the bias is replicated by rule, not by fallback


def test_training_image_encoder_is_laid_out_by_its_axis_rules():
    """The frozen SigLIP of the train step follows SIGLIP_SHARDING_RULES (width over fsdp), not replication."""
    from rdt_jax.training.config import PRESETS
    from rdt_jax.training.train_step import make_image_encoder

    enc = make_image_encoder(PRESETS["debug"]().image_encoder, 0, make_mesh(MeshConfig(data=2, fsdp=4)))
    fc1 = enc.params["layers"][0]["fc1_kernel"][...]
    assert fc1.sharding.spec == PartitionSpec("fsdp", None)
    assert {s.data.shape for s in fc1.addressable_shards} == {(fc1.shape[0] // 4, fc1.shape[1])}


def test_training_encoder_normalises_uint8_pixels_as_the_host_does():
    """uint8 batches are normalised on the device with the host's table: the same image tokens as from the
    float32 values serving computes (image_transform.normalize), bit for bit."""
    from rdt_jax.data.image_transform import normalize
    from rdt_jax.training.config import PRESETS
    from rdt_jax.training.train_step import make_image_encoder

    enc = make_image_encoder(PRESETS["debug"]().image_encoder, 0)
    s = enc.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (2, 6, 3, s, s), dtype=np.uint8)
    host = normalize(pixels)
    a = enc.encode(enc.params, jnp.asarray(pixels))
    b = enc.encode(enc.params, jnp.asarray(host))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_data_options_of_another_kind_are_refused():
    from rdt_jax.training.config import DataConfig

    with pytest.raises(ValueError, match=r"data.kind is 'demo', which does not use --data.hdf5-dir"):
        DataConfig(kind="demo", hdf5_dir="my_episodes")
    with pytest.raises(ValueError, match=r"does not use --data.robot"):
        DataConfig(kind="demo", robot="my_robot.json")
    with pytest.raises(ValueError, match=r"'hdf5', which does not use --data.rlds-dirs"):
        DataConfig(kind="hdf5", rlds_dirs=("a",))
    DataConfig(kind="hdf5", hdf5_dir="my_episodes", robot="my_robot.json")  # fine


def test_resume_warns_about_changed_settings_by_name_but_not_reader_speed(capsys):
    import dataclasses

    from rdt_jax.training.config import PRESETS
    from rdt_jax.training.loop import _config_json, check_resumable
    cfg = PRESETS["debug"]().replace(num_steps=10)
    meta = {"train_config": _config_json(cfg)}
    faster = cfg.replace(data=dataclasses.replace(cfg.data, num_threads=cfg.data.num_threads + 3,
                                                  prefetch=cfg.data.prefetch * 2))
    check_resumable(meta, None, faster, 5)  # no model config saved: not compared
    assert capsys.readouterr().out == ""
    other = faster.replace(data=dataclasses.replace(faster.data, cond_mask_prob=0.3), seed=cfg.seed + 1)
    check_resumable(meta, None, other, 5)
    out = capsys.readouterr().out
    assert "with changed seed, data.cond_mask_prob: not the run it continues" in out
    # Master-weight and compute dtypes and the EMA schedule change the run too (the restore casts the
    # float32 master weights to bf16 silently).
    bf16 = cfg.replace(model=dataclasses.replace(cfg.model, param_dtype="bfloat16"),
                       ema=dataclasses.replace(cfg.ema, power=0.5))
    check_resumable(meta, None, bf16, 5)
    assert "with changed model.param_dtype, ema.power: not the run it continues" in capsys.readouterr().out


def test_image_encoder_options_of_another_kind_are_refused():
    """--image-encoder.path with the random tower (debug/demo) trained on random features silently."""
    from rdt_jax.training.config import ImageEncoderConfig

    with pytest.raises(ValueError, match=r"'random_tiny', which does not use --image-encoder\.path; set "
                                         r"--image-encoder\.kind siglip"):
        ImageEncoderConfig(kind="random_tiny", path="/ckpts/siglip")
    with pytest.raises(ValueError, match=r"'siglip', which does not use --image-encoder\.image-size$"):
        ImageEncoderConfig(kind="siglip", path="/ckpts/siglip", image_size=224)
    ImageEncoderConfig(kind="random_tiny", hidden_size=64)  # fine


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"kind": "random_tiny", "colour": "red"}'])
def test_a_damaged_image_encoder_record_is_named(tmp_path, text):
    from rdt_jax.training.train_step import load_exported_image_encoder

    (tmp_path / "image_encoder.json").write_text(text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'image_encoder.json'))}: not an image encoder"):
        load_exported_image_encoder(tmp_path)
