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


def _tensorboard_events(path):
    """The Event records of one event file (TFRecord framing: length, its CRC, data, its CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        (n,) = struct.unpack("<Q", data[at:at + 8])
        events.append(Event.FromString(data[at + 12:at + 12 + n]))
        at += 12 + n + 4
    return events


def test_tensorboard_hides_what_a_resumed_run_logs_again(tmp_path):
    """TensorBoard's reader drops the events with step >= S logged before a session-start event at step S
    (its purge of orphaned data). A run resumed from step 3's checkpoint must leave it at step 4, so that
    the killed run's steps 4 and 5 do not show twice."""
    from tensorboardX.proto.event_pb2 import SessionLog

    cfg = LogConfig(tensorboard=True)
    (tmp_path / "a").mkdir()
    first = MetricWriter(tmp_path / "a", cfg, {})
    for step in range(1, 6):
        first.write(step, {"loss": float(step)})
    first.close()
    resumed = MetricWriter(tmp_path / "a", cfg, {}, resumed_step=3)
    for step in (4, 5):
        resumed.write(step, {"loss": 10.0 + step})
    resumed.close()
    files = sorted((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard's order
    assert len(files) == 2
    starts = [(e.step, e.session_log.status) for e in _tensorboard_events(files[1]) if e.HasField("session_log")]
    assert starts == [(4, SessionLog.START)]
    visible = {}
    for f in files:  # TensorBoard's purge, applied as its reader does
        for e in _tensorboard_events(f):
            if e.HasField("session_log") and e.session_log.status == SessionLog.START:
                visible = {s: v for s, v in visible.items() if s < e.step}
            for v in e.summary.value:
                visible[e.step] = v.simple_value
    assert visible == {1: 1.0, 2: 2.0, 3: 3.0, 4: 14.0, 5: 15.0}
