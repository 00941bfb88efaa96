"""Sin-cos initial values of RDT's three learned position tables (MODEL.md §4).

Computed in float64 with NumPy, like the official helper, so a from-scratch model starts from the
same numbers. Checkpoints carry their own (trained) tables; these are only the initial values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rdt_jax.model.config import PosEmbedConfig, RDTConfig


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """MAE-convention table: ``[sin(p w_0..), cos(p w_0..)]`` with ``w_k = 10000^(-k/(dim/2))``."""
    if dim % 2:
        raise ValueError(f"sin-cos width must be even, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("p,k->pk", np.asarray(positions, dtype=np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_nd(dim: int, grid: Sequence[int]) -> np.ndarray:
    """Grid table of shape ``(*grid, dim)``: each axis longer than 1 gets its own even-width slice."""
    grid = tuple(int(g) for g in grid)
    varying = [i for i, g in enumerate(grid) if g > 1]
    if not varying:
        raise ValueError(f"image grid {grid} has no axis with more than one position")
    width = dim // len(varying)
    width -= width % 2
    emb = np.zeros((*grid, dim), dtype=np.float64)
    for slot, axis in enumerate(varying):
        shape = [1] * len(grid) + [width]
        shape[axis] = -1
        emb[..., slot * width : (slot + 1) * width] += sincos_1d(width, np.arange(grid[axis])).reshape(shape)
    return emb


def multimodal_table(dim: int, segments: Sequence[tuple[str, int | Sequence[int]]], embed_modality: bool) -> np.ndarray:
    """Concatenated table for ``segments`` (name, length); see MODEL.md §4.2 for every branch.

    A negative length yields ``|n|`` rows that all equal position 0 (not zeros); an ``image`` segment
    with a grid treats negative axes as "no positional signal" (size 1 for the table, ``|g|`` rows).
    """
    if embed_modality:
        pos_dim = dim // 2
        modality = np.zeros((len(segments), dim), dtype=np.float64)
        modality[:, :pos_dim] = sincos_1d(pos_dim, np.arange(len(segments)))
    else:
        pos_dim = dim
        modality = np.zeros((len(segments), dim), dtype=np.float64)
    blocks = []
    for index, (name, length) in enumerate(segments):
        if name == "image" and isinstance(length, (tuple, list)):
            rows_grid = tuple(abs(int(g)) for g in length)
            table = np.broadcast_to(sincos_nd(pos_dim, [g if g > 0 else 1 for g in length]), (*rows_grid, pos_dim))
            table = table.reshape(-1, pos_dim)
        else:
            length = int(length)
            table = sincos_1d(pos_dim, np.arange(length if length > 0 else 1))
            table = np.broadcast_to(table, (abs(length), pos_dim))
        block = np.zeros((table.shape[0], dim), dtype=np.float64)
        block[:, dim - pos_dim :] = table
        blocks.append(block + modality[index])
    return np.concatenate(blocks, axis=0) if blocks else np.zeros((0, dim))


def _cond_table(dim: int, length: int, cfg: PosEmbedConfig | None) -> np.ndarray:
    if cfg is None:
        return sincos_1d(dim, np.arange(length))
    table = multimodal_table(dim, cfg, embed_modality=False)
    if table.shape[0] != length:
        raise ValueError(f"pos-embed config {cfg} gives {table.shape[0]} rows but the condition has {length}")
    return table


def initial_pos_tables(cfg: RDTConfig) -> dict[str, np.ndarray]:
    """``x_pos_embed``, ``lang_cond_pos_embed``, ``img_cond_pos_embed`` as float64 ``(rows, D)``."""
    dim = cfg.hidden_size
    x = multimodal_table(
        dim, [("timestep", 1), ("ctrl_freq", 1), ("state", 1), ("action", cfg.pred_horizon)], embed_modality=True
    )
    return {
        "x_pos_embed": x,
        "lang_cond_pos_embed": _cond_table(dim, cfg.max_lang_cond_len, cfg.lang_pos_embed_config),
        "img_cond_pos_embed": _cond_table(dim, cfg.img_cond_len, cfg.img_pos_embed_config),
    }
