"""Pre-encode language instructions with T5-v1.1-XXL (JAX) into embedding files.

One instruction::

    python scripts/encode_lang.py --t5-dir ckpts/t5-v1_1-xxl --instruction "pick up the cup" \
        --out-dir out --name pick_cup

A file of many (one instruction per line, blank lines skipped; or a JSON list of strings),
batched, with a progress bar; files are named ``lang_embed_<i>`` (line order) as RDT's
``encode_lang_batch.py`` does::

    python scripts/encode_lang.py --t5-dir ckpts/t5-v1_1-xxl --instructions-file tasks.txt --out-dir out

Every distinct instruction of converted RLDS datasets, into the embedding store that training
reads (``--data.lang-embed-dir``; files named by a hash of the text)::

    python scripts/encode_lang.py --t5-dir ckpts/t5-v1_1-xxl --rlds-dirs data/fractal/0.1.0 data/taco/0.1.0 \
        --store-dir lang_store

Every distinct text instruction of ALOHA-format HDF5 fine-tuning data (each episode folder's instruction
JSON, every variant it lists; entries that name precomputed ``.pt``/``.safetensors`` files need no
encoding and are left out), into the store that training then reads::

    python scripts/encode_lang.py --t5-dir ckpts/t5-v1_1-xxl --hdf5-dirs data/aloha --store-dir lang_store
    python scripts/train.py ... --data.kind hdf5 --data.hdf5-dir data/aloha --data.lang-embed-dir lang_store

``--robot`` names the robot config as ``--data.robot`` does for training (its instruction file name
and keys, and which episodes are long enough to be used); ``--skip-bad-episodes`` as
``--data.skip-bad-episodes``.

Each instruction gets its unpadded ``(L, 4096)`` embedding (EOS included), written in the
official ``.pt`` layout and/or our ``.safetensors`` layout (``--formats``; see
``rdt_jax.data.language``). The ``.pt`` layout is the official script's of the same
mode: for one instruction ``encode_lang.py``'s dict ``{"name", "instruction", "embeddings":
(1, L, 4096)}`` (what the deployment loads), for a file ``encode_lang_batch.py``'s bare tensor.
Sequences are padded to a multiple of ``--pad-multiple`` (masked) so the jitted encoder compiles
for few lengths; real-token outputs do not depend on it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import sys
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from tqdm import tqdm

from rdt_jax.data.language import LANG_DIM, EmbeddingStore, save_embedding, save_embedding_pt
from rdt_jax.data.robot_config import DEFAULT_ROBOT, RobotConfig, load_robot_config
from rdt_jax.encoders import load_t5
from rdt_jax.encoders.tokenizer import load_t5_tokenizer, tokenize


@dataclasses.dataclass(frozen=True)
class Args:
    t5_dir: pathlib.Path
    """Hugging Face directory of google/t5-v1_1-xxl (config.json + weights)."""
    out_dir: pathlib.Path | None = None
    """Where the per-instruction files go (not needed with --store-dir alone)."""
    instruction: str | None = None
    """A single instruction (use with --name)."""
    name: str = "lang_embed"
    """File stem for --instruction."""
    instructions_file: pathlib.Path | None = None
    """Text file, one instruction per line (or a .json list of strings)."""
    rlds_dirs: tuple[pathlib.Path, ...] = ()
    """Converted RLDS datasets (scripts/convert_rlds.py): encode every distinct instruction they use."""
    hdf5_dirs: tuple[pathlib.Path, ...] = ()
    """Directories of ALOHA-format HDF5 episodes: encode every distinct text instruction their episodes use."""
    robot: str = DEFAULT_ROBOT
    """With --hdf5-dirs: the robot config, a name under configs/robots/ or a path to a robot JSON (as
    training's --data.robot)."""
    skip_bad_episodes: bool = False
    """With --hdf5-dirs: leave out unreadable episode files (named in a warning) instead of stopping, as
    training's --data.skip-bad-episodes does."""
    store_dir: pathlib.Path | None = None
    """Also put every embedding into this EmbeddingStore (rdt_jax.data.language), keyed by the text."""
    tokenizer_dir: pathlib.Path | None = None
    """Defaults to --t5-dir."""
    formats: tuple[Literal["pt", "safetensors"], ...] = ("pt", "safetensors")
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Compute and weight dtype (RDT uses bfloat16)."""
    batch_size: int = 8
    pad_multiple: int = 16
    fsdp: int = 1
    """Shard the T5 weights over this many devices (FSDP); 1 = default device."""


class UsageError(ValueError):
    """Options or inputs this script cannot use: reported in one line by ``main``."""


def read_instructions(path: pathlib.Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        items = json.loads(text)
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise UsageError(f"{path}: expected a JSON list of strings")
        return items
    return [line.strip() for line in text.splitlines() if line.strip()]


def rlds_instructions(dirs: tuple[pathlib.Path, ...]) -> list[str]:
    """The distinct instructions of the datasets' used episodes, in first-seen order."""
    from rdt_jax.data.rlds.source import RldsSource

    seen: dict[str, None] = {}
    for d in dirs:
        for text in RldsSource(d).instructions():
            seen.setdefault(text, None)
    return list(seen)


def hdf5_instructions(dirs: tuple[pathlib.Path, ...], robot: RobotConfig, skip_bad_episodes: bool = False
                      ) -> list[str]:
    """The distinct text instructions the directories' used episodes can draw, in first-seen order (episode
    file order, then the robot's instruction keys, then each key's list): exactly the texts training's
    embedding check looks up in the store. Entries naming precomputed embedding files are left out."""
    from rdt_jax.data.hdf5_source import HDF5Source

    seen: dict[str, None] = {}
    for d in dirs:
        # Same episode selection as training (too-short and, with skip_bad_episodes, unreadable files are
        # not used, so their instructions are never drawn), without decoding frames: only the JSONs matter.
        src = HDF5Source(d, robot, check_images=False, skip_bad_episodes=skip_bad_episodes)
        for _, text, embedding_path in src.instructions():
            if embedding_path is None:
                seen.setdefault(text, None)
    return list(seen)


def encode(args: Args) -> list[pathlib.Path]:
    sources = (args.instruction is not None, args.instructions_file is not None, bool(args.rlds_dirs),
               bool(args.hdf5_dirs))
    if sum(sources) != 1:
        raise UsageError("give exactly one of --instruction, --instructions-file, --rlds-dirs and --hdf5-dirs")
    if not args.hdf5_dirs and (args.robot != DEFAULT_ROBOT or args.skip_bad_episodes):
        # Silently ignoring them would let a user believe another robot's episodes were read.
        raise UsageError("--robot and --skip-bad-episodes only apply to --hdf5-dirs")
    if args.out_dir is None and args.store_dir is None:
        raise UsageError("give --out-dir, --store-dir or both")
    if args.out_dir is not None and "pt" in args.formats and importlib.util.find_spec("torch") is None:
        # Found before T5 is loaded (minutes for the XXL model), not at the first file written.
        raise UsageError("--formats pt (the default) writes torch files and needs torch: pip install "
                         "'rdt-jax[torch]', or pass --formats safetensors")
    if args.instruction is not None:
        if not args.name or "/" in args.name or args.name in (".", ".."):
            raise UsageError(f"--name must be a plain file stem, got {args.name!r}")
        texts, stems = [args.instruction], [args.name]
    else:
        if args.instructions_file:
            dirs, texts, what = [args.instructions_file], read_instructions(args.instructions_file), "no instructions"
        elif args.rlds_dirs:
            dirs, texts, what = args.rlds_dirs, rlds_instructions(args.rlds_dirs), "no instructions"
        else:
            dirs = args.hdf5_dirs
            texts = hdf5_instructions(dirs, load_robot_config(args.robot), args.skip_bad_episodes)
            what = ("no text instructions (every instruction entry names a precomputed .pt/.safetensors "
                    "embedding file, which training reads directly)")
        # Checked before T5 is loaded (minutes for the XXL model) only to encode nothing.
        if not texts:
            raise UsageError(f"{', '.join(map(str, dirs))}: {what}; nothing to encode")
        stems = [f"lang_embed_{i}" for i in range(len(texts))]
    store = EmbeddingStore(args.store_dir) if args.store_dir is not None else None
    dtype = jnp.dtype(args.dtype)
    mesh = None
    if args.fsdp > len(jax.devices()):
        raise UsageError(f"--fsdp {args.fsdp} needs as many devices; this process has {len(jax.devices())}")
    if args.fsdp > 1:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[: args.fsdp]), ("fsdp",))
    config = args.t5_dir / "config.json"
    if config.is_file():
        # Checked before the weights load (minutes for T5-XXL): RDT's language tokens are 4096 wide, so the
        # files of another width would be refused by training only later.
        d_model = json.loads(config.read_text()).get("d_model")
        if d_model != LANG_DIM:
            raise UsageError(f"{config}: d_model {d_model}; RDT's language tokens are {LANG_DIM} wide "
                             "(google/t5-v1_1-xxl)")
    tokenizer = load_t5_tokenizer(args.tokenizer_dir or args.t5_dir)
    encoder = load_t5(args.t5_dir, dtype=dtype, mesh=mesh)
    run = jax.jit(lambda enc, ids, mask: enc(ids, mask))
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    written: list[pathlib.Path] = []
    with tqdm(total=len(texts), desc="encoding", unit="instr", disable=len(texts) == 1) as bar:
        for start in range(0, len(texts), args.batch_size):
            batch = texts[start : start + args.batch_size]
            ids, mask = tokenize(tokenizer, batch, pad_to_multiple_of=args.pad_multiple)
            # Pad the batch dimension too, so the last partial batch reuses the compiled shape.
            n = len(batch)
            if args.instruction is None and n < args.batch_size:
                ids = np.pad(ids, ((0, args.batch_size - n), (0, 0)))
                mask = np.pad(mask, ((0, args.batch_size - n), (0, 0)))
            out = np.asarray(run(encoder, jnp.asarray(ids), jnp.asarray(mask)).astype(jnp.float32))
            for i, text in enumerate(batch):
                emb = out[i, : int(mask[i].sum())]
                stem = stems[start + i]
                if store is not None:
                    written.append(store.put(text, emb))
                if args.out_dir is None:
                    continue
                # Appended, not with_suffix: a stem like "task.v1" keeps its dot.
                if "pt" in args.formats:
                    path = args.out_dir / f"{stem}.pt"
                    single = args.instruction is not None
                    save_embedding_pt(path, emb, bfloat16=args.dtype == "bfloat16",
                                      instruction=text if single else None, name=stem if single else None)
                    written.append(path)
                if "safetensors" in args.formats:
                    path = args.out_dir / f"{stem}.safetensors"
                    save_embedding(path, emb, text)
                    written.append(path)
            bar.update(n)
    return written


def main(argv: list[str] | None = None) -> list[pathlib.Path]:
    args = tyro.cli(Args, args=argv)
    if not args.t5_dir.is_dir():
        raise SystemExit(f"error: --t5-dir {args.t5_dir}: no such directory")
    from rdt_jax.data.hdf5_source import EpisodeError
    from rdt_jax.data.robot_config import RobotConfigError
    from rdt_jax.encoders.hf_import import CheckpointMismatchError

    try:
        written = encode(args)
    except (UsageError, EpisodeError, RobotConfigError, CheckpointMismatchError, FileNotFoundError) as e:
        # each names its file or option
        raise SystemExit(f"error: {e}") from e
    where = " and ".join(str(d) for d in (args.out_dir, args.store_dir) if d is not None)
    print(f"wrote {len(written)} files to {where}", file=sys.stderr)
    return written


if __name__ == "__main__":
    main()
