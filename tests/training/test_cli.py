"""``scripts/train.py debug`` end to end: exact resume (clean stop and kill -9), the exported inference
layout, NaN stop; and a two-process jax.distributed train step on 127.0.0.1."""

import dataclasses
import json
import os
import pathlib
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import rdt_jax
from rdt_jax.training.checkpoints import export_inference
from rdt_jax.training.config import PRESETS, CheckpointConfig
from rdt_jax.training.loop import NonFiniteLossError, RunSetupError, check_finite, train
from rdt_jax.training.train_step import rdt_config
from tests.helpers import run_together
from tests.training import tiny
from tests.training.conftest import CACHE_ENV

REPO = pathlib.Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, str(REPO / "scripts" / "train.py"), "debug", "--log.no-progress-bar"]
N, SAVE = 16, "4"
ENV = dict(os.environ, **CACHE_ENV)


def _cmd(out, *args):
    return [*TRAIN, "--output-dir", str(out), "--save-every", SAVE, *args]


def _run(out, *args, timeout=300):
    p = subprocess.run(_cmd(out, *args), capture_output=True, text=True, timeout=timeout, cwd=REPO, env=ENV)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _losses(out) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _committed(out) -> list[int]:
    ck = pathlib.Path(out) / "checkpoints"
    return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) if ck.is_dir() else []


def _ckpt_state(out, step):
    return ocp.StandardCheckpointer().restore(pathlib.Path(out).absolute() / "checkpoints" / str(step) / "state")


