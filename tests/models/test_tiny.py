"""The tiny Wan folder: deterministic, complete, cached atomically."""
from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from megaflow.models import tiny
from megaflow.models.tiny import TINY_MAX_SEQUENCE_LENGTH, TINY_WAN_NAME, tiny_model_dir, write_tiny_wan
from megaflow.models.wan import WAN_COMPONENTS, check_wan_folder


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_write_tiny_wan_is_deterministic(tiny_wan_dir: Path, tmp_path: Path) -> None:
    again = files(write_tiny_wan(tmp_path / "again", seed=0))
    first = files(tiny_wan_dir)
    assert again.keys() == first.keys()
    assert {k for k in first if k.endswith(".safetensors")} == {
        f"{c}/{n}" for c, n in [("transformer", "diffusion_pytorch_model.safetensors"),
                                ("vae", "diffusion_pytorch_model.safetensors"),
                                ("text_encoder", "model.safetensors")]
    }
    assert again == first
    other = files(write_tiny_wan(tmp_path / "other", seed=1))
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert other[weights] != first[weights]
    assert other["tokenizer/tokenizer.json"] == first["tokenizer/tokenizer.json"]


def test_tiny_tokenizer(tiny_wan_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_wan_dir / "tokenizer")
    assert tok.model_max_length == TINY_MAX_SEQUENCE_LENGTH
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("A red ball rolling").input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a red ball rolling"
    batch = tok(["a cat", "zebra-like quokka"], padding="max_length", max_length=8, truncation=True,
                return_tensors="pt")
    assert batch.input_ids.shape == (2, 8) and batch.attention_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_tiny_model_dir_writes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEGAFLOW_CACHE", str(tmp_path / "env-cache"))
    folder = tiny_model_dir()
    assert folder == tmp_path / "env-cache" / TINY_WAN_NAME
    check_wan_folder(folder)
    assert all((folder / c).is_dir() for c in WAN_COMPONENTS) and (folder / "model_index.json").is_file()
    stamp = (folder / "model_index.json").stat().st_mtime_ns

    def fail(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the cached folder must not be rewritten")

    monkeypatch.setattr(tiny, "write_tiny_wan", fail)
    assert tiny_model_dir() == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp
    assert [p.name for p in folder.parent.iterdir()] == [TINY_WAN_NAME]


def test_tiny_model_dir_loses_race_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process finishing first: its folder is kept, ours is discarded, no temp dir left."""
    real_write = tiny.write_tiny_wan
    final = tmp_path / TINY_WAN_NAME

    def racing_write(folder: Path, seed: int = 0) -> Path:
        real_write(final)
        (final / "winner").write_text("other process")
        return real_write(folder, seed)

    monkeypatch.setattr(tiny, "write_tiny_wan", racing_write)
    assert tiny_model_dir(tmp_path) == final
    assert (final / "winner").read_text() == "other process"
    assert [p.name for p in tmp_path.iterdir()] == [TINY_WAN_NAME]
