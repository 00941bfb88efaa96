"""The converter: strict errors that write nothing, every input format, exact round trips."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import save_file

import rdt_jax
from rdt_jax.convert.cli import main as convert_main
from rdt_jax.convert.weights_io import WeightFileError


@pytest.fixture(scope="module")
def small_dir(shared_dir) -> pathlib.Path:
    return shared_dir / "fixtures" / "rdt_small"


@pytest.fixture(scope="module")
def state(small_dir) -> dict[str, torch.Tensor]:
    return torch.load(small_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)


def _convert(src, out, *extra) -> int:
    return convert_main([str(src), str(out), *map(str, extra)])


def _bad_file(tmp_path, small_dir, state, suffix: str) -> pathlib.Path:
    d = tmp_path / "src"
    d.mkdir()
    shutil.copy(small_dir / "config.json", d / "config.json")
    if suffix == ".bin":
        torch.save(state, d / "pytorch_model.bin")
    else:
        save_file(state, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("fmt", [".bin", ".safetensors"])
@pytest.mark.parametrize(
    "corruption,message",
    [
        ("missing", "missing key"),
        ("extra", "unexpected key"),
        ("shape", "shape mismatch for model.blocks.1.cross_attn.kv.weight"),
        ("int", "tensor model.blocks.0.norm1.weight is int32, expected floating point"),
        ("nan", "tensor model.blocks.0.norm1.weight holds NaN/inf"),
    ],
)
def test_bad_checkpoints_fail_clearly_and_write_nothing(tmp_path, small_dir, state, capsys, fmt, corruption, message):
    state = dict(state)
    if corruption == "missing":
        del state["model.blocks.3.attn.q_norm.weight"]
    elif corruption == "extra":
        state["model.blocks.9.attn.q_norm.weight"] = torch.ones(32)
    elif corruption == "shape":
        state["model.blocks.1.cross_attn.kv.weight"] = torch.zeros(256, 127)
    elif corruption == "int":
        state["model.blocks.0.norm1.weight"] = state["model.blocks.0.norm1.weight"].to(torch.int32)
    else:
        bad = state["model.blocks.0.norm1.weight"].clone()
        bad[3] = float("nan")
        state["model.blocks.0.norm1.weight"] = bad
    src = _bad_file(tmp_path, small_dir, state, fmt)
    out = tmp_path / "out"
    assert _convert(src, out) == 1
    err = capsys.readouterr().err
    assert message in err
    if corruption == "missing":  # named with the shape it should have
        assert "model.blocks.3.attn.q_norm.weight (32,)" in err
    if corruption == "extra":
        assert "model.blocks.9.attn.q_norm.weight (32,)" in err
    if corruption == "shape":
        assert "(256, 127)" in err and "(256, 128)" in err
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir()), "temp output left behind"


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_truncated_file(tmp_path, small_dir, capsys, name):
    data = (small_dir / name).read_bytes()
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(small_dir / "config.json", src / "config.json")
    (src / name).write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert _convert(src, out) == 1
    assert str(src / name) in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("content", [b"garbage", b"\x80\x02}q\x00"])  # not a torch file; a cut-off legacy pickle
def test_unreadable_bin_is_a_clear_error(tmp_path, small_dir, capsys, content):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(small_dir / "config.json", src / "config.json")
    (src / "pytorch_model.bin").write_bytes(content)
    assert _convert(src, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"{src / 'pytorch_model.bin'}: cannot load torch file" in err
    assert not (tmp_path / "out").exists()


def test_bin_without_torch_says_how_to_install_it(small_dir, monkeypatch):
    import sys

    from rdt_jax.convert.weights_io import open_weights

    monkeypatch.setitem(sys.modules, "torch", None)  # an install without the torch extra
    with pytest.raises(WeightFileError, match=r"pytorch_model\.bin: reading \.bin/\.pt files needs torch; install "
                                              r"the extra: pip install 'rdt-jax\[torch\]'"):
        open_weights(small_dir / "pytorch_model.bin")


def test_missing_source_and_models_without_an_official_form(tmp_path, small_dir, capsys):
    assert _convert(tmp_path / "typo", tmp_path / "out") == 1
    assert "typo: no such file or directory" in capsys.readouterr().err
    # A model with the true RMS norm (an rdt-jax option) has no official equivalent: --to-torch refuses it.
    cfg = json.loads((small_dir / "config.json").read_text())
    cfg["rdt_jax"] = {"norm_form": "rms"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert _convert(small_dir / "model.safetensors", tmp_path / "rms", "--config", tmp_path / "config.json") == 0
    assert _convert(tmp_path / "rms", tmp_path / "back", "--to-torch") == 1
    assert "norm_form='rms', which the official code does not implement" in capsys.readouterr().err
    assert not (tmp_path / "back").exists()
    with pytest.raises(FileNotFoundError, match="convert it first"):
        rdt_jax.load_pretrained(small_dir)


def test_to_torch_needs_an_rdt_jax_directory(tmp_path, small_dir, capsys):
    """The official directory given to --to-torch by mistake: a clear message, with or without --dtype."""
    for extra in ((), ("--dtype", "float32")):
        assert _convert(small_dir, tmp_path / "out", "--to-torch", *extra) == 1
        assert "no params/ checkpoint directory" in capsys.readouterr().err


def test_output_must_be_empty(tmp_path, small_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert _convert(small_dir, out) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"


def test_single_file_needs_config(tmp_path, small_dir, capsys):
    assert _convert(small_dir / "model.safetensors", tmp_path / "out") == 1
    assert "--config" in capsys.readouterr().err


def test_deepspeed_model_states(tmp_path, small_dir, state, cases):
    ds = {"module": dict(state), "buffer_names": [], "ds_version": "0.14.2", "global_steps": 10}
    torch.save(ds, tmp_path / "mp_rank_00_model_states.pt")
    out = tmp_path / "out"
    assert _convert(tmp_path / "mp_rank_00_model_states.pt", out, "--config", small_dir / "config.json") == 0
    runner = rdt_jax.load_pretrained(out)
    o = runner.model(cases["fwd.x"], cases["fwd.freq"], cases["fwd.t"], cases["fwd.lang_c"], cases["fwd.img_c"],
                     cases["fwd.lang_mask"])
    np.testing.assert_allclose(o, cases["fwd.out"], rtol=0, atol=1e-5 * np.abs(cases["fwd.out"]).max())


def test_bf16_release_file_converts(tmp_path, small_dir, state):
    # The released checkpoints store bfloat16 tensors.
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    torch.save(bf16, tmp_path / "pytorch_model.bin")
    shutil.copy(small_dir / "config.json", tmp_path / "config.json")
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"out_{dtype}"
        assert _convert(tmp_path, out, "--dtype", dtype) == 0
        runner = rdt_jax.load_pretrained(out)
        got = dict(_torch_named(runner))
        for key, value in bf16.items():
            np.testing.assert_array_equal(got[key].astype(np.float32), value.float().numpy(), err_msg=key)
        # Loaded in the dtype it was converted to unless asked otherwise (bf16: half the memory).
        assert {str(x.dtype) for x in jax.tree.leaves(runner.param_dict())} == {dtype}
        assert runner.config.param_dtype == runner.config.dtype == dtype
        assert {str(x.dtype) for x in jax.tree.leaves(rdt_jax.load_pretrained(out, "float32").param_dict())} == {
            "float32"}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_checkpoint_converts_like_the_single_file(tmp_path, small_dir, state, capsys, fmt):
    """A fine-tune saved by save_pretrained above its shard size: shards plus an index file naming each
    tensor's shard. Converted from the directory or the index file, the weights are those of the single file."""
    src = tmp_path / "sharded"
    src.mkdir()
    shutil.copy(small_dir / "config.json", src / "config.json")
    keys = list(state)
    halves = {f"model-0000{i + 1}-of-00002.{fmt}": keys[i::2] for i in range(2)}
    for name, part in halves.items():
        shard = {k: state[k].contiguous() for k in part}
        if fmt == "safetensors":
            save_file(shard, str(src / name))
        else:
            torch.save(shard, src / name)
    index = src / ("model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json")
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: n for n, part in halves.items() for k in part}}))
    assert _convert(src, tmp_path / "from_dir") == 0
    assert _convert(index, tmp_path / "from_index", "--config", src / "config.json") == 0
    assert _convert(small_dir / "model.safetensors", tmp_path / "single", "--config", small_dir / "config.json") == 0
    want = dict(_torch_named(rdt_jax.load_pretrained(tmp_path / "single")))
    for out in ("from_dir", "from_index"):
        got = dict(_torch_named(rdt_jax.load_pretrained(tmp_path / out)))
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # A shard that lacks a tensor the index places there (not its first): named, nothing written.
    first, part = next(iter(halves.items()))
    capsys.readouterr()
    if fmt == "safetensors":
        save_file({k: state[k].contiguous() for k in part[:-1]}, str(src / first))
        assert _convert(src, tmp_path / "lacking") == 1
        assert f"{first}: 1 tensor(s) that model.safetensors.index.json places there are missing: {part[-1]}" in (
            capsys.readouterr().err)
        assert not (tmp_path / "lacking").exists()
    (src / first).unlink()
    assert _convert(src, tmp_path / "broken") == 1
    assert f"shard {first} does not exist" in capsys.readouterr().err


