"""The one-to-one map between the official PyTorch state-dict keys and our parameter tree.

Our tree (``nnx.to_pure_dict(state)``) stores Linear kernels as (in, out) and the blocks
stacked: block ``i`` lives at index ``i // 2`` of ``model/lang_blocks`` (even ``i``) or
``model/img_blocks`` (odd ``i``). Everything else is a rename.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from rdt_jax.model.config import RDTConfig, adaptor_depth

ParamPath = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class KeySpec:
    torch_key: str
    torch_shape: tuple[int, ...]
    path: ParamPath  # path in the pure-dict param tree
    layer: int | None  # index along the stacked layer axis, if any
    transpose: bool  # Linear weight: torch (out, in) <-> ours (in, out)

    @property
    def jax_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.torch_shape)) if self.transpose else self.torch_shape


def _linear(prefix: str, path: ParamPath, din: int, dout: int, layer: int | None = None) -> Iterator[KeySpec]:
    yield KeySpec(f"{prefix}.weight", (dout, din), (*path, "kernel"), layer, True)
    yield KeySpec(f"{prefix}.bias", (dout,), (*path, "bias"), layer, False)


def _norm(prefix: str, path: ParamPath, dim: int, layer: int | None = None) -> Iterator[KeySpec]:
    yield KeySpec(f"{prefix}.weight", (dim,), (*path, "weight"), layer, False)


def _block(cfg: RDTConfig, i: int) -> Iterator[KeySpec]:
    d, hd = cfg.hidden_size, cfg.head_dim
    pre = f"model.blocks.{i}"
    base: ParamPath = ("model", "lang_blocks" if i % 2 == 0 else "img_blocks")
    layer = i // 2
    yield from _norm(f"{pre}.norm1", (*base, "norm1"), d, layer)
    yield from _linear(f"{pre}.attn.qkv", (*base, "attn", "qkv"), d, 3 * d, layer)
    yield from _norm(f"{pre}.attn.q_norm", (*base, "attn", "q_norm"), hd, layer)
    yield from _norm(f"{pre}.attn.k_norm", (*base, "attn", "k_norm"), hd, layer)
    yield from _linear(f"{pre}.attn.proj", (*base, "attn", "proj"), d, d, layer)
    yield from _linear(f"{pre}.cross_attn.q", (*base, "cross_attn", "q"), d, d, layer)
    yield from _linear(f"{pre}.cross_attn.kv", (*base, "cross_attn", "kv"), d, 2 * d, layer)
    yield from _norm(f"{pre}.cross_attn.q_norm", (*base, "cross_attn", "q_norm"), hd, layer)
    yield from _norm(f"{pre}.cross_attn.k_norm", (*base, "cross_attn", "k_norm"), hd, layer)
    yield from _linear(f"{pre}.cross_attn.proj", (*base, "cross_attn", "proj"), d, d, layer)
    yield from _norm(f"{pre}.norm2", (*base, "norm2"), d, layer)
    yield from _linear(f"{pre}.ffn.fc1", (*base, "ffn", "fc1"), d, d, layer)
    yield from _linear(f"{pre}.ffn.fc2", (*base, "ffn", "fc2"), d, d, layer)
    yield from _norm(f"{pre}.norm3", (*base, "norm3"), d, layer)


def _adaptor(name: str, spec: str, din: int, dout: int) -> Iterator[KeySpec]:
    if spec == "linear":  # the official build_condition_adapter returns a bare nn.Linear: no index
        yield from _linear(name, (name, "layers", 0), din, dout)
        return
    for j in range(adaptor_depth(spec)):
        # nn.Sequential puts Linear layers at even indices (GELUs at odd ones); "mlp1x_gelu" is a Sequential too.
        yield from _linear(f"{name}.{2 * j}", (name, "layers", j), din if j == 0 else dout, dout)


def key_specs(cfg: RDTConfig) -> list[KeySpec]:
    """Every official state-dict entry, in the official order."""
    d = cfg.hidden_size
    specs: list[KeySpec] = [
        KeySpec("model.x_pos_embed", (1, cfg.x_seq_len, d), ("model", "x_pos_embed"), None, False),
        KeySpec("model.lang_cond_pos_embed", (1, cfg.max_lang_cond_len, d), ("model", "lang_cond_pos_embed"),
                None, False),
        KeySpec("model.img_cond_pos_embed", (1, cfg.img_cond_len, d), ("model", "img_cond_pos_embed"), None, False),
    ]
    for emb in ("t_embedder", "freq_embedder"):
        specs += _linear(f"model.{emb}.mlp.0", ("model", emb, "mlp0"), 256, d)
        specs += _linear(f"model.{emb}.mlp.2", ("model", emb, "mlp2"), d, d)
    for i in range(cfg.depth):
        specs += _block(cfg, i)
    specs += _norm("model.final_layer.norm_final", ("model", "final_layer", "norm_final"), d)
    specs += _linear("model.final_layer.ffn_final.fc1", ("model", "final_layer", "ffn_final", "fc1"), d, d)
    specs += _linear("model.final_layer.ffn_final.fc2", ("model", "final_layer", "ffn_final", "fc2"), d,
                     cfg.action_dim)
    specs += _adaptor("lang_adaptor", cfg.lang_adaptor, cfg.lang_token_dim, d)
    specs += _adaptor("img_adaptor", cfg.img_adaptor, cfg.img_token_dim, d)
    specs += _adaptor("state_adaptor", cfg.state_adaptor, 2 * cfg.state_token_dim, d)
    return specs
