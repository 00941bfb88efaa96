"""Metric sinks: a JSONL file (always), TensorBoard event files (tensorboardX), wandb (optional, lazy)."""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any

from rdt_jax.training.config import LogConfig


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch when PyTorch is not loaded yet.

    tensorboardX tries ``import torch`` only to annotate its arguments (we pass floats and NumPy
    images); where torch is installed that import costs ~3 s of start-up. A ``None`` entry in
    ``sys.modules`` makes that import fail fast; it is removed again so later code can import torch.
    """
    import sys

    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _trim_jsonl(path: pathlib.Path, last_step: int) -> None:
    """Keep the rows of steps <= ``last_step`` (a resumed run logs the later ones again) and drop a row
    cut short by a kill."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


class MetricWriter:
    def __init__(self, output_dir: str | pathlib.Path, cfg: LogConfig, run_config: dict[str, Any],
                 *, enabled: bool = True, resumed_step: int | None = None):
        """``resumed_step``: the checkpoint step a resumed run continues from (rows after it are dropped, the
        run writes them again); None for a fresh run, which starts a new metrics.jsonl."""
        self.enabled = enabled
        self.dir = pathlib.Path(output_dir)
        self._tb = self._wandb = None
        if not enabled:
            return
        jsonl = self.dir / "metrics.jsonl"
        if resumed_step is None:
            jsonl.unlink(missing_ok=True)
        else:
            _trim_jsonl(jsonl, resumed_step)
        self._jsonl = open(jsonl, "a")  # closed in close()
        if cfg.tensorboard:
            # A session-start event at the first step this run logs: TensorBoard then hides the events an
            # earlier run (or a killed one, past its checkpoint) logged from that step on, as the JSONL above.
            first_step = 0 if resumed_step is None else resumed_step + 1
            # tensorboardX names the file by the second and host only: a run started within the same second
            # as the last one would overwrite its file. The suffix also orders them as TensorBoard reads them.
            self._tb = _summary_writer_class()(str(self.dir / "tensorboard"), purge_step=first_step,
                                               filename_suffix=f".{time.time_ns()}")
        if cfg.wandb:
            import os

            try:
                import wandb
            except ImportError as e:
                raise ImportError("log.wandb=True needs the optional 'wandb' package (pip install wandb)") from e
            os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
            self._wandb = wandb.init(project=cfg.wandb_project, dir=str(self.dir), config=run_config,
                                     mode=cfg.wandb_mode, resume="allow")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **{k: (v if math.isfinite(v) else str(v))
                                                       for k, v in clean.items()}}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            # Not committed: wandb merges the rows of one step (training and validation metrics) and commits
            # it when the next step arrives or the run finishes.
            self._wandb.log(clean, step=step)

    def image(self, step: int, tag: str, png: pathlib.Path) -> None:
        if self._tb is not None:
            import numpy as np
            from PIL import Image

            self._tb.add_image(tag, np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
