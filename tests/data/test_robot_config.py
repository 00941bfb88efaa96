"""Robot config files: bad files are one clear error naming the file."""

from __future__ import annotations

import json

import pytest

from rdt_jax.data.robot_config import load_robot_config


def test_builtin_config_loads():
    cfg = load_robot_config("aloha_agilex")
    assert len(cfg.state_names) == 14


@pytest.mark.parametrize(
    ("text", "match"),
    [("{not json", "not a JSON robot config"), ("[1, 2]", "is a JSON object, got list"),
     ('{"state_names": ["left_arm_joint_0_pos"], "colour": 1}', "unknown robot config keys"),
     ("BAD_COLOUR", "jpeg_color must be")],
)
def test_bad_file_names_the_file(tmp_path, text, match):
    path = tmp_path / "my_robot.json"
    if text == "BAD_COLOUR":  # a complete config but for one field's value
        text = json.dumps({**load_robot_config("aloha_agilex").to_json_dict(), "jpeg_color": "bgr"})
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        load_robot_config(path)
    assert str(path) in str(e.value)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nowhere.json"
    with pytest.raises(ValueError, match="no such robot config") as e:
        load_robot_config(path)
    assert str(path) in str(e.value)
