"""The training loop, top to bottom: devices -> model -> data -> state (fresh or resumed) -> steps -> export.

One code path for 1 CPU, 8 GPUs or a pod slice: the mesh decides the layout, every process feeds its
own share of each global batch, and Orbax saves/restores the sharded state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from rdt_jax.data import language
from rdt_jax.model.config import RDTConfig
from rdt_jax.model.layer_layout import to_layer_layout
from rdt_jax.runner import resolve_layer_layout
from rdt_jax.training import checkpoints as ckpt
from rdt_jax.training.config import ConfigError, TrainConfig
from rdt_jax.training.data import DataBundle, build_data
from rdt_jax.training.logging import MetricWriter
from rdt_jax.training.mesh import make_mesh, maybe_initialize_distributed
from rdt_jax.training.metrics import validation as val
from rdt_jax.training.optimizer import make_optimizer
from rdt_jax.training.sharding import batch_sharding, unsharded_fraction
from rdt_jax.training.train_step import (
    abstract_params,
    init_params,
    init_state,
    make_image_encoder,
    make_sample_step,
    make_train_step,
    rdt_config,
    state_in_layout,
    state_shardings,
    step_batch,
)


class NonFiniteLossError(FloatingPointError):
    """The loss, the gradient norm or the updated weights became NaN/inf; the run stopped without saving the
    bad state."""


class RunSetupError(ConfigError):
    """The output directory holds another run (or one that cannot continue as asked); nothing was changed."""


def check_finite(metrics: dict[str, float], step: int, last_good: Callable[[], str]) -> None:
    """Raise :class:`NonFiniteLossError` if the step's loss or gradient norm is not finite (a finite loss
    with a NaN gradient still writes NaN into the parameters); ``last_good()`` names the last good checkpoint
    (asked only then)."""
    if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
        return
    raise NonFiniteLossError(
        f"loss is {metrics['loss']} at step {step} (grad norm {metrics['grad_norm']}); stopping without saving. "
        f"Last good checkpoint: {last_good()}. Check the data for NaN/inf or lower the learning rate, then --resume.")


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def check_weights_finite(state: dict[str, Any], step: int, last_good: Callable[[], str]) -> None:
    """Raise :class:`NonFiniteLossError` if step ``step``'s update left NaN/inf in the parameters or their EMA
    although its loss and gradient were finite (e.g. an Adam update 0/0); checked before each save, so a
    checkpoint never holds such weights (one pass over them per save)."""
    if bool(_all_finite({k: state[k] for k in ("params", "ema") if k in state})):
        return
    raise NonFiniteLossError(
        f"the weights became NaN/inf with step {step}'s update (its loss and gradient norm were finite); stopping "
        f"without saving. Last good checkpoint: {last_good()}. Check the optimiser settings (--optim.*), then "
        "--resume.")


def common_lang_len(batch: dict[str, np.ndarray], gather: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """``batch`` with its language padded to the longest any process has (``gather``: this process's
    value -> every process's). Under "bucket" padding each process pads its own rows to its own
    longest instruction, but the global array they form needs one shape."""
    if "lang_embeds" not in batch:
        return batch
    length = int(np.max(gather(np.int32(batch["lang_embeds"].shape[1]))))
    if length == batch["lang_embeds"].shape[1]:
        return batch
    lang, mask = language.extend_padding(batch["lang_embeds"], batch["lang_attn_mask"], length)
    return {**batch, "lang_embeds": lang, "lang_attn_mask": mask}


def _to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's rows -> one global array per key, split over the mesh's batch axes."""
    out = {}
    nproc = jax.process_count()
    if nproc > 1:
        batch = common_lang_len(batch, multihost_utils.process_allgather)
    for k, v in batch.items():
        v = np.asarray(v)
        shape = (v.shape[0] * nproc, *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v, shape)
    return out


def _gather(x: Any) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1
                      else jax.device_get(x))


