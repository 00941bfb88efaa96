"""Sample transform (DATA.md §4): ordering, dropout replacements, noise, language, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rdt_jax.data import image_transform, language
from rdt_jax.data.schema import BatchConfig, RawSample, check_against_spec, sample_spec
from rdt_jax.data.transform import SampleTransform, TransformConfig

S = 16  # model image size in these tests
BG = np.float32(np.float32(127 / 255) - 0.5) / np.float32(0.5)


def norm(v: int) -> np.float32:
    return np.float32(np.float32(v / 255) - 0.5) / np.float32(0.5)


def make_raw(tmp_path, *, ext_absent=False, masks=((False, True), (True, True), (True, True))) -> RawSample:
    rng = np.random.default_rng(0)
    state = np.zeros((1, 128))
    state[0, [0, 5, 10, 50]] = [0.5, -0.25, 0.75, 1.5]
    actions = np.zeros((64, 128))
    actions[:, [0, 10]] = rng.normal(size=(64, 2))
    mask = np.zeros(128)
    mask[[0, 5, 10, 50]] = 1
    std = np.zeros(128)
    std[[0, 5, 10, 50]] = [0.1, 0.2, 0.3, 0.4]
    frames = []
    for c in range(3):  # flat colour per (camera, history): R = 40c + 100h + 20, G = 60, B = 200 − 50c
        f = np.zeros((2, 8, 12, 3), np.uint8)
        for h in range(2):
            f[h] = (40 * c + 100 * h + 20, 60, 200 - 50 * c)
        frames.append(f)
    if ext_absent:
        frames[0] = np.zeros((2, 0, 0, 3), np.uint8)
    emb = rng.normal(size=(5, 4096)).astype(np.float32)
    store = language.EmbeddingStore(tmp_path)
    store.put("Open the drawer.", emb)
    return RawSample(dataset_name="agilex", episode_id="ep0", step_id=7, state=state, actions=actions,
                     state_elem_mask=mask, state_std=std, state_mean=np.full(128, 9.0), state_norm=std * 3,
                     frames=tuple(frames), frame_masks=np.array(masks), ctrl_freq=25.0,
                     instruction="Open the drawer.")


@pytest.fixture
def setup(tmp_path):
    raw = make_raw(tmp_path)
    bcfg = BatchConfig(batch_size=2, image_size=S, max_lang_len=8)
    means = {"agilex": np.arange(128) / 100.0, "other": np.zeros(128)}
    store = language.EmbeddingStore(tmp_path)

    def make(cfg, **kw):
        return SampleTransform(cfg, dataclasses.replace(bcfg, **kw), dataset_ids={"other": 0, "agilex": 3},
                               dataset_state_mean=means, embedding_store=store)
    return raw, make, store


def test_eval_transform_by_hand(setup):
    raw, make, store = setup
    out = make(TransformConfig.eval())(raw, np.random.default_rng(1))
    check_against_spec(out, sample_spec(BatchConfig(1, image_size=S, max_lang_len=8)), "sample")
    np.testing.assert_array_equal(out["states"], raw.state.astype(np.float32))
    np.testing.assert_array_equal(out["actions"], raw.actions.astype(np.float32))
    np.testing.assert_array_equal(out["state_elem_mask"], raw.state_elem_mask.astype(np.float32))
    np.testing.assert_array_equal(out["state_norm"], raw.state_norm.astype(np.float32))
    assert out["ctrl_freqs"] == 25.0 and out["data_indices"] == 3
    # order: [ext, right, left] at t−1, then at t; ext t−1 invalid by its mask → background
    assert out["image_valid"].tolist() == [False, True, True, True, True, True]
    assert (out["images"][0] == BG).all()
    for k in range(1, 6):
        h, c = divmod(k, 3)
        centre = out["images"][k][:, S // 2, S // 2]
        np.testing.assert_array_equal(centre, [norm(40 * c + 100 * h + 20), norm(60), norm(200 - 50 * c)])
        # 8×12 padded to 12×12 (rows 2..9) then resized to 16: the top rows are grey
        assert (out["images"][k][:, 0, :] == BG).all()
    emb = store.get("Open the drawer.")
    np.testing.assert_array_equal(out["lang_embeds"][:5], emb)
    assert not out["lang_embeds"][5:].any()
    assert out["lang_attn_mask"].tolist() == [True] * 5 + [False] * 3


def test_uint8_images_option(setup):
    raw, make, _ = setup
    out = make(TransformConfig.eval(), image_dtype="uint8")(raw, np.random.default_rng(1))
    assert out["images"].dtype == np.uint8
    assert out["images"][3][:, S // 2, S // 2].tolist() == [120, 60, 200]
    assert (out["images"][0] == 127).all()


def test_absent_camera_is_background(setup, tmp_path):
    _, make, _ = setup
    raw = make_raw(tmp_path, ext_absent=True)
    out = make(TransformConfig.eval())(raw, np.random.default_rng(1))
    assert out["image_valid"].tolist() == [False, True, True, False, True, True]
    assert (out["images"][3] == BG).all()


def test_full_dropout_replacements(setup):
    raw, make, _ = setup
    cfg = TransformConfig(image_aug=False, cond_mask_prob=1.0, state_noise_snr=None)
    out = make(cfg)(raw, np.random.default_rng(2))
    assert out["ctrl_freqs"] == 0.0
    np.testing.assert_array_equal(out["states"][0], (np.arange(128) / 100.0).astype(np.float32))
    assert not out["state_elem_mask"].any()
    assert not out["image_valid"].any() and (out["images"] == BG).all()
    np.testing.assert_array_equal(out["lang_embeds"][:1], language.empty_embedding())
    assert out["lang_attn_mask"].tolist() == [True] + [False] * 7
    np.testing.assert_array_equal(out["actions"], raw.actions.astype(np.float32))  # actions pass through


def test_exterior_only_dropout(setup):
    raw, make, _ = setup
    out = make(TransformConfig(image_aug=False, cond_mask_prob=0.0, cam_ext_mask_prob=1.0,
                               state_noise_snr=None))(raw, np.random.default_rng(3))
    assert out["image_valid"].tolist() == [False, True, True, False, True, True]


def test_dropout_rates_are_independent_bernoullis(setup):
    raw, make, _ = setup
    tf = make(TransformConfig(image_aug=False, cond_mask_prob=0.3, state_noise_snr=None))
    n = 400
    outs = [tf(raw, np.random.default_rng([9, i])) for i in range(n)]
    freq0 = np.mean([o["ctrl_freqs"] == 0 for o in outs])
    mask0 = np.mean([not o["state_elem_mask"].any() for o in outs])
    img0 = np.mean([not o["image_valid"][4] for o in outs])
    tol = 4 * np.sqrt(0.21 / n)
    assert abs(freq0 - 0.3) < tol and abs(mask0 - 0.3) < tol and abs(img0 - 0.3) < tol


def test_state_noise_snr(setup):
    raw, make, _ = setup
    tf = make(TransformConfig(image_aug=False, cond_mask_prob=0.0, state_noise_snr=20.0))
    d = np.stack([tf(raw, np.random.default_rng([4, i]))["states"][0] for i in range(2000)]) - raw.state[0]
    # 20 dB → σ = std / 10 per slot; slots with std 0 stay exact
    np.testing.assert_allclose(d[:, [0, 5, 10, 50]].std(0), [0.01, 0.02, 0.03, 0.04], rtol=0.08)
    assert not d[:, np.setdiff1d(np.arange(128), [0, 5, 10, 50])].any()


def test_determinism_and_augmentation(setup):
    raw, make, _ = setup
    tf = make(TransformConfig())
    a = tf(raw, np.random.default_rng([1, 5]))
    b = tf(raw, np.random.default_rng([1, 5]))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    plain = make(TransformConfig.eval())(raw, np.random.default_rng(0))["images"]
    changed = 0
    for i in range(30):
        o = tf(raw, np.random.default_rng([2, i]))
        inv = ~o["image_valid"]
        assert (o["images"][inv] == BG).all()
        changed += int(not np.array_equal(o["images"][o["image_valid"]], plain[o["image_valid"]]))
    assert changed > 5  # half of the valid images get augmented


def test_errors(setup, tmp_path):
    raw, make, _ = setup
    tf = make(TransformConfig.eval())
    with pytest.raises(KeyError, match="unknown dataset name 'nope'"):
        tf(dataclasses.replace(raw, dataset_name="nope"), np.random.default_rng(0))
    bad = raw.actions.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="agilex:ep0@7: actions contains NaN"):
        tf(dataclasses.replace(raw, actions=bad), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"actions have shape \(10, 128\), expected \(64, 128\)"):
        tf(dataclasses.replace(raw, actions=raw.actions[:10]), np.random.default_rng(0))
    wrong = list(raw.frames)
    wrong[1] = np.zeros((2, 8, 12, 4), np.uint8)
    with pytest.raises(ValueError, match=r"camera right_wrist frames \(2, 8, 12, 4\)"):
        tf(dataclasses.replace(raw, frames=tuple(wrong)), np.random.default_rng(0))
    with pytest.raises(KeyError, match="no precomputed embedding"):
        tf(dataclasses.replace(raw, instruction="unknown"), np.random.default_rng(0))
    with pytest.raises(KeyError, match=r"no state_mean .* \['x'\]"):
        SampleTransform(TransformConfig(), BatchConfig(1), dataset_ids={"x": 0}, dataset_state_mean={})


def test_float32_images_are_normalised_uint8_images(setup):
    """The float32 path (reused scratch image, normalised into the batch slot, cached grey
    background) equals normalising the uint8 path's images, with augmentation and dropout."""
    raw, make, _ = setup
    cfg = TransformConfig(cond_mask_prob=0.4)
    f32, u8 = make(cfg, image_dtype="float32"), make(cfg, image_dtype="uint8")
    seen_bg = seen_img = False
    for i in range(12):  # repeated calls: the scratch image is reused
        a = f32(raw, np.random.default_rng([9, i]))
        b = u8(raw, np.random.default_rng([9, i]))
        np.testing.assert_array_equal(a["image_valid"], b["image_valid"])
        np.testing.assert_array_equal(a["images"], image_transform.normalize(b["images"]))
        seen_bg |= not a["image_valid"].all()
        seen_img |= a["image_valid"].any()
    assert seen_bg and seen_img
