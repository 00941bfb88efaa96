"""Sin-cos initial position tables against the official constructor (every branch of the helper)."""

from __future__ import annotations

import numpy as np
import pytest

from rdt_jax.model.config import RDTConfig
from rdt_jax.model.pos_embed import initial_pos_tables, sincos_1d
from tests.helpers import assert_close

TABLES = ("x_pos_embed", "lang_cond_pos_embed", "img_cond_pos_embed")


def _cfg(hidden, horizon, lang_len, img_len, lang_cfg, img_cfg) -> RDTConfig:
    return RDTConfig(hidden_size=hidden, depth=2, num_heads=4, pred_horizon=horizon, max_lang_cond_len=lang_len,
                     img_cond_len=img_len, lang_pos_embed_config=lang_cfg, img_pos_embed_config=img_cfg)


VARIANTS = {
    "small": _cfg(128, 16, 32, 54, (("lang", -32),), (("image", (2, 3, -9)),)),
    "rdt1b": _cfg(2048, 64, 1024, 4374, (("lang", -1024),), (("image", (2, 3, -729)),)),
    "extra.lang_none_img_none": _cfg(128, 16, 32, 54, None, None),
    "extra.lang_pos_img_allpos": _cfg(128, 16, 32, 54, (("lang", 32),), (("image", (2, 3, 9)),)),
    "extra.img_history1": _cfg(128, 16, 32, 27, (("lang", -32),), (("image", (1, 3, -9)),)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tables_match_official_init(cases, variant):
    tables = initial_pos_tables(VARIANTS[variant])
    for name in TABLES:
        expected = cases[f"sincos.{variant}.{name}"]
        assert tables[name].shape == expected.shape
        np.testing.assert_allclose(tables[name], expected, rtol=0, atol=1e-6, err_msg=f"{variant}.{name}")


def test_tables_match_second_golden_fixture(shared_dir):
    with np.load(shared_dir / "reference" / "data" / "golden_tiny_rdt_fp32.npz") as g:
        cfg = _cfg(64, 64, 16, 24, (("lang", -16),), (("image", (2, 3, -4)),))
        tables = initial_pos_tables(cfg)
        for name in TABLES:
            np.testing.assert_allclose(tables[name], g[f"init/model.{name}"][0], atol=1e-6)


def test_documented_values():
    # MODEL.md §4.3: rdt-1b row 8 (action 5): channel 1024 = sin(5), channel 1536 = cos(5).
    x = initial_pos_tables(VARIANTS["rdt1b"])["x_pos_embed"]
    assert x[8, 1024] == pytest.approx(np.sin(5.0))
    assert x[8, 1536] == pytest.approx(np.cos(5.0))
    # Negative lengths give position 0, i.e. [0]*(D/2) + [1]*(D/2), not zeros.
    lang = initial_pos_tables(VARIANTS["small"])["lang_cond_pos_embed"]
    np.testing.assert_array_equal(lang, np.broadcast_to(np.r_[np.zeros(64), np.ones(64)], (32, 128)))


def test_sincos_rejects_odd_width():
    with pytest.raises(ValueError, match="even"):
        sincos_1d(7, np.arange(3))


def test_grid_without_varying_axis_is_an_error():
    with pytest.raises(ValueError, match="no axis"):
        initial_pos_tables(_cfg(128, 16, 32, 9, None, (("image", (1, 1, -9)),)))


def test_row_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="rows"):
        initial_pos_tables(_cfg(128, 16, 32, 50, None, (("image", (2, 3, -9)),)))


def test_helper_matches_formula():
    pos = np.array([0.0, 1.0, 7.0])
    table = sincos_1d(8, pos)
    omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
    assert_close(table, np.concatenate([np.sin(np.outer(pos, omega)), np.cos(np.outer(pos, omega))], 1), 1e-12)