def _assert_same_tree(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted reference run (N steps) and the first leg of the interrupted run (a clean stop
    after 6 steps), started together: they are independent and the machine has two cores."""
    ref, chain = tmp_path_factory.mktemp("ref"), tmp_path_factory.mktemp("chain")
    # The reference keeps 3 checkpoints so that the interrupted run's intermediate ones can be compared.
    cmds = [_cmd(ref, "--num-steps", str(N), "--checkpoint.max-to-keep", "3"), _cmd(chain, "--num-steps", "6")]
    run_together(cmds, [ENV, ENV], timeout=300, cwd=REPO)
    return ref, chain


def test_debug_run_exports_loadable_inference_dir(runs):
    reference, _ = runs
    runner = rdt_jax.load_pretrained(reference)
    final = _ckpt_state(reference, N)["params"]
    got = runner.param_dict()
    assert runner.config.hidden_size == 32
    np.testing.assert_array_equal(got["model"]["x_pos_embed"], final["model"]["x_pos_embed"])
    np.testing.assert_array_equal(got["lang_adaptor"]["layers"][0]["kernel"],
                                  final["lang_adaptor"]["layers"]["0"]["kernel"])
    assert (reference / "ema" / "config.json").is_file() and (reference / "dataset_stat.json").is_file()
    # Serving needs, beside the weights: the statistics, the robot mapping and the image encoder trained with
    # (here the random tower, rebuilt from its seed), in the export and in its ema/.
    from rdt_jax.data.robot_config import load_robot_config
    from rdt_jax.training.config import PRESETS
    from rdt_jax.training.train_step import load_exported_image_encoder, make_image_encoder

    for d in (reference, reference / "ema"):
        assert {"dataset_stat.json", "robot.json", "image_encoder.json"} <= {p.name for p in d.iterdir()}
    assert load_robot_config(reference / "robot.json").ctrl_freq == 25
    debug = PRESETS["debug"]()
    trained_with = make_image_encoder(debug.image_encoder, debug.seed)
    served = load_exported_image_encoder(reference / "ema")
    for a, b in zip(jax.tree.leaves(served.params), jax.tree.leaves(trained_with.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    assert _committed(reference) == [N - 8, N - 4, N]  # saved every 4, max_to_keep 3: step 4 was pruned


def test_readme_inference_on_a_robot_runs_on_an_export(runs):
    """The README's "Inference on a robot" calls, on a debug run's export: one observation's frames, joints
    and pre-encoded instruction -> (64-step chunk of) 14 joint commands; masked slots stay exactly zero."""
    import jax.numpy as jnp

    from rdt_jax.data import action_space, language
    from rdt_jax.data.robot_config import load_robot_config
    from rdt_jax.encoders.image_encoding import preprocess_images
    from rdt_jax.training.train_step import load_exported_image_encoder

    out, _ = runs
    runner, robot = rdt_jax.load_pretrained(out), load_robot_config(out / "robot.json")
    encoder = load_exported_image_encoder(out)
    rng = np.random.default_rng(0)
    h, w, _ = robot.image_shape
    frames = [None, None, None] + [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(3)]
    pixels = preprocess_images(frames, size=encoder.image_size)
    img_tokens = encoder.encode(encoder.params, jnp.asarray(pixels)[None])
    qpos = rng.uniform(-0.5, 0.5, 14)
    state, mask = action_space.scatter(qpos / robot.state_divisor_array, robot.state_names, dtype=np.float32)
    state, mask = state[None, None], mask[None, None]  # (1, 1, 128) each
    emb = language.load_embedding(out / "demo_data" / "train" / "episode_000" / "lang.safetensors")
    lang, lang_mask = language.pad_embeddings([emb], language.bucket_length(len(emb), runner.config.max_lang_cond_len))
    actions = runner.predict_action(lang, lang_mask, img_tokens, state, mask,
                                    np.array([robot.ctrl_freq], np.float32), rng=jax.random.key(0))
    joints = action_space.extract(np.asarray(actions[0]), robot.action_names) * robot.action_divisor_array
    assert joints.shape == (runner.config.pred_horizon, 14) and np.all(np.isfinite(joints))
    assert np.all(np.asarray(actions)[0][:, np.asarray(mask)[0, 0] == 0] == 0)
    # The padding is masked: the unpadded instruction gives the same actions.
    assert lang.shape[1] > len(emb)
    unpadded = runner.predict_action(emb[None], np.ones((1, len(emb)), bool), img_tokens, state, mask,
                                     np.array([robot.ctrl_freq], np.float32), rng=jax.random.key(0))
    np.testing.assert_allclose(np.asarray(actions), np.asarray(unpadded), rtol=1e-5, atol=1e-6)


def test_exact_resume_after_clean_stop_and_after_kill_9(runs):
    """One run interrupted twice: a clean stop after step 6, then a resumed leg killed with SIGKILL right
    after its first new checkpoint is committed, then resumed to N. Every logged loss (steps redone after
    the kill included) and every checkpoint must be bit-identical to the uninterrupted reference."""
    reference, out = runs
    ref = dict(_losses(reference))
    assert _committed(out) == [4, 6]  # the clean stop saved its final step

    # Leg 2: resume from the clean stop, kill -9 as soon as a checkpoint after step 6 is renamed into place.
    proc = subprocess.Popen(_cmd(out, "--num-steps", "100000", "--resume"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO, env=ENV)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if any(s > 6 for s in _committed(out)):
                break
            assert proc.poll() is None, "training exited early"
            time.sleep(0.02)
        else:
            pytest.fail("no checkpoint committed in time")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    after_clean_stop = [s for s in _committed(out) if s > 6]
    assert after_clean_stop and after_clean_stop[-1] < N, f"killed too late (checkpoints {after_clean_stop}); raise N"
    # exact after the clean stop: the resumed leg's checkpoints equal the reference's at the same steps
    for s in after_clean_stop:
        _assert_same_tree(_ckpt_state(out, s), _ckpt_state(reference, s))

    # Leg 3: resume after the kill, to N.
    _run(out, "--num-steps", str(N), "--resume")
    got = _losses(out)
    # One row per step: the rows the killed leg wrote after its last checkpoint were replaced, not repeated.
    assert [s for s, _ in got] == list(range(1, N + 1))
    for step, loss in got:  # every logged loss, including steps redone after the kill, is bit-identical
        assert loss == ref[step], (step, loss, ref[step])
    _assert_same_tree(_ckpt_state(out, N), _ckpt_state(reference, N))


def test_per_layer_run_checkpoints_stacked_and_resumes_in_either_layout(runs, tmp_path):
    """A run whose state holds the blocks per layer (params, EMA and Adam moments) writes stacked
    checkpoints and a stacked export; a stacked run resumes it and follows the reference run (both
    layouts compute the same step up to float reduction order)."""
    reference, _ = runs
    _run(tmp_path, "--num-steps", SAVE, "--model.layer-layout", "per_layer")
    leg1 = _ckpt_state(tmp_path, int(SAVE))
    assert jax.tree.structure(leg1) == jax.tree.structure(_ckpt_state(reference, N))  # stacked, as any run's
    kernel = leg1["params"]["model"]["lang_blocks"]["attn"]["qkv"]["kernel"]
    assert kernel.ndim == 3 and kernel.shape[0] == PRESETS["debug"]().model.depth // 2  # lang: every 2nd
    assert leg1["opt_state"][1][0]["mu"]["model"]["img_blocks"]["ffn"]["fc1"]["kernel"].ndim == 3
    np.testing.assert_array_equal(rdt_jax.load_pretrained(tmp_path).param_dict()["model"]["lang_blocks"]["attn"]["qkv"]
                                  ["kernel"], kernel)  # the export at the last step

    _run(tmp_path, "--num-steps", str(2 * int(SAVE)), "--resume", "--model.layer-layout", "stacked")
    ref = dict(_losses(reference))
    got = dict(_losses(tmp_path))
    assert set(got) == set(range(1, 2 * int(SAVE) + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(got)], rtol=2e-5)
    a, b = _ckpt_state(tmp_path, 2 * int(SAVE)), _ckpt_state(reference, 2 * int(SAVE))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a["params"]), jax.tree.leaves(b["params"]),
                            strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = PRESETS["debug"]().replace(output_dir=str(tmp_path), num_steps=8,
                                     checkpoint=CheckpointConfig(save_every=2, max_to_keep=2))
    cfg = cfg.replace(log=cfg.log.__class__(progress_bar=False, tensorboard=False))

    def poison(step, batch):
        if step == 3:  # the 4th update
            batch = dict(batch, actions=np.full_like(batch["actions"], np.nan))
        return batch

    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4.*Last good checkpoint: step 2"):
        train(cfg, batch_hook=poison)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2]
    params = _ckpt_state(tmp_path, 2)["params"]
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
    assert not (tmp_path / "params").exists()  # nothing exported from a failed run


def test_resume_and_init_from_guard_against_the_wrong_run(tmp_path):
    """A fresh run over another run's checkpoints, a resume with another model or past --num-steps, and
    --init-from with sizes the checkpoint does not have are refused with a clear message; an export without
    EMA removes an older run's ema/."""
    base = PRESETS["debug"]().replace(output_dir=str(tmp_path), num_steps=2,
                                      checkpoint=CheckpointConfig(save_every=1, max_to_keep=2))
    base = base.replace(log=base.log.__class__(progress_bar=False, tensorboard=False),
                        ema=dataclasses.replace(base.ema, power=0.5))
    train(base)
    assert (tmp_path / "ema" / "config.json").is_file()
    # The exported ema section is the run's EMA schedule, not the preset's default.
    for config in (tmp_path / "config.json", tmp_path / "ema" / "config.json"):
        assert json.loads(config.read_text())["ema"]["power"] == 0.5
    with pytest.raises(RunSetupError, match=r"is the --model\.init-from directory"):
        train(base.replace(resume=True, num_steps=4, model=dataclasses.replace(base.model, init_from=str(tmp_path))))
    with pytest.raises(RunSetupError, match=r"already holds checkpoints \(latest step 2\).*--resume"):
        train(base.replace(seed=7))  # Orbax would have skipped every save of this run
    other = base.replace(resume=True, num_steps=4, model=dataclasses.replace(base.model, hidden_size=64))
    with pytest.raises(ValueError, match=r"checkpoint 2 is of another model \(.*rdt.hidden_size: 32 -> 64\)"):
        train(other)
    with pytest.raises(ValueError, match=r"checkpoint 2 is past --num-steps 1"):
        train(base.replace(resume=True, num_steps=1))
    # Toggling the EMA or clipping changes the saved state's tree: refused before Orbax fails on it.
    with pytest.raises(RunSetupError, match=r"saved with ema_enabled True; it cannot be resumed with False"):
        train(base.replace(resume=True, num_steps=4, ema_enabled=False))
    with pytest.raises(RunSetupError, match=r"saved with gradient clipping .* True; it cannot be resumed with False"):
        train(base.replace(resume=True, num_steps=4, optim=dataclasses.replace(base.optim, max_grad_norm=0.0)))
    with pytest.raises(ValueError, match=r"holds a model with depth 2 \(asked: 3\)"):
        rdt_config(dataclasses.replace(base.model, depth=3, init_from=str(tmp_path)), img_cond_len=24,
                   max_lang_len=8)
    rcfg = rdt_config(dataclasses.replace(base.model, init_from=str(tmp_path)), img_cond_len=24, max_lang_len=8)
    assert (rcfg.hidden_size, rcfg.depth) == (32, 2)
    runner = rdt_jax.load_pretrained(tmp_path)
    export_inference(tmp_path, runner.config, runner.param_dict(), None)
    assert not (tmp_path / "ema").exists() and (tmp_path / "params").is_dir()
    # A damaged latest checkpoint: one line naming it and the older one to fall back on, for a broken
    # metadata file (JSON) and for missing array data (Orbax/TensorStore).
    resume = base.replace(resume=True, num_steps=4)
    latest = tmp_path / "checkpoints" / "2"
    meta = latest / "meta" / "metadata"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])
    fallback = rf"to resume from step 1 instead, move {re.escape(str(latest))} out of"
    with pytest.raises(RunSetupError, match=rf"checkpoint {re.escape(str(latest))} cannot be restored "
                                            rf"\(JSONDecodeError: .*\); {fallback}"):
        train(resume)
    meta.write_text(text)
    shutil.rmtree(latest / "state")
    with pytest.raises(RunSetupError, match=rf"checkpoint {re.escape(str(latest))} cannot be restored .*{fallback}"):
        train(resume)


