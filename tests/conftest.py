"""Test-wide set-up: CPU only, 8 forced host devices for sharding tests, the shared fixtures."""

import os
import pathlib

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DIR = pathlib.Path(os.environ.get("RDT_SHARED_DIR", REPO_ROOT.parent / "shared"))


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
