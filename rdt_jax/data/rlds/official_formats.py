"""On-disk formats of the six datasets the official pipeline reads from its own TFRecords.

Facts from the official writers and readers (thu-ml/RoboticsDiffusionTransformer:
`data/aloha/hdf5totfrecords.py`, `data/roboset/h5totfrecords.py`,
`data/rh20t/hdf5totfrecords.py`, `data/calvin/hdf5totfrecords.py`,
`data/bridgev2/bridgedata_numpy_to_tfrecord.py`, and the `_parse_function` /
`dataset_generator_from_tfrecords` of `data/preprocess_scripts/<name>.py`):

* one `.tfrecord` file = one episode, one `tf.train.Example` per step;
* array features are `bytes_list` holding one `tf.io.serialize_tensor` TensorProto;
  the instruction is a raw `bytes_list` (aloha, calvin, bridgev2) or a serialized string
  tensor (rh20t); `terminate_episode` / `truncates` are `int64_list`;
* images are raw uint8 (H, W, 3) tensors (aloha frames were JPEG-decoded by the writer with
  OpenCV and converted BGR→RGB, i.e. standard RGB decoding), except rh20t whose frames are
  serialized JPEG byte strings (encoded by OpenCV from BGR video frames: standard JPEGs);
* bridgev2 stores every observation with a leading axis of 1.

Only the fields the registry mapping, the cameras and the instruction use are read; the
others (recorded actions, unused cameras such as aloha_static's `cam_low`) are not copied.
This module is TensorFlow-free; the converter (`official_convert.py`) uses it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Kind = Literal["tensor", "image", "jpeg_tensor", "bytes", "string_tensor"]


@dataclasses.dataclass(frozen=True)
class Field:
    """One per-step feature of an official record.

    `src`: feature name in the `tf.train.Example`; `dst`: '/'-path of the step feature in the
    converted dataset (the structure the official `_parse_function` returns). Tensors must
    have `dtype` and, after reshaping, `shape` (element count checked). `dims`: accepted
    lengths of a variable 1-D tensor, stored zero-padded to `max(dims)` next to an int32
    `<dst>_dim`. `optional`: may be absent from a step; stored zero-filled next to a bool
    `<dst>_valid`.
    """

    src: str
    dst: str
    kind: Kind
    dtype: str = "uint8"
    shape: tuple[int, ...] = ()
    dims: tuple[int, ...] = ()
    optional: bool = False

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return (max(self.dims),) if self.dims else self.shape


@dataclasses.dataclass(frozen=True)
class OfficialFormat:
    name: str
    fields: tuple[Field, ...]
    # Where the episode instruction comes from: a step field, or the roboset path table.
    instruction: Literal["field", "roboset_paths"] = "field"
    # Skip episode files whose directory path contains one of these substrings.
    skip_dirs: tuple[str, ...] = ()
    # rh20t: the official generator discards a file if a step's joint vector has another
    # length than `dims` (otherwise the conversion raises) or if it has at most one step.
    skip_bad_dims: bool = False
    min_steps: int = 1


def _img(src: str, dst: str | None = None) -> Field:
    return Field(src, dst or f"observation/{src}", "image")


_ALOHA = (
    Field("qpos", "qpos", "tensor", "float32", (14,)),
    Field("qvel", "qvel", "tensor", "float32", (14,)),
    _img("cam_high"),
    _img("cam_left_wrist"),
    _img("cam_right_wrist"),
    Field("instruction", "instruction", "bytes"),
)

FORMATS: dict[str, OfficialFormat] = {
    f.name: f
    for f in (
        OfficialFormat(
            "aloha_mobile", (*_ALOHA, Field("base_action", "base_action", "tensor", "float32", (2,)))
        ),
        OfficialFormat("aloha_static", _ALOHA),
        OfficialFormat(
            "roboset",
            (
                Field("qpos", "qpos", "tensor", "float16", (7,)),
                Field("qpos_gripper", "qpos_gripper", "tensor", "float16", (1,)),
                _img("rgb_left"),
                _img("rgb_right"),
                _img("rgb_top"),
            ),
            instruction="roboset_paths",
            # The official generator skips the failure sets set_10 … set_17.
            skip_dirs=tuple(f"set_{i}" for i in range(10, 18)),
        ),
        OfficialFormat(
            "rh20t",
            (
                Field("joint", "joint", "tensor", "float64", dims=(6, 7)),
                Field("tcp_base", "tcp_base", "tensor", "float64", (7,), optional=True),
                Field("gripper", "gripper", "tensor", "float64", (3,), optional=True),
                Field("image", "observation/image", "jpeg_tensor"),
                Field("instruction", "instruction", "string_tensor"),
            ),
            skip_bad_dims=True,
            min_steps=2,
        ),
        OfficialFormat(
            "calvin",
            (
                Field("robot_obs", "observation/robot_obs", "tensor", "float64", (15,)),
                _img("rgb_static"),
                _img("rgb_gripper"),
                Field("instruction", "instruction", "bytes"),
            ),
        ),
        OfficialFormat(
            "bridgev2",
            (
                Field("observations/state", "observation/state", "tensor", "float32", (7,)),
                Field("observations/qpos", "observation/qpos", "tensor", "float32", (6,)),
                _img("observations/images0", "observation/images0"),
                Field("language", "language", "bytes"),
            ),
        ),
    )
}

# roboset: the official loader takes the instruction from the episode file's path: the
# *last* key of this table (in order) that is a substring of the path wins. Transcribed
# from data/preprocess_scripts/roboset.py (`path2json`).
ROBOSET_PATH_INSTRUCTIONS: tuple[tuple[str, str], ...] = (
    ("mnt/raid5/data/jaydv/robohive_base/episodes/franka-FrankaPlanarPushReal_v2d/set_17_plannar_push_eval",
     "Push the green object to the red line."),
    ("mnt/raid5/data/jaydv/robohive_base/episodes/franka-FrankaBinReorientRealRP03_v2d_set16/set_16_bin_reorient_3",
     "Pick up the bottle and and stand it upright."),
    ("mnt/raid5/data/jaydv/robohive_base/demonstrations/orange_block/set_7_orange_block", "Pick up the orange block."),
    ("mnt/raid5/data/jaydv/robohive_base/demonstrations/wooden_block", "Pick up the wooden block."),
    ("mnt/raid5/data/jaydv/robohive_base/episodes/franka-FrankaBinReorientReal_v2d-orig/set_15_bin_reorient_eval_2",
     "Pick up the bottle and and stand it upright."),
    ("mnt/raid5/data/jaydv/robohive_base/episodes/franka-FrankaBinPushReal_v2d_set14/set_14_bin_push",
     "Push the object to the red line."),
    ("mnt/raid5/data/jaydv/robohive_base/episodes/franka-FrankaBinPickRealRP05_v2d/set_11_bottle_pick",
     "Pick up the bottle."),
    ("mnt/raid5/data/jaydv/robohive_base/episodes/franka-FrankaBinPickRealRP03_v2d/set_10_bin_pick_2004",
     "Pick up the wooden block."),
    ("mnt/raid5/data/jaydv/bin_pick_data_30029/set_2_softtoys", "Pick up one toy in the basket."),
    ("home/jaydv/Documents/RoboSet/pick_banana_from_toaster_place_on_table_data",
     "Pick banana from toaster and place on table."),
    ("mnt/raid5/data/jaydv/robohive_base/episodes/franka-FrankaBinPickReal_v2d/set_12_bin_pick_eval",
     "Pick up the block."),
    ("mnt/raid5/data/roboset/v0.3/flap_open_toaster_oven_data", "Flap open toaster."),
    ("mnt/raid5/data/jaydv/robohive_base/episodes/franka-FrankaBinReorientReal_v2d_set13/set_13_bin_reorient",
     "Pick up the bottle and stand it upright."),
    ("home/jaydv/Documents/RoboSet/drag_mug_from_right_to_left_data", "Drag mug right to left."),
    ("home/jaydv/Documents/RoboSet/drag_strainer_backward_data", "Drag strainer backwards."),
    ("mnt/raid5/data/roboset/v0.4/baking_prep/scene_4/baking_prep_slide_close_drawer_scene_4",
     "Slide and close the drawer."),
    ("mnt/raid5/data/roboset/v0.4/heat_soup/scene_4/baking_slide_in_bowl_scene_4",
     "Place the bowl into the container."),
    ("set_5_bottle_cube_14", "Pick up the bottle."),
    ("home/jaydv/Documents/RoboSet/drag_mug_forward_data", "Drag mug forwards."),
    ("mnt/raid5/data/roboset/v0.4/clean_kitchen/scene_3/clean_kitchen_pick_towel_scene_3",
     "Pick up the towel from the oven."),
    ("mnt/raid5/data/roboset/v0.4/heat_soup/scene_2/baking_pick_bowl_scene_2", "Pick up the bowl."),
    ("mnt/raid5/data/roboset/v0.4/heat_soup/scene_2/baking_slide_in_bowl_scene_2", "Place the bowl into the oven."),
    ("mnt/raid5/data/roboset/v0.4/heat_soup/scene_2/baking_close_oven_scene_2", "Flap and close the oven."),
    ("home/jaydv/Documents/RoboSet/pick_banana_place_in_strainer_data", "Pick banana and place it in strainer."),
    ("mnt/raid5/data/roboset/v0.3/pick_banana_place_in_mug_data", "Pick banana and place it in mug."),
    ("mnt/raid5/data/roboset/v0.4/make_tea/scene_2/make_tea_pick_tea_scene_2", "Pick up the tea from the container."),
    ("home/jaydv/Documents/RoboSet/drag_strainer_forward_data", "Drag strainer forwards."),
    ("mnt/raid5/data/roboset/v0.3/pick_ketchup_from_strainer_place_on_table_data",
     "Pick ketchup from strainer and place it on the table."),
    ("mnt/raid5/data/roboset/v0.4/baking_prep/scene_4/baking_prep_place_butter_scene_4",
     "Place the butter on the cutting board."),
    ("mnt/raid5/data/roboset/v0.4/baking_prep/scene_1/baking_prep_slide_open_drawer_scene_1",
     "Slide and open the drawer."),
    ("mnt/raid5/data/roboset/v0.3/drag_strainer_right_to_left_data", "Drag strainer right to left."),
    ("home/jaydv/Documents/RoboSet/pick_banana_from_plate_place_on_table_data",
     "Pick banana from plate and place on table."),
    ("mnt/raid5/data/roboset/v0.3/pick_ketchup_from_plate_place_on_table_data",
     "Pick ketchup from plate and place it on table."),
    ("mnt/raid5/data/roboset/v0.4/baking_prep/scene_1/baking_prep_slide_close_drawer_scene_1",
     "Slide and close the drawer."),
    ("mnt/raid5/data/roboset/v0.3/drag_strainer_left_to_right_data", "Drag strainer left to right."),
    ("pick_ketchup_place_on_toaster_data", "Pick ketchup from table and place on toaster."),
    ("mnt/raid5/data/roboset/v0.4/make_tea/scene_2/make_tea_place_tea_scene_2", "Place the tea into the cup."),
    ("mnt/raid5/data/roboset/v0.3/pick_ketchup_place_in_strainer_data",
     "Pick ketchup from the table and place it in strainer."),
    ("home/jaydv/Documents/RoboSet/pick_ketchup_place_on_plate_data", "Pick ketchup from table and place on plate."),
    ("home/jaydv/Documents/RoboSet/drag_mug_backward_data", "Drag mug backwards."),
    ("set_1_blocks_897", "Pick up one block in the basket."),
    ("mnt/raid5/data/roboset/v0.4/make_tea/scene_2/make_tea_place_lid_scene_2", "Place lid on the cutting board."),
    ("mnt/raid5/data/roboset/v0.4/heat_soup/scene_4/baking_pick_bowl_scene_4", "Pick up the bowl."),
    ("mnt/raid5/data/roboset/v0.4/baking_prep/scene_4/baking_prep_pick_butter_scene_4",
     "Pick up the butter from the drawer."),
    ("mnt/raid5/data/roboset/v0.4/baking_prep/scene_1/baking_prep_pick_butter_scene_1",
     "Pick up the butter from the drawer."),
    ("home/jaydv/Documents/RoboSet/flap_close_toaster_oven_data", "Flap close toaster."),
    ("home/jaydv/Documents/RoboSet/drag_mug_from_left_to_right_data", "Drag mug left to right."),
    ("set_6_planar_push_120", "Push the object from left to right."),
    ("mnt/raid5/data/roboset/v0.4/clean_kitchen/scene_3/clean_kitchen_slide_close_drawer_scene_3",
     "Slide and close the drawer."),
    ("set_4_med_block_7", "Pick up the wooden block."),
    ("mnt/raid5/data/roboset/v0.3/pick_banana_place_on_toaster_data", "Pick banana from table and place on toaster."),
    ("mnt/raid5/data/roboset/v0.3/pick_ketchup_from_toaster_place_on_table_data",
     "Pick ketchup from toaster and place it on table."),
    ("mnt/raid5/data/roboset/v0.4/baking_prep/scene_1/baking_prep_place_butter_scene_1",
     "Place the butter on the cutting board."),
    ("mnt/raid5/data/roboset/v0.4/baking_prep/scene_4/baking_prep_slide_open_drawer_scene_4",
     "Slide and open the drawer."),
    ("home/jaydv/Documents/RoboSet/pick_banana_place_on_plate_data", "Pick banana from table and place on plate."),
    ("set_8_pick_bottle_10", "Pick up the bottle."),
    ("home/jaydv/Documents/RoboSet/pick_ketchup_place_in_toaster_data",
     "Pick ketchup from the table and place in toaster."),
)


def roboset_instruction(path: str) -> str | None:
    """The official instruction for a roboset episode file path (None: no table entry)."""
    found = None
    for key, text in ROBOSET_PATH_INSTRUCTIONS:
        if key in path:
            found = text
    return found