def test_finite_loss_with_nan_gradients_also_stops():
    check_finite({"loss": 0.5, "grad_norm": 1.0}, 3, lambda: "step 2")  # a healthy step passes
    with pytest.raises(NonFiniteLossError, match=r"loss is 0.5 at step 3 \(grad norm nan\).*step 2"):
        check_finite({"loss": 0.5, "grad_norm": float("nan")}, 3, lambda: "step 2")


def test_non_finite_weights_from_a_finite_step_are_not_saved():
    """An update can turn finite weights NaN from a finite loss and gradient (an audit saved such a checkpoint
    and then named it the last good one): the check before each save stops the run instead."""
    import jax.numpy as jnp

    from rdt_jax.training.loop import check_weights_finite

    state = {"params": {"w": jnp.ones((2, 3))}, "ema": {"w": jnp.ones((2, 3))}, "step": jnp.int32(3)}
    check_weights_finite(state, 3, lambda: "step 2")
    for bad in ("params", "ema"):
        broken = {**state, bad: {"w": state[bad]["w"].at[1, 2].set(jnp.inf)}}
        with pytest.raises(NonFiniteLossError, match=r"weights became NaN/inf with step 3's update.*Last good "
                                                     r"checkpoint: step 2"):
            check_weights_finite(broken, 3, lambda: "step 2")


