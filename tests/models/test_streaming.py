"""Module-by-module safetensors writing and reading (`megaflow.models.streaming`) against diffusers'
own `from_pretrained` / `save_pretrained` on the tiny Wan transformer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from megaflow.models.streaming import (
    WEIGHTS_INDEX_NAME, WEIGHTS_NAME, SafetensorsStreamWriter, TensorSpec, load_model_streaming, save_model_streaming,
)


@pytest.fixture(scope="module")
def transformer(tiny_wan_dir: Path) -> WanTransformer3DModel:
    model = WanTransformer3DModel.from_pretrained(tiny_wan_dir / "transformer")
    with torch.no_grad():  # distinct values everywhere, so a swapped tensor cannot pass
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * (i + 1))
    return model


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_single_file_loads_with_from_pretrained(transformer, tmp_path):
    save_model_streaming(transformer, tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["config.json", WEIGHTS_NAME]
    _assert_same(WanTransformer3DModel.from_pretrained(tmp_path / "t"), transformer)
    # The same tensors as diffusers' own writer, byte for byte per tensor.
    transformer.save_pretrained(tmp_path / "ref")
    ours, theirs = load_file(str(tmp_path / "t" / WEIGHTS_NAME)), load_file(str(tmp_path / "ref" / WEIGHTS_NAME))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_shards_and_index_match_save_pretrained_and_load(transformer, tmp_path):
    save_model_streaming(transformer, tmp_path / "t", max_shard_size=20_000)
    transformer.save_pretrained(tmp_path / "ref", max_shard_size=20_000)
    ours = json.loads((tmp_path / "t" / WEIGHTS_INDEX_NAME).read_text())
    theirs = json.loads((tmp_path / "ref" / WEIGHTS_INDEX_NAME).read_text())
    assert len(set(ours["weight_map"].values())) > 2
    assert ours["metadata"]["total_size"] == theirs["metadata"]["total_size"]
    assert ours["weight_map"].keys() == theirs["weight_map"].keys()
    _assert_same(WanTransformer3DModel.from_pretrained(tmp_path / "t"), transformer)


def test_bf16_with_fp32_modules_round_trips(tiny_wan_dir, tmp_path):
    model = WanTransformer3DModel.from_pretrained(tiny_wan_dir / "transformer", torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}
    save_model_streaming(model, tmp_path / "t", max_shard_size=30_000)
    _assert_same(WanTransformer3DModel.from_pretrained(tmp_path / "t", torch_dtype=torch.bfloat16), model)


def test_load_streaming_fills_every_parameter(transformer, tiny_wan_dir, tmp_path):
    save_model_streaming(transformer, tmp_path / "t", max_shard_size=20_000)
    fresh = WanTransformer3DModel.from_pretrained(tiny_wan_dir / "transformer")
    load_model_streaming(fresh, tmp_path / "t")
    _assert_same(fresh, transformer)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model_streaming(fresh, tmp_path)


def test_writer_refuses_tensors_out_of_order_or_of_another_shape(tmp_path):
    specs = {"a": TensorSpec(torch.float32, (2, 3)), "b": TensorSpec(torch.bfloat16, (4,))}
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(ValueError, match="got tensor b, expected a"):
        w.write("b", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="header says"):
        w.write("a", torch.zeros(3, 2))
    w.write("a", torch.arange(6.0).reshape(2, 3))
    with pytest.raises(ValueError, match="1 tensors were never written"):
        w.close()
    w = SafetensorsStreamWriter(tmp_path / "y.safetensors", specs)
    w.write("a", torch.arange(6.0).reshape(2, 3))
    w.write("b", torch.tensor([1, 2, 3, 4], dtype=torch.bfloat16))
    w.close()
    got = load_file(str(tmp_path / "y.safetensors"))
    assert torch.equal(got["a"], torch.arange(6.0).reshape(2, 3))
    assert got["b"].dtype == torch.bfloat16 and got["b"].tolist() == [1, 2, 3, 4]
