"""Training configuration: frozen dataclasses, named presets, overridable from the command line (tyro).

Everything a run does is decided here; the loop reads it top to bottom. Configs are data only: they
are written to ``<output_dir>/train_config.json`` and never executed.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Literal

from rdt_jax.model.config import EmaConfig, RematPolicy


class ConfigError(ValueError):
    """A run that cannot start as configured (a missing path, sizes that do not fit the devices or the
    model); the message says what to give. ``scripts/train.py`` prints it as one line."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which RDT to train. ``preset`` names an ``rdt_jax.model.config.PRESETS`` entry or ``tiny``."""

    preset: Literal["rdt-1b", "rdt-170m", "tiny"] = "rdt-1b"
    hidden_size: int | None = None  # overrides of the preset (tiny models for debug/demo)
    depth: int | None = None
    num_heads: int | None = None
    pred_horizon: int | None = None  # tiny only (the released models predict 64 steps)
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # compute (bf16 = official mixed precision)
    remat: RematPolicy = "none"
    # How the train step runs the blocks (checkpoints store them stacked either way, so a run may
    # resume in the other layout): "stacked" = lax.scan over layers, compile time flat in depth;
    # "per_layer" = the train state (params, EMA, Adam moments) holds each block separately and the
    # step runs a Python loop: faster on CPU (rdt-1b ~8 %, rdt-170m ~5 %; BENCHMARKS.md) at a higher
    # peak (rdt-1b 1.08x the float32 floor against 0.98x), compile time grows with depth;
    # "auto" = per_layer on CPU, stacked elsewhere.
    layer_layout: Literal["auto", "stacked", "per_layer"] = "auto"
    # A directory written by convert_torch_weights.py (or a previous export); None = random init.
    init_from: str | None = None


