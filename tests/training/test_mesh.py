"""When and how training connects the processes of a multi-process launch (rdt_jax.training.mesh)."""

from __future__ import annotations

import json
import os
import pathlib
import random
import sys

import jax
import pytest

from rdt_jax.training import mesh as mesh_lib
from rdt_jax.training.config import ConfigError, MeshConfig
from rdt_jax.training.mesh import Launch, detected_launch, maybe_initialize_distributed
from tests.helpers import run_together

REPO = pathlib.Path(__file__).resolve().parents[2]
LAUNCH_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID",
               "SLURM_LOCALID", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_MCA_orte_hnp_uri")


def test_detected_launch_reads_the_launchers_variables():
    slurm_step = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2"}
    assert detected_launch(slurm_step) == Launch("Slurm", 4, 2)
    # A batch script's own process: an allocation of 8 tasks, but no srun step started copies of it.
    assert detected_launch({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) is None
    assert detected_launch(dict(slurm_step, SLURM_STEP_NUM_TASKS="1")) is None
    assert detected_launch({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}) == Launch("Open MPI", 2, 1)
    assert detected_launch({"OMPI_COMM_WORLD_SIZE": "2"}) is None  # no rank: not a launched copy
    assert detected_launch({}) is None


@pytest.fixture
def initialize_calls(monkeypatch):
    """jax.distributed.initialize replaced by a recorder; no launcher variables in the environment."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    return calls


def test_single_process_runs_do_not_initialize(initialize_calls):
    maybe_initialize_distributed(MeshConfig())
    assert initialize_calls == []


def test_coordinator_or_on_initializes(initialize_calls):
    maybe_initialize_distributed(MeshConfig(coordinator="10.0.0.1:1234", num_processes=2, process_id=1))
    maybe_initialize_distributed(MeshConfig(distributed="on"))  # a TPU pod slice: JAX finds the hosts itself
    assert initialize_calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1),
                                dict(coordinator_address=None, num_processes=None, process_id=None)]


def test_a_launch_is_detected_and_fills_what_the_flags_leave_out(initialize_calls, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    maybe_initialize_distributed(MeshConfig())  # JAX's own detection fills everything
    maybe_initialize_distributed(MeshConfig(coordinator="10.0.0.1:1234"))  # e.g. Open MPI 5, unreadable by JAX
    assert initialize_calls == [dict(coordinator_address=None, num_processes=None, process_id=None),
                                dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)]


def test_off_skips_a_detected_launch_with_a_warning(initialize_calls, monkeypatch, caplog):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    with caplog.at_level("WARNING"):
        maybe_initialize_distributed(MeshConfig(distributed="off"))
    assert initialize_calls == []
    assert "Open MPI started 2 processes but --mesh.distributed is off" in caplog.text
    with pytest.raises(ConfigError, match=r"--mesh\.coordinator is given but --mesh\.distributed is off"):
        MeshConfig(distributed="off", coordinator="10.0.0.1:1234")


def test_failures_to_connect_are_config_errors(initialize_calls, monkeypatch):
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "0")

    def cannot(**kw):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", cannot)
    with pytest.raises(ConfigError, match=r"coordinator_address should be defined\. \(give --mesh\.coordinator"):
        maybe_initialize_distributed(MeshConfig())
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: None)  # connects, but only 2 of the 4
    with pytest.raises(ConfigError, match=r"Slurm started 4 processes but jax\.distributed connected 2"):
        maybe_initialize_distributed(MeshConfig())


WORKER = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from jax.experimental import multihost_utils
from rdt_jax.training.config import MeshConfig
from rdt_jax.training.mesh import maybe_initialize_distributed
maybe_initialize_distributed(MeshConfig())  # no flags: everything from the Slurm variables
ranks = multihost_utils.process_allgather(np.array([jax.process_index()]), tiled=True)
json.dump({"count": jax.process_count(), "devices": len(jax.devices()), "ranks": ranks.tolist()},
          open(sys.argv[2], "w"))
'''


def test_a_slurm_step_of_two_processes_connects_without_flags(tmp_path):
    """Two processes started as an srun step would start them (its variables, on 127.0.0.1) connect with
    no --mesh flag and see each other's devices. JAX puts Slurm's coordinator on the first node, at a port
    derived from the job id: the id is chosen so that the port is free."""
    import portpicker

    ports = list(range(65535 - 2**12 + 1, 65536))
    random.shuffle(ports)
    port = next(p for p in ports if portpicker.is_port_free(p))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    base.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                SLURM_JOB_ID=str(port % 2**12), SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
                SLURM_STEP_NUM_TASKS="2")
    run_together([[sys.executable, str(script), str(REPO), str(tmp_path / f"{i}.json")] for i in range(2)],
                 [dict(base, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)) for i in range(2)], timeout=180)
    for i in range(2):
        assert json.loads((tmp_path / f"{i}.json").read_text()) == {"count": 2, "devices": 4, "ranks": [0, 1]}


def test_module_reads_only_the_documented_variables():
    # The launch test clears exactly these from the environment; a new launcher variable must join them.
    used = {v for _, count, rank in mesh_lib._LAUNCHERS for v in (count, rank)}
    assert used <= set(LAUNCH_VARS)
