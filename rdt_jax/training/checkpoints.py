"""Orbax checkpoints of a run: train state + data iterator state + run metadata, and the export.

``<output_dir>/checkpoints/<step>/`` holds three items:

* ``state``: params, optimiser state, float32 EMA, step and RNG (sharded arrays, restorable onto
  any mesh: the target's shardings decide the layout);
* ``data``: the grain iterator's state (JSON), so a resumed run continues the exact data stream;
* ``meta``: the step, the RDT config (official schema), the dataset statistics and names that
  inference needs, and the training config (JSON).

Orbax writes each step into a temporary directory and renames it when complete, so a crash or a
``kill -9`` during a save leaves the previous checkpoints intact and the partial one is ignored.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from rdt_jax.convert.pretrained_dir import CONFIG_FILE, PARAMS_DIR, write_pretrained_dir
from rdt_jax.model.config import RDTConfig
from rdt_jax.training.config import CheckpointConfig

ITEMS = ("state", "data", "meta")
# Orbax's "replica-parallel" saving splits every replicated array between its replicas so that hosts
# write cooperatively. Each split is a jitted slice compiled per array shape: for the hundreds of small
# biases/norms that costs ~0.05 s each at the first save (10 s for a tiny model) and buys nothing.
# Below this many bytes per replica slice an array is written whole by one replica.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 1 << 20


def _use_replica_parallel_only_for_large_arrays() -> None:
    from orbax.checkpoint._src.metadata import array_metadata_store

    handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES,
        array_metadata_store=array_metadata_store.Store())  # as Orbax's default handler
    # Orbax warns on every run that the handler is overridden, which is the point: silenced for this call.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logger.setLevel(level)


def make_manager(directory: str | os.PathLike, cfg: CheckpointConfig) -> ocp.CheckpointManager:
    _use_replica_parallel_only_for_large_arrays()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.max_to_keep, keep_period=cfg.keep_period,
        enable_async_checkpointing=cfg.async_save, create=True,
    )
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options, item_names=ITEMS)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict | None, meta: dict,
         *, force: bool = False) -> bool:
    return mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        meta=ocp.args.JsonSave(meta),
    ), force=force)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore(mngr: ocp.CheckpointManager, step: int | None, abstract_state: Any) -> tuple[Any, dict, dict]:
    """(state, data_state, meta) of ``step`` (default: the latest), laid out as ``abstract_state`` says."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{mngr.directory}: no committed checkpoint to resume from")
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
    ))
    return out["state"], dict(out["data"] or {}), dict(out["meta"] or {})


def restore_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    """The run metadata saved with ``step`` (model config, dataset statistics, train config), nothing else."""
    out = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"] or {})


def export_inference(output_dir: str | os.PathLike, rcfg: RDTConfig, params: Any, ema: Any | None,
                     extra_files: dict[str, str] | None = None) -> pathlib.Path:
    """Writes ``config.json`` + ``params/`` into ``output_dir`` (``rdt_jax.load_pretrained(output_dir)``
    reads it; ``convert_torch_weights.py --to-torch`` turns it into the official layout) and the EMA
    weights as a second inference directory ``output_dir/ema``.

    The run directory is not empty (checkpoints, logs), so the layout is written atomically into a
    sibling temp directory and its two entries are moved in; an older export is replaced.
    """
    out = pathlib.Path(output_dir).absolute()
    params = jax.device_get(params)
    tmp = out / ".export.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    write_pretrained_dir(tmp, rcfg, params)
    for name in (PARAMS_DIR, CONFIG_FILE):
        dst = out / name
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(tmp / name, dst)
    shutil.rmtree(tmp, ignore_errors=True)
    ema_dir = out / "ema"
    shutil.rmtree(ema_dir, ignore_errors=True)  # an older run's EMA must not outlive it
    if ema:
        write_pretrained_dir(ema_dir, rcfg, jax.tree.map(lambda e, p: e.astype(p.dtype),
                                                          jax.device_get(ema), params))
    for name, text in (extra_files or {}).items():
        for d in (out, ema_dir) if ema else (out,):  # ema/ is an inference directory of its own
            (d / name).write_text(text)
    return out
