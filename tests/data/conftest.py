"""Fixtures for the data tests; the episode writers live in hdf5_episodes.py (importable here)."""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from hdf5_episodes import H, W


@pytest.fixture
def small_robot():
    from rdt_jax.data.robot_config import load_robot_config

    return dataclasses.replace(load_robot_config("aloha_agilex"), image_shape=(H, W, 3))