def _torch_named(runner):
    from rdt_jax.convert.params import torch_state_from_params

    return torch_state_from_params(runner.param_dict(), runner.config)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_jax_torch_jax_is_exact(tmp_path, small_dir, state, dtype):
    jax1 = tmp_path / "jax1"
    assert _convert(small_dir, jax1, "--dtype", dtype) == 0
    torch_dir = tmp_path / "torch"
    assert _convert(jax1, torch_dir, "--to-torch") == 0
    # The official layout: config in the official schema, both weight files, official keys/shapes.
    official_cfg = json.loads((small_dir / "config.json").read_text())
    assert json.loads((torch_dir / "config.json").read_text()) == official_cfg
    from_bin = torch.load(torch_dir / "pytorch_model.bin", weights_only=True)
    from_st = load_np(str(torch_dir / "model.safetensors")) if dtype == "float32" else None
    assert list(from_bin) == list(state)
    for key, value in state.items():
        assert tuple(from_bin[key].shape) == tuple(value.shape), key
        expected = value.to(torch.bfloat16) if dtype == "bfloat16" else value
        assert torch.equal(from_bin[key], expected), key
        if from_st is not None:
            np.testing.assert_array_equal(from_st[key], value.numpy(), err_msg=key)
    jax2 = tmp_path / "jax2"
    assert _convert(torch_dir, jax2, "--dtype", dtype) == 0
    p1 = rdt_jax.load_pretrained(jax1, dtype=dtype).param_dict()
    p2 = rdt_jax.load_pretrained(jax2, dtype=dtype).param_dict()
    import jax

    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p1), jax.tree.leaves(p2), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)