@dataclasses.dataclass(frozen=True)
class ImageEncoderConfig:
    """Frozen SigLIP run inside the train step (as officially).

    ``kind="siglip"`` loads so400m weights from ``path`` (a Hugging Face checkpoint directory);
    ``kind="random_tiny"`` builds a tiny randomly initialised, frozen SigLIP of the same code path
    (debug/demo runs, no download); ``kind="features"`` means the batch already carries
    ``img_tokens`` (benchmarks).
    """

    kind: Literal["siglip", "random_tiny", "features"] = "siglip"
    path: str | None = None
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    # random_tiny only:
    image_size: int = 28
    patch_size: int = 14
    hidden_size: int = 32
    num_layers: int = 1

    def __post_init__(self) -> None:
        # An option the kind does not use would be ignored silently (e.g. --image-encoder.path with the demo's
        # random tower): refuse it, as DataConfig does.
        tiny = ("image_size", "patch_size", "hidden_size", "num_layers")
        unused = [] if self.kind == "siglip" or self.path is None else ["--image-encoder.path"]
        if self.kind != "random_tiny":
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            unused += [f"--image-encoder.{n.replace('_', '-')}" for n in tiny if getattr(self, n) != defaults[n]]
        if unused:
            raise ValueError(f"image_encoder.kind is {self.kind!r}, which does not use {', '.join(unused)}"
                             + ("; set --image-encoder.kind siglip to load a checkpoint"
                                if self.path and self.kind != "siglip" else ""))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where batches come from.

    ``demo``: tiny ALOHA-format HDF5 episodes written on the fly under ``<output_dir>/demo_data``.
    ``hdf5``: a directory of ALOHA-format episodes (``hdf5_dir``) with a robot config.
    ``rlds``: converted RLDS/ArrayRecord datasets (``rlds_dirs``; weights from ``weights_file``).
    """

    kind: Literal["demo", "hdf5", "rlds"] = "hdf5"
    hdf5_dir: str | None = None
    robot: str = "aloha_agilex"
    """Robot config for hdf5 data: a name under configs/robots/ or a path to a robot JSON."""
    skip_bad_episodes: bool = False
    """hdf5 data: leave out the episode files that the scan before training finds unreadable (corrupt, missing
    keys, wrong shapes, non-finite values) and name them in a warning, instead of stopping with the first
    one's error. hdf5 and rlds data: during training, a sample whose data fail to read (frames that do not
    decode; for rlds also an episode record that does not parse or holds NaN/inf states) is named in a
    warning and replaced by another draw."""
    rlds_dirs: tuple[str, ...] = ()
    weights_file: str | None = None  # {dataset: weight} JSON (pretrain_sample_weights.json)
    # "per_episode": the weights are shares of episode visits, as the official pretraining;
    # "per_sample": shares of samples.
    weights_per: Literal["per_episode", "per_sample"] = "per_episode"
    # pretrain_datasets.json / finetune_datasets.json: a dataset's id (data_indices) is its position there,
    # as officially; without it, the order of rlds_dirs.
    datasets_file: str | None = None
    # Pre-encoded instructions (an EmbeddingStore: scripts/encode_lang.py --store-dir), for samples whose
    # instruction is text (every RLDS sample; HDF5 instruction files that hold text rather than paths).
    lang_embed_dir: str | None = None
    stats_file: str | None = None  # dataset_stat.json; computed from the data when None (hdf5/demo)
    image_aug: bool = True
    cond_mask_prob: float = 0.1
    state_noise_snr: float | None = 40.0
    max_lang_len: int = 1024
    # How a batch's instructions are padded. "bucket": to the smallest power of two (>= 16, <= max_lang_len)
    # that holds its longest one: about the official work (its collator pads to the batch's longest), in a
    # few shapes, each compiled once when first met. "max": always max_lang_len tokens, one compiled shape,
    # but the language cross-attention and adaptor then run on all of them (1024 tokens: ~20 % more FLOPs
    # per rdt-1b sample than 32).
    lang_padding: Literal["bucket", "max"] = "bucket"
    num_threads: int = 2
    prefetch: int = 16
    # demo dataset (rdt_jax.training.data.write_demo_dataset)
    demo_episodes: int = 8
    demo_episode_len: int = 48
    demo_image_size: int = 32
    demo_tasks: int = 4  # instructions; episode e performs task e % demo_tasks
    # Validation episodes of the same tasks from unseen start poses (0: validate on the training episodes,
    # as the official code does).
    demo_val_episodes: int = 0

    def __post_init__(self) -> None:
        # A data option of another kind would be ignored silently (e.g. the debug preset's demo data
        # trained on instead of --data.hdf5-dir): refuse it.
        ignored = {"demo": ("hdf5_dir", "rlds_dirs"), "hdf5": ("rlds_dirs",), "rlds": ("hdf5_dir",)}[self.kind]
        if self.kind == "demo":
            ignored += ("skip_bad_episodes",)
        given = [f"--data.{n.replace('_', '-')}" for n in ignored if getattr(self, n)]
        if self.kind == "demo" and self.robot != "aloha_agilex":
            given.append("--data.robot")
        if given:
            raise ValueError(f"data.kind is {self.kind!r}, which does not use {', '.join(given)}; "
                             "set --data.kind to the kind of data you give")
        if not 0 <= self.cond_mask_prob <= 1:
            raise ValueError(f"data.cond_mask_prob is a probability, got {self.cond_mask_prob}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with the official defaults (lr 1e-4, betas 0.9/0.999, weight decay 1e-2, eps 1e-8)."""

    learning_rate: float = 1e-4
    schedule: Literal["constant", "constant_with_warmup", "cosine"] = "constant"
    # In optimiser steps, as is the cosine length (k accumulated micro-batches = one batch k x larger). The
    # official code passes warmup x grad_accum to a scheduler DeepSpeed steps once per optimiser step, which
    # stretches its warm-up and cosine k-fold under accumulation; set warmup_steps accordingly to match it.
    warmup_steps: int = 500
    # Length of the cosine schedule; None = the run's num_steps. Fix it to stop a run early (--num-steps k)
    # and resume it to the end on the same schedule.
    decay_steps: int | None = None
    b1: float = 0.9
    """AdamW beta1."""
    b2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 1e-2  # on every parameter, as officially
    # The official DeepSpeed runs clip nothing; we clip at the flag's value. 0 = off.
    max_grad_norm: float = 1.0
    # Storage of the AdamW moments between steps (updates are computed in float32). bfloat16 saves 2 bytes
    # per parameter each and is rounded stochastically (see optimizer.py).
    mu_dtype: Literal["float32", "bfloat16"] = "float32"
    nu_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        # Each of these would make AdamW's update NaN/inf or meaningless from a finite gradient (e.g. eps 0:
        # 0/0 on every parameter whose gradient is 0; b2 1: a bias correction of 0).
        bad = []
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            bad.append(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            bad.append(f"b1 and b2 must lie in [0, 1), got {self.b1} and {self.b2}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            bad.append(f"eps must be a finite number > 0, got {self.eps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            bad.append(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            bad.append(f"max_grad_norm must be a finite number >= 0 (0 = no clipping), got {self.max_grad_norm}")
        if self.warmup_steps < 0:
            bad.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps is not None and self.decay_steps < 1:
            bad.append(f"decay_steps must be >= 1 or None (the run's num_steps), got {self.decay_steps}")
        elif self.schedule == "cosine" and self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            bad.append(f"decay_steps {self.decay_steps} must exceed warmup_steps {self.warmup_steps} (the cosine "
                       "decays from the end of the warm-up to decay_steps)")
        if bad:
            raise ValueError("optim: " + "; ".join(bad))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data, fsdp). -1 = all remaining devices; fsdp=1 is pure data parallelism."""

    data: int = -1
    fsdp: int = 1
    distributed: Literal["auto", "on", "off"] = "auto"
    """Multi-host: whether to call jax.distributed.initialize. auto: when --mesh.coordinator is given or a
    multi-process Slurm or Open MPI launch is detected; on: always (TPU pod slices, where JAX finds the
    hosts itself; anywhere else with --mesh.coordinator); off: never."""
    coordinator: str | None = None
    """Multi-host: the coordinator's "host:port" (None: from the cluster environment)."""
    num_processes: int | None = None
    """Multi-host: the number of processes (None: from the cluster environment)."""
    process_id: int | None = None
    """Multi-host: this process's index (None: from the cluster environment)."""

    def __post_init__(self) -> None:
        if self.distributed == "off" and self.coordinator is not None:
            raise ConfigError("--mesh.coordinator is given but --mesh.distributed is off")
        for name in ("data", "fsdp"):
            if getattr(self, name) == 0 or getattr(self, name) < -1:
                raise ValueError(f"mesh.{name} must be -1 (all remaining devices) or >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = 1000  # and at the last step
    max_to_keep: int | None = 3
    keep_period: int | None = None  # also keep every step that is a multiple of this
    async_save: bool = True

    def __post_init__(self) -> None:
        if self.save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {self.save_every} (the last step is always saved)")
        if self.max_to_keep is not None and self.max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {self.max_to_keep}")
        if self.keep_period is not None and self.keep_period < 1:
            raise ValueError(f"keep_period must be >= 1 or None, got {self.keep_period}")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_mode: Literal["offline", "online"] = "offline"
    wandb_project: str = "rdt-jax"
    progress_bar: bool = True
    log_every: int = 1

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """Periodic sampling of validation batches with the official metrics (train/sample.py).

    Every validation scores the same samples (a fixed stream from the seed), so the curve follows the model,
    not the draw; the official code draws new ones each time. ``batch_size`` is global; the overall metrics
    average per-device ratios as the official one-process-per-GPU code does."""

    every: int = 500  # 0 = never (a final validation still runs when > 0)
    batch_size: int = 8  # global
    num_batches: int = 2
    num_inference_steps: int | None = None  # None: the model's (5)
    plot: bool = True
    at_start: bool = False  # also validate the initial weights (step 0) of a fresh run, as a baseline

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"validation.every must be >= 0 (0 = never), got {self.every}")
        if self.batch_size < 1 or self.num_batches < 1:
            raise ValueError(f"validation.batch_size and validation.num_batches must be >= 1, got "
                             f"{self.batch_size} and {self.num_batches} (turn validation off with every=0)")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"validation.num_inference_steps must be >= 1 or None (the model's), got "
                             f"{self.num_inference_steps}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. ``batch_size`` is global (all devices, all micro-batches)."""

    output_dir: str = "runs/train"
    """Checkpoints, logs, validation plots and the final export (rdt_jax.load_pretrained reads it)."""
    num_steps: int = 1000
    """Optimiser steps to train to (a resumed run continues to this step)."""
    batch_size: int = 32
    """Global batch: all devices, all processes and all accumulated micro-batches together."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (batch_size / grad_accum samples each)."""
    seed: int = 0
    """Initialisation, data order, augmentation and noise draws."""
    resume: bool = False
    """Continue from the latest checkpoint in output_dir (exactly: data order included)."""
    model: ModelConfig = ModelConfig()
    image_encoder: ImageEncoderConfig = ImageEncoderConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    ema: EmaConfig = dataclasses.field(default_factory=EmaConfig)  # the official model.ema section
    ema_enabled: bool = True
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    validation: ValidationConfig = ValidationConfig()
    export: bool = True  # write the inference layout (config.json + params/ + ema/) at the end

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be >= 1, got {self.batch_size} and {self.grad_accum}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {self.num_steps}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2**32), got {self.seed}")

    # Flat aliases so the CLI reads like the issue: --num-steps, --save-every, --init-from.
    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------ presets
# The official pretraining lists, weights and statistics (thu-ml/RoboticsDiffusionTransformer configs/), shipped
# with the package so the pretrain preset works from any directory.
OFFICIAL_DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "assets"
_TINY_MODEL = ModelConfig(preset="tiny", hidden_size=64, depth=4, num_heads=4, pred_horizon=16, dtype="float32")
_TINY_IMAGES = ImageEncoderConfig(kind="random_tiny", dtype="float32")


def _debug() -> TrainConfig:
    """Seconds per step on a CPU: tiny RDT, tiny frozen random SigLIP, demo episodes."""
    return TrainConfig(
        output_dir="runs/debug", num_steps=10, batch_size=8,
        model=dataclasses.replace(_TINY_MODEL, hidden_size=32, depth=2),
        image_encoder=_TINY_IMAGES,
        data=DataConfig(kind="demo", image_aug=False, cond_mask_prob=0.1, state_noise_snr=40.0, max_lang_len=8,
                        demo_episodes=4, demo_episode_len=40, num_threads=1, prefetch=4),
        optim=OptimConfig(learning_rate=1e-3, schedule="constant_with_warmup", warmup_steps=2),
        checkpoint=CheckpointConfig(save_every=5, max_to_keep=2),
        log=LogConfig(tensorboard=True),
        validation=ValidationConfig(every=0, batch_size=8, num_batches=1, plot=False),
    )


def _demo() -> TrainConfig:
    """The README's first command: fine-tune a small RDT on the built-in demo dataset on a CPU."""
    # 64 episodes of 4 tasks; validation samples 8 held-out episodes (same tasks, unseen start poses), so
    # the validation error measures what was learnt, not what was memorised. Validated before training too.
    return TrainConfig(
        output_dir="runs/demo", num_steps=600, batch_size=16,
        model=_TINY_MODEL,
        image_encoder=_TINY_IMAGES,
        data=DataConfig(kind="demo", image_aug=False, cond_mask_prob=0.0, state_noise_snr=None, max_lang_len=8,
                        demo_episodes=64, demo_episode_len=48, demo_tasks=4, demo_val_episodes=8,
                        num_threads=2, prefetch=32),
        optim=OptimConfig(learning_rate=1e-3, schedule="cosine", warmup_steps=20),
        checkpoint=CheckpointConfig(save_every=200, max_to_keep=2),
        validation=ValidationConfig(every=100, batch_size=32, num_batches=2, at_start=True),
    )


def _finetune_hdf5() -> TrainConfig:
    """finetune.sh: rdt-1b on ALOHA-format HDF5 (--data.hdf5-dir; give the released weights with --init-from)."""
    return TrainConfig(
        output_dir="runs/finetune-hdf5", num_steps=200_000, batch_size=32,
        model=ModelConfig(preset="rdt-1b", remat="full"),
        data=DataConfig(kind="hdf5", image_aug=True, state_noise_snr=40.0),
        checkpoint=CheckpointConfig(save_every=1000, max_to_keep=40),
        validation=ValidationConfig(every=500, batch_size=64, num_batches=2),
    )


def _finetune_rlds() -> TrainConfig:
    """finetune-hdf5's settings on converted RLDS datasets (--data.rlds-dirs; scripts/convert_rlds.py)."""
    return dataclasses.replace(_finetune_hdf5(), output_dir="runs/finetune-rlds",
                               data=DataConfig(kind="rlds", image_aug=True, state_noise_snr=40.0))


def _pretrain() -> TrainConfig:
    """pretrain.sh: random init, the Open X-Embodiment mixture with the official sample weights."""
    return TrainConfig(
        output_dir="runs/pretrain", num_steps=1_000_000, batch_size=32,
        model=ModelConfig(preset="rdt-1b", remat="full"),
        data=DataConfig(kind="rlds", image_aug=False, state_noise_snr=None,
                        weights_file=str(OFFICIAL_DATA / "pretrain_sample_weights.json"),
                        datasets_file=str(OFFICIAL_DATA / "pretrain_datasets.json"),
                        stats_file=str(OFFICIAL_DATA / "dataset_stat.json")),
        mesh=MeshConfig(data=-1, fsdp=8),
        checkpoint=CheckpointConfig(save_every=1000, max_to_keep=40),
        validation=ValidationConfig(every=500, batch_size=64, num_batches=2),
    )


PRESETS = {
    "pretrain": _pretrain,
    "finetune-hdf5": _finetune_hdf5,
    "finetune-rlds": _finetune_rlds,
    "debug": _debug,
    "demo": _demo,
}
