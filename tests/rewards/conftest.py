"""Tiny reward folders, written once per session in each reward's real layout."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_imagereward_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ImageReward folder converted from a random `ImageReward.pt` in the published key
    layout (`megaflow.rewards.imagereward.write_tiny_imagereward`); the checkpoint and the BERT
    base folder it came from sit beside it (`../ImageReward.pt`, `../base`)."""
    from megaflow.rewards.imagereward import write_tiny_imagereward

    return write_tiny_imagereward(tmp_path_factory.mktemp("tiny-imagereward"))


@pytest.fixture(scope="session")
def tiny_pickscore_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny `pickscore` folder (CLIPModel + tokenizer + preprocessor, `megaflow.rewards.clip`)."""
    from megaflow.rewards.clip import write_tiny_pickscore

    return write_tiny_pickscore(tmp_path_factory.mktemp("tiny-pickscore") / "pickscore")


@pytest.fixture(scope="session")
def tiny_clipscore_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny `clipscore` folder (a CLIPModel folder, `megaflow.rewards.clip`)."""
    from megaflow.rewards.clip import write_tiny_clipscore

    return write_tiny_clipscore(tmp_path_factory.mktemp("tiny-clipscore") / "clipscore")


@pytest.fixture(scope="session")
def tiny_hpsv2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny `hpsv2` folder converted by `convert_hpsv2` from a random open_clip-layout checkpoint;
    the checkpoint and the base folder sit beside it (`../HPS_tiny.pt`, `../base`)."""
    from megaflow.rewards.clip import write_tiny_hpsv2

    return write_tiny_hpsv2(tmp_path_factory.mktemp("tiny-hpsv2"))


@pytest.fixture(scope="session")
def tiny_aesthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny `aesthetic` folder (CLIPModel folder + `sac+logos+ava1-l14-linearMSE.pth` head)."""
    from megaflow.rewards.clip import write_tiny_aesthetic

    return write_tiny_aesthetic(tmp_path_factory.mktemp("tiny-aesthetic") / "aesthetic")


@pytest.fixture(scope="session")
def tiny_videoalign_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Tiny VideoReward checkpoints with their tiny Qwen2-VL base (`megaflow.rewards.videoalign.
    write_tiny_videoalign`), same network in both layouts: `"published"` (checkpoint-N/model.pth +
    tokenizer/) and `"adapter"` (LoRA safetensors + non_lora_state_dict.pth); each `(path, base)`."""
    from megaflow.rewards.videoalign import write_tiny_videoalign

    return {layout: write_tiny_videoalign(tmp_path_factory.mktemp(f"tiny-videoalign-{layout}"), layout=layout)
            for layout in ("published", "adapter")}