def test_load_pretrained_errors(tmp_path, small_dir):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        rdt_jax.load_pretrained(tmp_path)
    out = tmp_path / "jax"
    assert _convert(small_dir, out) == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["rdt"]["depth"] = 6
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightFileError, match="does not match the config"):
        rdt_jax.load_pretrained(out)


def test_torch_reader_release_keeps_values_and_drops_resident_pages(tmp_path):
    """Released tensors of a memory-mapped .bin leave the resident set, and still read the same."""
    from rdt_jax.convert.weights_io import TorchReader

    def resident_bytes() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    big = torch.arange(16 << 20, dtype=torch.float32).reshape(4096, 4096)  # 64 MiB
    torch.save({"big": big, "small": torch.ones(3)}, tmp_path / "w.bin")
    del big
    reader = TorchReader(tmp_path / "w.bin")
    before = resident_bytes()
    first = reader.get("big").copy()  # touches every page of the mapping
    touched = resident_bytes()
    reader.release("big")
    released = resident_bytes()
    assert touched - before > 48 << 20, "reading did not fault the mapping in (test premise)"
    assert touched - released > 48 << 20, "release left the mapped pages resident"
    np.testing.assert_array_equal(reader.get("big"), first)  # re-read from the file
    np.testing.assert_array_equal(reader.get("small"), np.ones(3, np.float32))
