"""Test-wide set-up: CPU only, 8 forced host devices for sharding tests, the shared fixtures."""

import os
import pathlib

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DIR = pathlib.Path(os.environ.get("RDT_SHARED_DIR", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    if not SHARED_DIR.is_dir():
        raise FileNotFoundError(
            f"shared fixtures not found at {SHARED_DIR}; set RDT_SHARED_DIR to the folder holding reference/ and fixtures/"
        )
    return SHARED_DIR
