"""The device mesh: axes ``("data", "fsdp")``; batches are split over both, parameters over ``fsdp``."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from rdt_jax.training.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # every device gets a distinct slice of the batch (ZeRO-style FSDP)


def maybe_initialize_distributed(cfg: MeshConfig) -> None:
    """Multi-host: connect to the coordinator. A no-op for single-process runs."""
    if cfg.coordinator is None:
        return
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                               process_id=cfg.process_id)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    data, fsdp = cfg.data, cfg.fsdp
    if fsdp == -1 and data == -1:
        raise ConfigError("at most one of mesh.data / mesh.fsdp may be -1")
    if fsdp == -1:
        fsdp = n // data
    if data == -1:
        data = n // fsdp
    if data * fsdp != n or data < 1 or fsdp < 1:
        raise ConfigError(f"mesh data={cfg.data} x fsdp={cfg.fsdp} does not cover the {n} devices")
    # Auto axes: sharding is given at the jit boundary and propagated by XLA (jax.make_mesh would
    # default to Explicit axes, which changes typing rules inside the model).
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
