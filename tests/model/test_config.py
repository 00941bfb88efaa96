"""Model configs: the shipped official config files, presets and validation."""

from __future__ import annotations

import json

import pytest

from rdt_jax.model.config import RDTConfig, rdt_1b, rdt_170m
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("name,preset", [("rdt-1b", rdt_1b), ("rdt-170m", rdt_170m)])
def test_shipped_config_files_are_the_release_configs(shared_dir, name, preset):
    path = REPO_ROOT / "configs" / "models" / f"{name}.json"
    release = json.loads((shared_dir / "fixtures" / f"rdt_keys_{name.split('-')[1]}.json").read_text())["config"]
    assert json.loads(path.read_text()) == release
    assert RDTConfig.from_json_file(path) == preset()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(norm_form="layer"), "norm_form"),
        (dict(attention_impl="flash"), "attention_impl"),
        (dict(remat="some"), "remat"),
        (dict(dtype="int8"), "dtype"),
        (dict(depth=0), "depth"),
    ],
)
def test_invalid_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RDTConfig(**kwargs)


def test_bad_config_file_names_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json"):
        RDTConfig.from_json_file(bad)