WORKER = r'''
import os, sys, json, pickle
sys.path.insert(0, sys.argv[4])
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_compilation_cache_dir", os.environ["RDT_JAX_COMPILATION_CACHE"])
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from tests.training import tiny
from rdt_jax.training.loop import _to_global
setup = tiny.setup()
with open(sys.argv[5], "rb") as f:  # the parent's initial params: no initialiser to compile here
    params = pickle.load(f)
mesh, state, step, _ = tiny.build(*setup, (2, 2), devices=jax.devices(), params=params)
pid = jax.process_index()
losses = []
for i in range(2):
    b = tiny.batch(i)
    local = {k: v[pid * 4:(pid + 1) * 4] for k, v in b.items()}  # this process's rows of the global batch
    state, m = step(state, None, _to_global(local, mesh))
    losses.append(float(m["loss"]))
from jax.experimental import multihost_utils
k = multihost_utils.process_allgather(state["params"]["model"]["x_pos_embed"], tiled=True)
json.dump({"losses": losses, "sum": float(np.asarray(k, np.float64).sum())}, open(sys.argv[3], "w"))
'''


def _two_processes(script, args, timeout: int) -> list[str]:
    """Runs ``script COORDINATOR PROCESS_ID *args(i)`` as processes 0 and 1 on 127.0.0.1, 2 CPU devices each."""
    import portpicker

    port = portpicker.pick_unused_port()
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    return run_together([[sys.executable, str(script), f"127.0.0.1:{port}", str(i), *map(str, args(i))]
                         for i in range(2)], [env, env], timeout=timeout, cwd=REPO)


def test_two_processes_on_loopback_agree(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    params = tmp_path / "params.pkl"
    params.write_bytes(pickle.dumps(tiny.initial_params(tiny.setup()[0])))
    _two_processes(script, lambda i: (tmp_path / f"{i}.json", REPO, params), timeout=240)
    r0, r1 = (json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2))
    assert r0 == r1
    assert all(np.isfinite(r0["losses"]))


TRAIN_WORKER = r'''
import dataclasses, os, sys
sys.path.insert(0, sys.argv[3])
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_compilation_cache_dir", os.environ["RDT_JAX_COMPILATION_CACHE"])
from rdt_jax.training.config import PRESETS, LogConfig, MeshConfig
from rdt_jax.training.loop import train
from rdt_jax.data import language
cfg = PRESETS["debug"]()
cfg = cfg.replace(output_dir=sys.argv[4], num_steps=2, log=LogConfig(progress_bar=False, tensorboard=False),
                  mesh=MeshConfig(coordinator=sys.argv[1], num_processes=2, process_id=int(sys.argv[2])),
                  data=dataclasses.replace(cfg.data, max_lang_len=32))

def longer_language(step, batch):
    # "bucket" padding gives every batch here 16 tokens; process 1's second one gets 32, as if it held a
    # longer instruction: both processes must feed the step 32.
    if jax.process_index() == 1 and step == 1:
        lang, mask = language.extend_padding(batch["lang_embeds"], batch["lang_attn_mask"], 32)
        batch = dict(batch, lang_embeds=lang, lang_attn_mask=mask)
    return batch

train(cfg, batch_hook=longer_language)
'''


