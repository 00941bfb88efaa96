#!/usr/bin/env python
"""Train or fine-tune RDT: ``python scripts/train.py PRESET [--overrides]``.

Presets: ``demo`` (the README's first command: a small RDT on a built-in demo dataset, CPU, minutes),
``debug`` (seconds per step), ``finetune-hdf5``, ``finetune-rlds``, ``pretrain``. Every field of
``rdt_jax.training.config.TrainConfig`` can be overridden (``--help`` lists them), e.g.::

    python scripts/train.py demo
    python scripts/train.py debug --output-dir /tmp/d --num-steps 20 --save-every 5 [--resume]
    python scripts/train.py finetune-hdf5 --data.hdf5-dir DIR --init-from CONVERTED_RDT_1B \\
        --image-encoder.path SIGLIP_DIR --data.stats-file dataset_stat.json

Short aliases: ``--save-every`` = ``--checkpoint.save-every``, ``--init-from`` = ``--model.init-from``.
"""

from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

ALIASES = {"--save-every": "--checkpoint.save-every", "--init-from": "--model.init-from"}


def _expand_aliases(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        key, eq, val = a.partition("=")
        out.append(ALIASES.get(key, key) + eq + val if key in ALIASES else a)
    return out


def print_summary(summary: dict) -> None:
    """What the run did (loss and validation error, first vs last) and where everything was written."""
    out = pathlib.Path(summary["output_dir"])
    losses = summary["losses"]
    m, s = divmod(int(summary.get("wall_s", 0)), 60)
    print(f"\n[rdt-jax] done: steps {summary['start_step']} -> {summary['final_step']} in {m}m{s:02d}s")
    if len(losses) >= 10:
        k = max(1, len(losses) // 10)  # averages over a tenth of the run: single steps are noisy
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        print(f"[rdt-jax] training loss (mean of {k} steps): first {first:.4f} -> last {last:.4f} "
              f"({last / first:.1%} of the start)")
    history = summary.get("validation_history") or []
    if history:
        (s0, v0), (s1, v1) = history[0], history[-1]
        for name in v1:
            if name.startswith("overall_"):
                ratio = f" ({v1[name] / v0[name]:.1%} of the start)" if len(history) > 1 and v0[name] else ""
                print(f"[rdt-jax] validation {name}: step {s0} {v0[name]:.4f} -> step {s1} {v1[name]:.4f}{ratio}")
    print(f"[rdt-jax] output directory   {out}")
    print(f"[rdt-jax]   checkpoints      {summary['checkpoints']}  (--resume continues from the latest)")
    print(f"[rdt-jax]   metrics          {out / 'metrics.jsonl'}")
    if (out / "tensorboard").is_dir():
        print(f"[rdt-jax]   TensorBoard      tensorboard --logdir {out / 'tensorboard'}  (pip install tensorboard)")
    pngs = sorted((out / "validation").glob("*.png")) if (out / "validation").is_dir() else []
    if pngs:
        print(f"[rdt-jax]   validation plots {out / 'validation'} (latest: {pngs[-1].name})")
    if summary["exported"]:
        ema = f"; EMA in {out / 'ema'}" if (out / "ema").is_dir() else ""
        print(f"[rdt-jax]   inference model  {out}  (rdt_jax.load_pretrained('{out}'){ema})")


def main(argv: list[str] | None = None) -> int:
    import tyro

    from rdt_jax.training.config import PRESETS

    argv = _expand_aliases(list(sys.argv[1:] if argv is None else argv))
    configs = {name: ((make.__doc__ or name).strip().splitlines()[0], make()) for name, make in PRESETS.items()}
    cfg = tyro.extras.overridable_config_cli(configs, args=argv, prog="train.py")

    import jax

    # Compiled programs are cached on disk: a resumed or repeated run does not compile again.
    cache = os.environ.get("RDT_JAX_COMPILATION_CACHE", str(pathlib.Path.home() / ".cache" / "rdt_jax" / "xla"))
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's own variable wins
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    from rdt_jax.convert.weights_io import WeightFileError
    from rdt_jax.data.hdf5_source import EpisodeError
    from rdt_jax.data.robot_config import RobotConfigError
    from rdt_jax.training.config import ConfigError
    from rdt_jax.training.loop import NonFiniteLossError, train

    try:
        summary = train(cfg)
    except NonFiniteLossError as e:
        print(f"[rdt-jax] ERROR: {e}", file=sys.stderr, flush=True)
        return 3
    # A missing option or path, another run's directory (RunSetupError is a ConfigError); a corrupt
    # episode, robot config or --init-from weights (the message names the file).
    except (ConfigError, FileNotFoundError, EpisodeError, RobotConfigError, WeightFileError) as e:
        print(f"[rdt-jax] ERROR: {e}", file=sys.stderr, flush=True)
        return 2
    if jax.process_index() == 0:
        print_summary(summary)
    return 0


if __name__ == "__main__":
    from rdt_jax.huge_pages import reexec_with_huge_pages

    reexec_with_huge_pages()  # before any XLA work: glibc reads the tunable at start-up
    sys.exit(main())
