"""The on-disk inference layout: ``config.json`` (official schema) + ``params/`` (an Orbax checkpoint).

Written atomically: everything goes to a sibling temp directory that is renamed into place only when
complete, so a failed conversion or export leaves nothing at the destination.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rdt_jax.convert.params import PureParams, check_params
from rdt_jax.convert.weights_io import WeightFileError
from rdt_jax.file_modes import as_created
from rdt_jax.model.config import RDTConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


@contextlib.contextmanager
def atomic_output_dir(out: str | pathlib.Path) -> Iterator[pathlib.Path]:
    out = pathlib.Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: output exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    as_created(tmp, directory=True)  # mkdtemp's 0700 would outlive the rename
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_pretrained_dir(out: str | pathlib.Path, cfg: RDTConfig, params: PureParams) -> pathlib.Path:
    check_params(params, cfg, what=str(out))
    with atomic_output_dir(out) as tmp:
        cfg.save_json(tmp / CONFIG_FILE)
        # Synchronous save, and NumPy leaves written without Orbax's defensive deep copy (nothing
        # mutates them meanwhile): converting rdt-1b then holds ~1.8 copies of the output, not 3.
        registry = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
            (jax.Array, ocp.type_handlers.ArrayHandler()),
        )
        # This process alone (no barrier with the others): a training run's export is written by process 0
        # only, from host copies of the gathered parameters.
        me = jax.process_index()
        alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        checkpointer = ocp.Checkpointer(
            ocp.PyTreeCheckpointHandler(type_handler_registry=registry, multiprocessing_options=alone),
            multiprocessing_options=alone)
        checkpointer.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
        checkpointer.close()
    return pathlib.Path(out)


def read_config(path: str | pathlib.Path, **overrides: Any) -> RDTConfig:
    path = pathlib.Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; expected a directory written by convert_torch_weights.py")
    return RDTConfig.from_json_file(cfg_file, **overrides)


def stored_dtype(path: str | pathlib.Path) -> str:
    """The dtype ``params/`` is stored in (``convert_torch_weights.py --dtype``, a run's param_dtype); float32
    if its leaves differ."""
    params_dir = pathlib.Path(path).absolute() / PARAMS_DIR
    if not params_dir.is_dir():
        return "float32"  # read_params names the problem
    leaves = jax.tree.leaves(ocp.StandardCheckpointer().metadata(params_dir).item_metadata.tree)
    dtypes = {np.dtype(a.dtype).name for a in leaves}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def read_params(path: str | pathlib.Path, abstract: PureParams) -> PureParams:
    """Restores ``params/`` onto ``abstract`` (ShapeDtypeStructs, optionally sharded), casting dtypes."""
    params_dir = pathlib.Path(path).absolute() / PARAMS_DIR
    if not params_dir.is_dir():
        hint = (" (an official checkpoint? convert it first: python convert_torch_weights.py SRC OUT)"
                if any((pathlib.Path(path) / f).is_file() for f in ("pytorch_model.bin", "model.safetensors")) else "")
        raise FileNotFoundError(f"{path}: no {PARAMS_DIR}/ checkpoint directory{hint}")
    checkpointer = ocp.StandardCheckpointer()
    stored = checkpointer.metadata(params_dir).item_metadata.tree
    want, have = _flat_shapes(abstract), _flat_shapes(stored)
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: stored {have[k]}, config expects {want[k]}" for k in sorted(set(want) & set(have))
                 if have[k] != want[k]]
    if problems:
        raise WeightFileError(f"{params_dir}: checkpoint does not match the config:\n  " + "\n  ".join(problems[:20]))
    return checkpointer.restore(params_dir, abstract)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    # Orbax metadata turns integer dict keys into strings; compare on a string path.
    def name(path) -> str:
        return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

    return {name(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(tree)}


def abstract_like(params: PureParams, dtype: Any) -> PureParams:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.dtype(dtype)), params)
