"""The real models megaflow's recipes are written for: each one's transformer `config.json`
(shipped in `megaflow/models/configs/`, a few KB each, so a recipe can be checked, and later
benchmarked with random weights, without downloading the weights), its family, recipe and where
to download it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIGS_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class RealModel:
    """One published model: `family` (adapter), `recipe` (built-in recipe), `repo` (Hugging Face
    repository of the diffusers-format folder)."""

    name: str
    family: str
    recipe: str
    repo: str

    def config(self) -> dict[str, Any]:
        """The transformer's `config.json` (diffusers' class name under `_class_name`)."""
        return json.loads((CONFIGS_DIR / f"{self.name}.json").read_text())

    @property
    def download(self) -> str:
        """The command that fetches the weights into the recipe's `model.path`."""
        from megaflow.config import load_config

        return f"huggingface-cli download {self.repo} --local-dir {load_config(self.recipe).model.path}"


REAL_MODELS: dict[str, RealModel] = {m.name: m for m in (
    RealModel("hunyuan_video_t2v", "hunyuan", "hunyuan_t2v", "hunyuanvideo-community/HunyuanVideo"),
    RealModel("skyreels_v1_hunyuan_i2v", "skyreels_i2v", "skyreels_i2v", "Skywork/SkyReels-V1-Hunyuan-I2V"),
    RealModel("wan2.1_t2v_1.3b", "wan", "wan_t2v_1_3b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    RealModel("wan2.1_t2v_14b", "wan", "wan_t2v_14b", "Wan-AI/Wan2.1-T2V-14B-Diffusers"),
    RealModel("wan2.1_i2v_14b_480p", "wan_i2v", "wan_i2v_14b", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"),
    RealModel("flux1_dev", "flux", "flux", "black-forest-labs/FLUX.1-dev"),
    RealModel("sd3.5_medium", "sd3", "sd35", "stabilityai/stable-diffusion-3.5-medium"),
)}