def test_two_process_run_exports_and_resumes_on_one_process(tmp_path, capsys):
    """The whole loop on two processes (2 CPU devices each): it ends, with the export written by process 0
    alone (a collective save there used to hang the run), and one process resumes its checkpoint. In step
    2 one process's batch has longer language padding than the other's: they agree on one length."""
    script = tmp_path / "train_worker.py"
    script.write_text(TRAIN_WORKER)
    out = tmp_path / "run"
    outputs = _two_processes(script, lambda i: (REPO, out), timeout=300)
    assert "train step compiled for 32 language tokens" in outputs[0]
    assert rdt_jax.load_pretrained(out).config.hidden_size == 32 and (out / "ema" / "params").is_dir()
    assert len(_losses(out)) == 2 and np.isfinite([loss for _, loss in _losses(out)]).all()
    cfg = PRESETS["debug"]().replace(output_dir=str(out), num_steps=3, resume=True)
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, max_lang_len=32))
    cfg = cfg.replace(log=cfg.log.__class__(progress_bar=False, tensorboard=False))
    summary = train(cfg)
    assert (summary["start_step"], summary["final_step"]) == (2, 3) and np.isfinite(summary["losses"]).all()
    # Compiled before the loop: reported on its own, not inside step 1's time.
    assert summary["compile_s"] > 0 and "train step compiled in" in capsys.readouterr().out


def test_bf16_adam_moments_resume_exactly(tmp_path):
    """Moments stored in bfloat16 (stochastic rounding keyed by the step) are checkpointed as bfloat16,
    and a stop + resume continues bit-exactly."""
    base = PRESETS["debug"]().replace(num_steps=6, checkpoint=CheckpointConfig(save_every=2, max_to_keep=1))
    base = base.replace(log=base.log.__class__(progress_bar=False, tensorboard=False, log_every=4),
                        optim=dataclasses.replace(base.optim, mu_dtype="bfloat16", nu_dtype="bfloat16"))
    train(base.replace(output_dir=str(tmp_path / "ref")))
    train(base.replace(output_dir=str(tmp_path / "run"), num_steps=4))
    train(base.replace(output_dir=str(tmp_path / "run"), resume=True))
    ref, got = _ckpt_state(tmp_path / "ref", 6), _ckpt_state(tmp_path / "run", 6)
    adam = got["opt_state"][1][0]
    assert {x.dtype for x in jax.tree.leaves((adam["mu"], adam["nu"]))} == {np.dtype("bfloat16")}
    _assert_same_tree(got, ref)
    # Logged every 4 steps and at each leg's last step.
    assert dict(_losses(tmp_path / "run")) == dict(_losses(tmp_path / "ref"))
    assert [s for s, _ in _losses(tmp_path / "ref")] == [4, 6]


def test_corrupt_episode_is_a_one_line_error(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "e.hdf5").write_bytes(b"junk")
    p = subprocess.run(_cmd(tmp_path / "run", "--data.kind", "hdf5", "--data.hdf5-dir", str(tmp_path / "data")),
                       capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"[rdt-jax] ERROR: {tmp_path / 'data' / 'e.hdf5'}: cannot open HDF5 file" in p.stderr
    assert "Traceback" not in p.stderr


def test_malformed_robot_config_is_a_one_line_error(tmp_path):
    (tmp_path / "data").mkdir()
    robot = tmp_path / "my_robot.json"
    robot.write_text('{"name": "my_robot", "state_names": ["left_arm_joint_0_pos"], "jpeg_color": "bgr"')
    p = subprocess.run(_cmd(tmp_path / "run", "--data.kind", "hdf5", "--data.hdf5-dir", str(tmp_path / "data"),
                            "--data.robot", str(robot)),
                       capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"[rdt-jax] ERROR: {robot}: not a JSON robot config" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("args", [
    ("finetune-hdf5",),  # no SigLIP checkpoint, no data directory
    ("finetune-hdf5", "--image-encoder.kind", "random_tiny", "--model.preset", "tiny"),  # no data directory
])
def test_missing_required_options_are_one_line_errors(tmp_path, args):
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), *args, "--output-dir", str(tmp_path / "run")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith("[rdt-jax] ERROR: ") and "needs" in p.stderr
    assert "Traceback" not in p.stderr