def _config_json(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# Settings that change what an exact resume reproduces: warned about when they differ from the checkpoint's.
_RESUME_SETTINGS = ("seed", "batch_size", "grad_accum", "data", "optim", "ema", "model.param_dtype", "model.dtype")
# Settings under those that leave the sample stream and the updates as they were (grain keeps the order
# whatever the number of reader threads and the buffer size).
_SPEED_ONLY_SETTINGS = ("data.num_threads", "data.prefetch")


def data_state_for(state: dict[str, Any], saved_processes: int, processes: int) -> dict[str, Any]:
    """The data iterator state of a checkpoint written by ``saved_processes`` processes, for ``processes``.

    Process p of P reads the global samples p, p + P, p + 2P, ... (rdt_jax.data.pipeline), so a local
    position n means n * P global samples were consumed by all processes together; with P' processes
    that is the local position n * P / P' (the checkpoint holds process 0's state, which all share).
    """
    if saved_processes == processes:
        return state
    if set(state) != {"next_index"}:
        raise RunSetupError(f"cannot move data iterator state {state} from {saved_processes} to {processes} processes")
    consumed = int(state["next_index"]) * saved_processes
    if consumed % processes:
        raise RunSetupError(f"{consumed} samples were consumed by {saved_processes} processes, which {processes} "
                            "processes cannot continue evenly")
    return {"next_index": consumed // processes}


def _last_good(mngr) -> str:
    mngr.wait_until_finished()  # a save in flight is the last good one
    good = mngr.latest_step()
    return f"step {good} in {mngr.directory}" if good is not None else "none (no checkpoint saved yet)"


def _unrestorable(mngr, step: int, error: Exception) -> RunSetupError:
    """The error for a latest checkpoint that cannot be restored, naming it and the older ones to fall back on."""
    older = [s for s in mngr.all_steps() if s < step]
    reason = (str(error).strip().splitlines() or [""])[0][:300]
    fallback = (f"to resume from step {max(older)} instead, move {mngr.directory / str(step)} out of "
                f"{mngr.directory}" if older else "no older checkpoint is kept")
    return RunSetupError(f"checkpoint {mngr.directory / str(step)} cannot be restored ({type(error).__name__}: "
                         f"{reason}); {fallback}")


def _inference_files(cfg: TrainConfig, data: DataBundle) -> dict[str, str]:
    """What serving needs beside the weights, written into the export (and its ema/): the statistics, the
    robot mapping (joints <-> unified slots, gripper divisors, cameras, control frequency; HDF5/demo data)
    and the frozen image encoder (its checkpoint path made absolute; a random tower's seed)."""
    encoder = dataclasses.asdict(cfg.image_encoder)
    if encoder["path"] is not None:
        encoder["path"] = str(pathlib.Path(encoder["path"]).absolute())
    if cfg.image_encoder.kind == "random_tiny":
        encoder["seed"] = cfg.seed
    files = {"dataset_stat.json": data.stats, "image_encoder.json": encoder}
    if data.robot is not None:
        files["robot.json"] = data.robot
    return {name: json.dumps(content, indent=2) + "\n" for name, content in files.items()}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resumable(meta: dict[str, Any], rcfg: RDTConfig, cfg: TrainConfig, step: int) -> None:
    """Refuse to resume a checkpoint of another model or past ``num_steps``; warn about changed settings."""
    where = f"checkpoint {step}"
    saved = meta.get("rdt_config")
    if saved is not None and saved != rcfg.to_official():
        saved, now = _flat(saved), _flat(rcfg.to_official())
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        changes = ", ".join(f"{k}: {saved.get(k)} -> {now.get(k)}" for k in diff)
        raise RunSetupError(f"{where} is of another model ({changes}); resume with the run's own preset and "
                            "options, or give another --output-dir")
    if step > cfg.num_steps:
        raise RunSetupError(f"{where} is past --num-steps {cfg.num_steps}; give --num-steps >= {step} to continue")
    old, new = meta.get("train_config") or {}, _config_json(cfg)
    # These change the saved state's tree (an EMA; the clipping entry of the optimiser state).
    was_clipping = old.get("optim", {}).get("max_grad_norm", 0) > 0 if "optim" in old else None
    clipping = cfg.optim.max_grad_norm > 0
    for name, before, now in (("ema_enabled", old.get("ema_enabled"), cfg.ema_enabled),
                              ("gradient clipping (optim.max_grad_norm > 0)", was_clipping, clipping)):
        if before is not None and before != now:
            raise RunSetupError(f"{where} was saved with {name} {before}; it cannot be resumed with {now}. Resume "
                                "with the run's setting, or start a new run from it with --model.init-from")
    before, after = _flat(old), _flat(new)
    watched = [k for k in before if any(k == s or k.startswith(f"{s}.") for s in _RESUME_SETTINGS)]
    changed = [k for k in watched if before[k] != after.get(k) and k not in _SPEED_ONLY_SETTINGS]
    if cfg.optim.schedule == "cosine" and cfg.optim.decay_steps is None and old.get("num_steps") != cfg.num_steps:
        changed.append("num_steps (the cosine schedule's length; fix it with --optim.decay-steps)")
    if changed and jax.process_index() == 0:
        print(f"[rdt-jax] warning: resuming {where} with changed {', '.join(changed)}: not the run it continues",
              flush=True)


def train(cfg: TrainConfig, *, batch_hook: Callable[[int, dict], dict] | None = None) -> dict[str, Any]:
    """Runs (or resumes) ``cfg``; returns a summary. ``batch_hook(step, batch)`` may alter host batches
    (tests inject faults with it)."""
    t_start = time.perf_counter()
    # ---- devices
    maybe_initialize_distributed(cfg.mesh)
    mesh = make_mesh(cfg.mesh)
    nproc, is_main = jax.process_count(), jax.process_index() == 0
    n_dev = mesh.devices.size
    checked = [("batch_size (per micro-batch)", cfg.batch_size // cfg.grad_accum)]
    if cfg.validation.every > 0:
        checked.append(("validation.batch_size", cfg.validation.batch_size))
    for name, b in checked:
        if b % n_dev or b % nproc:
            raise ConfigError(f"{name} {b} must be divisible by the {n_dev} devices")
    out = pathlib.Path(cfg.output_dir).absolute()
    if cfg.model.init_from is not None and pathlib.Path(cfg.model.init_from).resolve() == out.resolve():
        raise RunSetupError(f"--output-dir {out} is the --model.init-from directory: the run's export would replace "
                            "the weights it starts from; give another --output-dir")
    if out.exists() and not out.is_dir():
        raise RunSetupError(f"--output-dir {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)

    # ---- model + frozen image encoder
    encoder = make_image_encoder(cfg.image_encoder, cfg.seed, mesh)
    if encoder is not None:
        img_cond_len = 6 * encoder.num_tokens_per_image
        rcfg = rdt_config(cfg.model, img_cond_len=img_cond_len, max_lang_len=cfg.data.max_lang_len)
        if cfg.model.preset == "tiny" and cfg.model.init_from is None:
            rcfg = rcfg.replace(img_token_dim=encoder.token_dim)
        if (rcfg.img_cond_len, rcfg.img_token_dim) != (img_cond_len, encoder.token_dim):
            raise ConfigError(f"the image encoder gives {img_cond_len} tokens x {encoder.token_dim}, the model "
                             f"expects {rcfg.img_cond_len} x {rcfg.img_token_dim}")
        image_size = encoder.image_size
    else:
        raise ConfigError("image_encoder.kind=features is for benchmarks (scripts/bench_train.py), not for training")
    if cfg.data.max_lang_len > rcfg.max_lang_cond_len:
        raise ConfigError(f"data.max_lang_len {cfg.data.max_lang_len} > the model's {rcfg.max_lang_cond_len}")
    tx, schedule = make_optimizer(cfg.optim, cfg.num_steps)

    # ---- data (this process's share of every global batch)
    data: DataBundle = build_data(
        cfg.data, output_dir=str(out), local_batch=cfg.batch_size // nproc,
        local_sample_batch=cfg.validation.batch_size // nproc if cfg.validation.every > 0 else 0,
        image_size=image_size, horizon=rcfg.pred_horizon, seed=cfg.seed,
        process_index=jax.process_index(), process_count=nproc)
    train_iter = iter(data.train)

    # ---- state: resumed from the latest committed checkpoint, or fresh. Checkpoints hold the blocks
    # stacked; the state holds them as the step runs them (layout).
    layout = resolve_layer_layout(cfg.model.layer_layout)
    mngr = ckpt.make_manager(out / "checkpoints", cfg.checkpoint)
    fresh = lambda params: init_state(params, tx, cfg.seed, cfg.ema_enabled)
    ckpt_abstract = jax.eval_shape(fresh, abstract_params(rcfg))
    ckpt_shardings = state_shardings(ckpt_abstract, mesh)
    abstract = state_in_layout(ckpt_abstract, layout)
    lost = unsharded_fraction(ckpt_abstract["params"], mesh)
    if lost > 0.1 and is_main:
        print(f"[rdt-jax] warning: fsdp={mesh.shape['fsdp']} does not divide the model's widths: {lost:.0%} of the "
              "parameter bytes (and their Adam moments and EMA) are replicated on every device; choose an fsdp size "
              f"that divides hidden_size {rcfg.hidden_size}", flush=True)
    shardings = state_shardings(abstract, mesh)
    existing = mngr.latest_step()
    if existing is not None and not cfg.resume:
        # Orbax would skip every save at or below the old latest step: the new run would silently not be saved.
        raise RunSetupError(f"{mngr.directory} already holds checkpoints (latest step {existing}): pass --resume "
                            "to continue that run, or give another --output-dir")
    latest = existing if cfg.resume else None
    if latest is not None:
        try:
            saved_meta = ckpt.restore_meta(mngr, latest)
        except Exception as e:  # a truncated or partly deleted checkpoint: Orbax/TensorStore/JSON errors
            raise _unrestorable(mngr, latest, e) from e
        check_resumable(saved_meta, rcfg, cfg, latest)
        try:
            state, data_state, _ = ckpt.restore(mngr, latest,
                                                ckpt.abstract_with_shardings(ckpt_abstract, ckpt_shardings))
        except Exception as e:
            raise _unrestorable(mngr, latest, e) from e
        state = state_in_layout(state, layout, shardings)
        if data_state:
            train_iter.set_state(data_state_for(data_state, saved_meta.get("process_count", nproc), nproc))
        start = int(state["step"])
        msg = f"resumed from {mngr.directory / str(latest)} (step {start})"
    else:
        params = state_in_layout(init_params(rcfg, cfg.seed, cfg.model.init_from), layout)
        state = jax.jit(fresh, out_shardings=shardings)(params)
        del params
        start = 0
        msg = "fresh start" + (" (--resume: no checkpoint found)" if cfg.resume else "")
        msg += (f", weights from {cfg.model.init_from}" if cfg.model.init_from
                else ", random initial weights (--init-from DIR fine-tunes converted weights)")
    enc_params = encoder.params

    meta = {"rdt_config": rcfg.to_official(), "dataset_names": data.dataset_names, "dataset_stats": data.stats,
            "robot": data.robot, "train_config": _config_json(cfg), "process_count": nproc}
    if is_main:
        (out / "train_config.json").write_text(json.dumps(meta["train_config"], indent=2) + "\n")

    # ---- compiled steps
    first = next(train_iter)
    host_batch = step_batch(first, with_images=True)
    shapes = {k: jax.ShapeDtypeStruct((v.shape[0] * nproc, *v.shape[1:]), v.dtype) for k, v in host_batch.items()}
    step_fn = make_train_step(rcfg, tx, schedule, cfg.ema, mesh, abstract, shapes, encoder,
                              grad_accum=cfg.grad_accum, ema_enabled=cfg.ema_enabled,
                              layer_layout=layout)
    sample_fn = make_sample_step(rcfg, mesh, encoder, cfg.validation.num_inference_steps, layer_layout=layout)
    # Compiled ahead of each step that needs it (one executable per batch shape: under "bucket" language
    # padding a batch has one of a few lengths), so that a step's time (progress bar, metrics) is a step's,
    # not compilation's.
    compiled: dict[tuple[int, ...], Any] = {}
    compile_times: list[float] = []

    def compiled_step(gb: dict[str, jax.Array]):
        shape = tuple(gb["lang_embeds"].shape)
        if shape not in compiled:
            t = time.perf_counter()
            compiled[shape] = step_fn.lower(state, enc_params, gb).compile()
            compile_times.append(time.perf_counter() - t)
            if len(compile_times) > 1:  # the first is reported with the run's start
                report(f"[rdt-jax] train step compiled for {shape[1]} language tokens in {compile_times[-1]:.1f} s")
        return compiled[shape]

    first_global = _to_global(host_batch, mesh)
    compiled_step(first_global)
    compile_s = compile_times[0]
    writer = MetricWriter(out, cfg.log, meta["train_config"], enabled=is_main,
                          resumed_step=start if latest is not None else None)
    if is_main:  # before the bar appears, which would overwrite it
        print(f"[rdt-jax] {msg}; mesh {dict(mesh.shape)} on {n_dev} {jax.devices()[0].platform} device(s), "
              f"{nproc} process(es); train step compiled in {compile_s:.1f} s; output {out}", flush=True)
    pbar = None
    if is_main and cfg.log.progress_bar:
        from tqdm import tqdm

        pbar = tqdm(total=cfg.num_steps, initial=start, desc="train", dynamic_ncols=True, smoothing=0.1)

    def report(line: str) -> None:
        # Through the bar when there is one (it would be overwritten otherwise); printed for logs without it.
        if pbar is not None:
            pbar.write(line)
        elif is_main:
            print(line, flush=True)

    def validate(step: int) -> dict[str, float]:
        it = iter(data.sample)  # a fresh, deterministic stream: every validation sees the same samples
        batches, indices, first_plot = [], [], None
        for i in range(cfg.validation.num_batches):
            vb = next(it)
            gb = _to_global(step_batch(vb, with_images=True), mesh)
            noise = np.random.default_rng([cfg.seed, 77, i]).standard_normal(
                gb["actions"].shape).astype(np.float32)
            pred = _gather(sample_fn(state["params"], enc_params, gb, noise))
            host = {k: _gather(_to_global({k: vb[k]}, mesh)[k])
                    for k in ("actions", "state_elem_mask", "state_norm", "data_indices")}
            batches.append(val.batch_metrics(pred, host["actions"], host["state_elem_mask"], host["state_norm"],
                                             shards=n_dev))
            indices.append(host["data_indices"])
            first_plot = first_plot or (pred, host)
        metrics = val.aggregate(batches, indices, data.dataset_names)
        if is_main and cfg.validation.plot:
            pred, host = first_plot
            png = val.plot_trajectories(out / "validation" / f"step_{step:07d}.png", pred, host["actions"],
                                        host["state_elem_mask"],
                                        title=f"step {step}: mse {metrics['overall_avg_sample_mse']:.4f}")
            writer.image(step, "validation/trajectories", png)
        return metrics

    # ---- the loop
    losses: list[float] = []
    pending = host_batch
    step = start
    last_val: dict[str, float] = {}
    val_history: list[tuple[int, dict[str, float]]] = []
    try:
        if cfg.validation.every > 0 and cfg.validation.at_start and start == 0:
            last_val = validate(0)
            val_history.append((0, last_val))
            writer.write(0, last_val)
            report("[validation @ 0] " + ", ".join(f"{k}={v}" for k, v in last_val.items()))
        while step < cfg.num_steps:
            host = pending if pending is not None else step_batch(next(train_iter), with_images=True)
            pending = None
            if batch_hook is not None:
                host = batch_hook(step, host)
            gb = first_global if host is host_batch else _to_global(host, mesh)
            first_global = host_batch = None  # only the first step uses them
            run_step = compiled_step(gb)
            t0 = time.perf_counter()
            state, m = run_step(state, enc_params, gb)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            dt = time.perf_counter() - t0
            step += 1
            check_finite(m, step, lambda: _last_good(mngr))
            losses.append(m["loss"])
            m.update(step_time_s=dt, samples_per_s=cfg.batch_size / dt)
            if step % cfg.log.log_every == 0 or step == cfg.num_steps:
                writer.write(step, m)
                if pbar is None and is_main:  # a job log without the bar still shows how the run goes
                    eta = (cfg.num_steps - step) * dt
                    print(f"[step {step}/{cfg.num_steps}] loss={m['loss']:.4f} lr={m['lr']:.2e} "
                          f"grad_norm={m['grad_norm']:.3f} step_s={dt:.2f} samples_s={m['samples_per_s']:.1f} "
                          f"eta_s={eta:.0f}", flush=True)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", gnorm=f"{m['grad_norm']:.3f}",
                                 step_s=f"{dt:.2f}", samples_s=f"{m['samples_per_s']:.1f}", refresh=False)
            if step % cfg.checkpoint.save_every == 0 or step == cfg.num_steps:
                check_weights_finite(state, step, lambda: _last_good(mngr))
                ckpt.save(mngr, step, state_in_layout(state, "stacked", ckpt_shardings), train_iter.get_state(),
                          {**meta, "step": step})
            if cfg.validation.every > 0 and (step % cfg.validation.every == 0 or step == cfg.num_steps):
                last_val = validate(step)
                val_history.append((step, last_val))
                writer.write(step, last_val)
                report(f"[validation @ {step}] " + ", ".join(f"{k}={v}" for k, v in last_val.items()))
    finally:
        mngr.wait_until_finished()
        if pbar is not None:
            pbar.close()
        writer.close()

    # ---- export the inference layout (raw weights, as officially released; EMA beside them)
    exported = None
    if cfg.export and step == cfg.num_steps:
        params = jax.tree.map(_gather, state["params"])
        ema = jax.tree.map(_gather, state["ema"]) if cfg.ema_enabled else None
        params, ema = to_layer_layout((params, ema), per_layer=False)  # exports are stacked
        if is_main:
            # The config's ema section says how ema/ was made: the run's EMA settings, not the preset's.
            exported = ckpt.export_inference(out, rcfg.replace(ema=cfg.ema), params, ema,
                                             extra_files=_inference_files(cfg, data))
    mngr.close()
    summary = {"output_dir": str(out), "start_step": start, "final_step": step, "losses": losses,
               "validation": last_val, "validation_history": val_history, "checkpoints": str(mngr.directory),
               "exported": str(exported or ""), "wall_s": time.perf_counter() - t_start, "compile_s": compile_s}
    return summary
