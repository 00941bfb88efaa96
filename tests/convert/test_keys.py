"""The parameter trees of the released configs map one-to-one onto the released checkpoints' keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from rdt_jax.convert.keys import key_specs
from rdt_jax.model.config import RDTConfig, rdt_1b, rdt_170m
from rdt_jax.runner import abstract_policy


def _leaf_paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaf_paths(v, (*prefix, k))
    else:
        yield prefix, tuple(tree.shape)


@pytest.mark.parametrize("name,preset", [("1b", rdt_1b), ("170m", rdt_170m)])
def test_tree_maps_one_to_one_onto_release_keys(shared_dir, name, preset):
    release = json.loads((shared_dir / "fixtures" / f"rdt_keys_{name}.json").read_text())
    cfg = RDTConfig.from_official(release["config"])
    assert cfg == preset()  # the presets are the released configs
    # The parameter tree, without allocating memory.
    tree = nnx.to_pure_dict(nnx.state(abstract_policy(cfg), nnx.Param))
    leaves = dict(_leaf_paths(tree))
    specs = key_specs(cfg)
    official = [(e["key"], tuple(e["shape"])) for e in release["state_dict"]]
    assert [(s.torch_key, s.torch_shape) for s in specs] == official
    # Every tree leaf is covered, exactly once per layer slot, with the right per-layer shape.
    covered: dict[tuple, set] = {}
    for s in specs:
        assert s.path in leaves, f"{s.torch_key} -> {s.path} not in the parameter tree"
        shape = leaves[s.path]
        if s.layer is None:
            assert shape == s.jax_shape, s.torch_key
        else:
            assert shape[1:] == s.jax_shape and 0 <= s.layer < shape[0], s.torch_key
        covered.setdefault(s.path, set()).add(s.layer)
    assert set(covered) == set(leaves)
    for path, layers in covered.items():
        n = leaves[path][0] if None not in layers else 1
        assert len(layers) == n, path
    total = sum(int(np.prod(shape)) for shape in leaves.values())
    assert total == release["total_params"]


@pytest.mark.parametrize("depth", [1, 3, 5])
def test_odd_depth_and_other_sizes(depth):
    cfg = RDTConfig(hidden_size=96, depth=depth, num_heads=3, lang_token_dim=40, img_token_dim=24,
                    state_token_dim=10, action_dim=10, pred_horizon=7, max_lang_cond_len=9, img_cond_len=12,
                    lang_pos_embed_config=(("lang", -9),), img_pos_embed_config=(("image", (2, 2, -3)),),
                    state_adaptor="mlp2x_gelu", img_adaptor="linear")
    tree = dict(_leaf_paths(nnx.to_pure_dict(nnx.state(abstract_policy(cfg), nnx.Param))))
    specs = key_specs(cfg)
    assert sum(1 for s in specs if s.torch_key.endswith("norm1.weight")) == depth
    assert tree[("model", "lang_blocks", "norm1", "weight")] == ((depth + 1) // 2, 96)
    assert (("model", "img_blocks", "norm1", "weight") in tree) == (depth > 1)
    assert tree[("model", "final_layer", "ffn_final", "fc2", "kernel")] == (96, 10)


@pytest.mark.parametrize("spec", ["linear", "mlp1x_gelu", "mlp3x_gelu"])
def test_adaptor_keys_are_the_official_modules(spec):
    """build_condition_adapter: "linear" is a bare nn.Linear (keys without an index), "mlp{k}x_gelu" an
    nn.Sequential of Linear / GELU (Linear layers at even indices), "mlp1x_gelu" included."""
    torch = pytest.importorskip("torch")
    din, dout = 40, 96
    if spec == "linear":
        module = torch.nn.Linear(din, dout)
    else:
        k = int(spec[3 : spec.index("x")])
        layers = [torch.nn.Linear(din, dout)]
        for _ in range(k - 1):
            layers += [torch.nn.GELU(approximate="tanh"), torch.nn.Linear(dout, dout)]
        module = torch.nn.Sequential(*layers)
    cfg = RDTConfig(hidden_size=dout, depth=1, num_heads=3, lang_token_dim=din, img_token_dim=24, state_token_dim=10,
                    action_dim=10, pred_horizon=7, max_lang_cond_len=9, img_cond_len=12, lang_adaptor=spec,
                    lang_pos_embed_config=(("lang", -9),), img_pos_embed_config=(("image", (2, 2, -3)),))
    ours = {s.torch_key: s.torch_shape for s in key_specs(cfg) if s.torch_key.startswith("lang_adaptor.")}
    want = {f"lang_adaptor.{k}": tuple(v.shape) for k, v in module.state_dict().items()}
    assert ours == want
