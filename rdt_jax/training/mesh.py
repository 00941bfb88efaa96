"""The device mesh: axes ``("data", "fsdp")``; batches are split over both, parameters over ``fsdp``."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from rdt_jax.training.config import ConfigError, MeshConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # every device gets a distinct slice of the batch (ZeRO-style FSDP)


class Launch(NamedTuple):
    """A launcher that started several copies of this program."""

    launcher: str
    num_processes: int
    process_id: int


# (launcher, process-count variable, process-index variable). Slurm's count is the step's (srun), not the
# allocation's: a batch script's own single process must not wait for copies that were never started.
_LAUNCHERS = (
    ("Slurm", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID"),
    ("Open MPI", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
)


def detected_launch(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launch, when a Slurm step or an Open MPI job started several processes (else None)."""
    env = os.environ if environ is None else environ
    for name, count_var, rank_var in _LAUNCHERS:
        count, rank = env.get(count_var, ""), env.get(rank_var, "")
        if count.isdigit() and int(count) > 1 and rank.isdigit():
            return Launch(name, int(count), int(rank))
    return None


def maybe_initialize_distributed(cfg: MeshConfig) -> None:
    """Multi-host: connect the processes through ``jax.distributed`` when ``cfg.distributed`` asks for it
    (see MeshConfig). Without it, each copy of a multi-process launch would silently train alone.

    The coordinator, process count and index come from the flags, else from the launcher's variables,
    else from JAX's cluster detection (TPU pod slices, Slurm, Open MPI with its ORTE address)."""
    launch = detected_launch()
    wanted = {"on": True, "off": False}.get(cfg.distributed, cfg.coordinator is not None or launch is not None)
    if not wanted:
        if launch is not None:
            log.warning("%s started %d processes but --mesh.distributed is off: each trains on its own",
                        launch.launcher, launch.num_processes)
        return
    if jax.distributed.is_initialized():
        return
    num_processes, process_id = cfg.num_processes, cfg.process_id
    if launch is not None and cfg.coordinator is not None:  # e.g. Open MPI 5 (PMIx), which JAX cannot read
        num_processes = launch.num_processes if num_processes is None else num_processes
        process_id = launch.process_id if process_id is None else process_id
    try:
        jax.distributed.initialize(coordinator_address=cfg.coordinator, num_processes=num_processes,
                                   process_id=process_id)
    except ValueError as e:  # JAX could not find the coordinator, process count or index
        raise ConfigError(f"jax.distributed.initialize: {e} (give --mesh.coordinator HOST:PORT, "
                          "--mesh.num-processes and --mesh.process-id)") from e
    if launch is not None and jax.process_count() != launch.num_processes:
        raise ConfigError(f"{launch.launcher} started {launch.num_processes} processes but jax.distributed "
                          f"connected {jax.process_count()}")


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
        raise ConfigError(f"mesh data={cfg.data} x fsdp={cfg.fsdp} does not cover the {n} devices; set "
                          "--mesh.data and --mesh.fsdp so that their product is the device count (-1: the rest)")
    # Auto axes: sharding is given at the jit boundary and propagated by XLA (jax.make_mesh would
    # default to Explicit axes, which changes typing rules inside the model).
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
