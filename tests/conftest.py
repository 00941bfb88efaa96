"""Test-wide set-up: CPU only, 8 forced host devices for sharding tests, the shared fixtures."""

import os
import pathlib
import tempfile

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# One on-disk XLA compilation cache for the session, shared by pytest-xdist workers and by the
# subprocesses some tests start (same variable scripts/train.py reads), so each program compiles once.
os.environ.setdefault("RDT_JAX_COMPILATION_CACHE", os.path.join(tempfile.gettempdir(), "rdt_jax_test_xla_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["RDT_JAX_COMPILATION_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DIR = pathlib.Path(os.environ.get("RDT_SHARED_DIR", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session", autouse=True)
def _library_temp_files(tmp_path_factory):
    """Temporary files libraries make and keep (tfds leaves an empty directory behind for every dataset it
    writes) go under pytest's base temp, which pytest prunes, not into the system's temp directory."""
    previous = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("library_temp"))
    yield
    tempfile.tempdir = previous


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    if not SHARED_DIR.is_dir():
        raise FileNotFoundError(
            f"shared fixtures not found at {SHARED_DIR}; "
            "set RDT_SHARED_DIR to the folder holding reference/ and fixtures/"
        )
    return SHARED_DIR


@pytest.fixture(scope="session")
def cases(shared_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """Golden outputs of the official PyTorch RDT (fixtures/rdt_small/cases.npz)."""
    with np.load(shared_dir / "fixtures" / "rdt_small" / "cases.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session", params=["model.safetensors", "pytorch_model.bin"])
def converted_small(request, shared_dir: pathlib.Path, tmp_path_factory) -> pathlib.Path:
    """The official rdt_small weights converted by ``convert_torch_weights``, from each release format."""
    from rdt_jax.convert.cli import torch_to_jax

    src = shared_dir / "fixtures" / "rdt_small"
    out = tmp_path_factory.mktemp("rdt_small") / request.param.split(".")[1]
    torch_to_jax(src / request.param, out, "float32", config=src / "config.json")
    return out
