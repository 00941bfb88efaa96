"""``convert_torch_weights.py``: official PyTorch RDT weights <-> an rdt-jax inference directory."""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Annotated, Literal

import numpy as np
import tyro

from rdt_jax.convert.params import params_from_torch, torch_state_from_params
from rdt_jax.convert.pretrained_dir import (
    CONFIG_FILE,
    PARAMS_DIR,
    atomic_output_dir,
    read_config,
    read_params,
)
from rdt_jax.convert.weights_io import WeightFileError, find_weights, open_weights
from rdt_jax.file_modes import as_created
from rdt_jax.model.config import RDTConfig


@dataclasses.dataclass(frozen=True)
class ConvertArgs:
    """Convert official RDT weights (rdt-1b, rdt-170m, fine-tuned runs) to rdt-jax, or back with --to-torch."""

    src: Annotated[pathlib.Path, tyro.conf.Positional]
    """Hugging Face-style directory (config.json + model.safetensors or pytorch_model.bin), a single
    weights file (.safetensors/.bin/.pt, DeepSpeed mp_rank_00_model_states.pt) with --config, or with
    --to-torch an rdt-jax directory."""
    out: Annotated[pathlib.Path, tyro.conf.Positional]
    """Output directory (must not exist or be empty)."""
    dtype: Literal["float32", "bfloat16"] | None = None
    """Parameter dtype to write (default: float32; with --to-torch: the stored dtype)."""
    config: pathlib.Path | None = None
    """config.json in the official schema, when SRC is a single file."""
    to_torch: bool = False
    """Write config.json + model.safetensors + pytorch_model.bin loadable by the official RDTRunner."""


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def torch_to_jax(src: pathlib.Path, out: pathlib.Path, dtype: str = "float32",
                 config: pathlib.Path | None = None) -> pathlib.Path:
    from rdt_jax.convert.pretrained_dir import write_pretrained_dir

    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    if src.is_dir():
        weights = find_weights(src)
        config = config or src / CONFIG_FILE
    else:
        weights = src
        if config is None:
            raise ValueError(f"{src} is a single weights file: pass --config path/to/config.json")
    cfg = RDTConfig.from_json_file(config)
    reader = open_weights(weights)
    params = params_from_torch(reader, cfg, _np_dtype(dtype))
    return write_pretrained_dir(out, cfg, params)


def jax_to_torch(src: pathlib.Path, out: pathlib.Path, dtype: str | None = None) -> pathlib.Path:
    import jax

    try:
        import torch
        from safetensors.torch import save_file
    except ImportError as e:
        raise WeightFileError("--to-torch needs torch: pip install 'rdt-jax[torch]'") from e
    from flax import nnx

    from rdt_jax.runner import abstract_policy

    cfg = read_config(src)
    defaults = {f.name: f.default for f in dataclasses.fields(RDTConfig)}  # what the official code computes
    for option in ("norm_form", "norm_eps"):
        if getattr(cfg, option) != defaults[option]:
            raise ValueError(f"{src}: the model uses {option}={getattr(cfg, option)!r}, which the official code does "
                             f"not implement (it has {defaults[option]!r}): in the official layout it would "
                             "compute something else")
    abstract = nnx.to_pure_dict(nnx.state(abstract_policy(cfg), nnx.Param))
    if not (src / PARAMS_DIR).is_dir():
        raise FileNotFoundError(f"{src}: no {PARAMS_DIR}/ checkpoint directory (--to-torch reads a converted "
                                "or trained rdt-jax directory, not the official one)")
    if dtype is None:
        import orbax.checkpoint as ocp

        meta = ocp.StandardCheckpointer().metadata(src.absolute() / "params").item_metadata.tree
        stored = {np.dtype(m.dtype) for m in jax.tree.leaves(meta)}
        target = stored.pop() if len(stored) == 1 else np.dtype(np.float32)
    else:
        target = _np_dtype(dtype)
    params = read_params(src, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, target), abstract))
    state = {}
    for key, value in torch_state_from_params(params, cfg):
        if value.dtype == _np_dtype("bfloat16"):
            state[key] = torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16)
        else:
            state[key] = torch.from_numpy(value.copy())
    with atomic_output_dir(out) as tmp:
        official = cfg.to_official()
        official.pop("rdt_jax")  # the official constructor would reject an unknown argument
        import json

        (tmp / CONFIG_FILE).write_text(json.dumps(official, indent=2, sort_keys=True) + "\n")
        save_file(state, str(tmp / "model.safetensors"))
        as_created(tmp / "model.safetensors")  # safetensors writes 0600
        torch.save(state, str(tmp / "pytorch_model.bin"))
    return out


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(ConvertArgs, args=argv)
    try:
        if args.to_torch:
            out = jax_to_torch(args.src, args.out, args.dtype)
        else:
            out = torch_to_jax(args.src, args.out, args.dtype or "float32", args.config)
    except (WeightFileError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
