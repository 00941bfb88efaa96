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
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    from rdt_jax.training.loop import NonFiniteLossError, train

    try:
        summary = train(cfg)
    except NonFiniteLossError as e:
        print(f"[rdt-jax] ERROR: {e}", file=sys.stderr, flush=True)
        return 3
    out = pathlib.Path(summary["output_dir"])
    losses = summary["losses"]
    if jax.process_index() == 0:
        print(f"\n[rdt-jax] done: steps {summary['start_step']} -> {summary['final_step']}")
        if len(losses) >= 10:
            k = max(1, len(losses) // 10)
            print(f"[rdt-jax] loss: first {k} steps {sum(losses[:k]) / k:.4f} -> last {k} steps "
                  f"{sum(losses[-k:]) / k:.4f}")
        for name, v in (summary["validation"] or {}).items():
            print(f"[rdt-jax] validation {name} = {v}")
        print(f"[rdt-jax] output directory   {out}")
        print(f"[rdt-jax]   checkpoints      {summary['checkpoints']}")
        print(f"[rdt-jax]   metrics          {out / 'metrics.jsonl'}  (TensorBoard: {out / 'tensorboard'})")
        if (out / "validation").is_dir():
            pngs = sorted((out / "validation").glob("*.png"))
            if pngs:
                print(f"[rdt-jax]   validation plot  {pngs[-1]}")
        if summary["exported"]:
            print(f"[rdt-jax]   inference model  {out}  (rdt_jax.load_pretrained('{out}'); EMA in {out / 'ema'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
