"""Metric sinks: the JSONL file, TensorBoard events and wandb in offline mode (no network)."""

import json

import pytest

from rdt_jax.training.config import LogConfig
from rdt_jax.training.logging import MetricWriter


def test_jsonl_tensorboard_and_offline_wandb(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")  # the dev extra installs it
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    w = MetricWriter(tmp_path, LogConfig(tensorboard=True, wandb=True, wandb_mode="offline"), {"seed": 3})
    w.write(1, {"loss": 0.5, "lr": 1e-4})
    w.write(1, {"overall_avg_sample_mse": 0.3})  # validation at the same step: one wandb row
    w.write(2, {"loss": float("nan"), "lr": 2e-4})
    run = w._wandb
    assert run.settings.mode == "offline" and run.config["seed"] == 3
    # Step 1's row (committed when step 2 arrived) holds both writes.
    assert run.summary["_step"] == 1 and run.summary["overall_avg_sample_mse"] == pytest.approx(0.3)
    assert run.summary["lr"] == pytest.approx(1e-4)
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.5, "lr": 1e-4}, {"step": 1, "overall_avg_sample_mse": 0.3},
                    {"step": 2, "loss": "nan", "lr": 2e-4}]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    offline = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    assert wandb.run is None  # finished on close
