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

Each instruction gets its unpadded ``(L, 4096)`` embedding (EOS included), written in the
official ``.pt`` layout and/or our ``.safetensors`` layout (``--formats``; see
``rdt_jax.encoders.lang_embeddings``). The ``.pt`` layout is the official script's of the same
mode: for one instruction ``encode_lang.py``'s dict ``{"name", "instruction", "embeddings":
(1, L, 4096)}`` (what the deployment loads), for a file ``encode_lang_batch.py``'s bare tensor.
Sequences are padded to a multiple of ``--pad-multiple`` (masked) so the jitted encoder compiles
for few lengths; real-token outputs do not depend on it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from tqdm import tqdm

from rdt_jax.data.language import EmbeddingStore
from rdt_jax.encoders import load_t5
from rdt_jax.encoders.lang_embeddings import save_lang_embedding_pt, save_lang_embedding_safetensors
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


def read_instructions(path: pathlib.Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        items = json.loads(text)
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError(f"{path}: expected a JSON list of strings")
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


def encode(args: Args) -> list[pathlib.Path]:
    if sum((args.instruction is not None, args.instructions_file is not None, bool(args.rlds_dirs))) != 1:
        raise ValueError("give exactly one of --instruction, --instructions-file and --rlds-dirs")
    if args.out_dir is None and args.store_dir is None:
        raise ValueError("give --out-dir, --store-dir or both")
    if args.instruction is not None:
        if not args.name or "/" in args.name or args.name in (".", ".."):
            raise ValueError(f"--name must be a plain file stem, got {args.name!r}")
        texts, stems = [args.instruction], [args.name]
    else:
        texts = (read_instructions(args.instructions_file) if args.instructions_file
                 else rlds_instructions(args.rlds_dirs))
        stems = [f"lang_embed_{i}" for i in range(len(texts))]
    store = EmbeddingStore(args.store_dir) if args.store_dir is not None else None
    dtype = jnp.dtype(args.dtype)
    mesh = None
    if args.fsdp > len(jax.devices()):
        raise ValueError(f"--fsdp {args.fsdp} needs as many devices; this process has {len(jax.devices())}")
    if args.fsdp > 1:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[: args.fsdp]), ("fsdp",))
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
                    save_lang_embedding_pt(path, emb, bfloat16=args.dtype == "bfloat16",
                                           instruction=text if single else None, name=stem if single else None)
                    written.append(path)
                if "safetensors" in args.formats:
                    path = args.out_dir / f"{stem}.safetensors"
                    save_lang_embedding_safetensors(path, emb, text)
                    written.append(path)
            bar.update(n)
    return written


def main(argv: list[str] | None = None) -> list[pathlib.Path]:
    args = tyro.cli(Args, args=argv)
    if not args.t5_dir.is_dir():
        raise SystemExit(f"error: --t5-dir {args.t5_dir}: no such directory")
    written = encode(args)
    where = " and ".join(str(d) for d in (args.out_dir, args.store_dir) if d is not None)
    print(f"wrote {len(written)} files to {where}", file=sys.stderr)
    return written


if __name__ == "__main__":
    main()
