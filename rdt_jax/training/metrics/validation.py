"""The official validation metrics (``train/sample.py``, TRAINING.md §5) and a trajectory plot."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np


def batch_metrics(pred: np.ndarray, actions: np.ndarray, mask: np.ndarray, state_norm: np.ndarray,
                  *, shards: int = 1) -> dict[str, np.ndarray | float]:
    """pred/actions (B, T, D), mask/state_norm (B, D) -> batch scalars and per-sample values.

    mse   = Σ(E·M)/ΣM ;  l2err = Σ(sqrt(E)/(N + 1e-3)·M)/ΣM, with E the squared error and the mask M and the
    episode RMS N of each slot tiled over the T steps. As the official code (one process per GPU), the scalars
    are taken over each device's share of the batch and then averaged over the ``shards`` devices (the global
    batch holds them in device order, B / shards samples each): with unequal mask sums this is not the ratio
    over the whole batch, and it depends on the number of devices as the official value does.
    """
    if pred.shape[0] % shards:
        raise ValueError(f"a batch of {pred.shape[0]} samples does not split over {shards} devices")
    err = np.square(pred.astype(np.float32) - actions.astype(np.float32))
    m = np.broadcast_to(mask[:, None, :], err.shape).astype(np.float32)
    n = np.broadcast_to(state_norm[:, None, :], err.shape).astype(np.float32)
    rel = np.sqrt(err) / (n + 1e-3) * m
    per_m = m.sum(axis=(1, 2))
    local = lambda x: x.sum(axis=(1, 2)).reshape(shards, -1).sum(axis=1)  # per-device sums
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "mse": float(np.mean(local(err * m) / local(m))),
            "l2err": float(np.mean(local(rel) / local(m))),
            "sample_mse": (err * m).sum(axis=(1, 2)) / per_m,
            "sample_l2err": rel.sum(axis=(1, 2)) / per_m,
        }


def aggregate(batches: Sequence[dict], data_indices: Sequence[np.ndarray], names: Sequence[str]) -> dict[str, float]:
    """``overall_avg_sample_{mse,l2err}`` (mean of batch scalars) and per-dataset means of per-sample values
    (NaN if any of them is NaN, as the official sums: a diverging sample is not averaged away)."""
    out = {
        "overall_avg_sample_mse": float(np.mean([b["mse"] for b in batches])),
        "overall_avg_sample_l2err": float(np.mean([b["l2err"] for b in batches])),
    }
    idx = np.concatenate([np.asarray(i) for i in data_indices])
    s_mse = np.concatenate([b["sample_mse"] for b in batches])
    s_l2 = np.concatenate([b["sample_l2err"] for b in batches])
    for i, name in enumerate(names):
        sel = idx == i
        if sel.any():
            out[f"{name}_sample_mse"] = float(np.mean(s_mse[sel]))
            out[f"{name}_sample_l2err"] = float(np.mean(s_l2[sel]))
    return {k: round(v, 4) for k, v in out.items()}


def plot_trajectories(path: str | pathlib.Path, pred: np.ndarray, actions: np.ndarray, mask: np.ndarray,
                      *, title: str = "", max_dims: int = 14) -> pathlib.Path:
    """PNG of predicted (dashed) vs ground-truth (solid) action chunks of the first sample, one panel per
    used action slot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = np.flatnonzero(mask[0] > 0)[:max_dims]
    if dims.size == 0:
        dims = np.arange(min(max_dims, actions.shape[-1]))
    cols = min(7, dims.size)
    rows = int(np.ceil(dims.size / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.0 * rows), squeeze=False, sharex=True)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, d in zip(axes.flat, dims, strict=False):
        ax.set_visible(True)
        ax.plot(actions[0, :, d], color="tab:blue", lw=1.5, label="ground truth")
        ax.plot(pred[0, :, d], color="tab:orange", lw=1.2, ls="--", label="predicted")
        ax.set_title(f"slot {d}", fontsize=8)
        ax.tick_params(labelsize=6)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
