"""``scripts/train.py debug`` end to end: exact resume (clean stop and kill -9), the exported inference
layout, NaN stop; and a two-process jax.distributed train step on 127.0.0.1."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import rdt_jax
from rdt_jax.training.config import PRESETS, CheckpointConfig
from rdt_jax.training.loop import NonFiniteLossError, train

REPO = pathlib.Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, str(REPO / "scripts" / "train.py"), "debug", "--log.no-progress-bar"]
N = 16


def _run(out, *args, timeout=300):
    p = subprocess.run([*TRAIN, "--output-dir", str(out), *args], capture_output=True, text=True, timeout=timeout,
                       cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _losses(out) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _ckpt_state(out, step):
    return ocp.StandardCheckpointer().restore(pathlib.Path(out).absolute() / "checkpoints" / str(step) / "state")


def _assert_same_tree(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    _run(out, "--num-steps", str(N), "--save-every", "2")
    return out


def _check_same_as_reference(out, reference):
    ref = dict(_losses(reference))
    got = _losses(out)
    assert {s for s, _ in got} == set(range(1, N + 1))
    for step, loss in got:  # every logged loss, including steps redone after a kill, is bit-identical
        assert loss == ref[step], (step, loss, ref[step])
    _assert_same_tree(_ckpt_state(out, N), _ckpt_state(reference, N))


def test_debug_run_exports_loadable_inference_dir(reference):
    runner = rdt_jax.load_pretrained(reference)
    final = _ckpt_state(reference, N)["params"]
    got = runner.param_dict()
    assert runner.config.hidden_size == 32
    np.testing.assert_array_equal(got["model"]["x_pos_embed"], final["model"]["x_pos_embed"])
    np.testing.assert_array_equal(got["lang_adaptor"]["layers"][0]["kernel"],
                                  final["lang_adaptor"]["layers"]["0"]["kernel"])
    assert (reference / "ema" / "config.json").is_file() and (reference / "dataset_stat.json").is_file()
    assert sorted(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit()) == [N - 2, N]


def test_exact_resume_after_clean_stop(tmp_path, reference):
    _run(tmp_path, "--num-steps", "6", "--save-every", "2")
    _run(tmp_path, "--num-steps", str(N), "--save-every", "2", "--resume")
    _check_same_as_reference(tmp_path, reference)


def test_exact_resume_after_kill_9(tmp_path, reference):
    proc = subprocess.Popen([*TRAIN, "--output-dir", str(tmp_path), "--num-steps", "100000", "--save-every", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    ck = tmp_path / "checkpoints"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # kill as soon as one checkpoint is committed (renamed into place)
            if ck.is_dir() and any(p.name.isdigit() for p in ck.iterdir()):
                break
            assert proc.poll() is None, "training exited early"
            time.sleep(0.02)
        else:
            pytest.fail("no checkpoint committed in time")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    committed = sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit())
    assert committed and committed[-1] < N, f"killed too late (checkpoints {committed}); raise N"
    _run(tmp_path, "--num-steps", str(N), "--save-every", "2", "--resume")
    _check_same_as_reference(tmp_path, reference)


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


WORKER = r'''
import os, sys, json
sys.path.insert(0, sys.argv[4])
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from tests.training import tiny
from rdt_jax.training.loop import _to_global
setup = tiny.setup()
mesh, state, step, _ = tiny.build(*setup, (2, 2), devices=jax.devices())
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


def test_two_processes_on_loopback_agree(tmp_path):
    import portpicker

    port = portpicker.pick_unused_port()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i), str(tmp_path / f"{i}.json"),
                               str(REPO)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    r0, r1 = (json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2))
    assert r0 == r1
    assert all(np.isfinite(r0["losses"]))
