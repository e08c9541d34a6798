"""The real models' shipped transformer configs and the recipes written for them: each config builds
its diffusers class (on the meta device, no weights), and each recipe validates for 32 ranks with a
sequence-parallel size that divides the real model's heads; the trainer has no family-specific code."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from megaflow.config import load_config, validate_config, validate_parallel
from megaflow.models import ADAPTERS
from megaflow.models.real import REAL_MODELS

#: Parameters of each real transformer (diffusers' count), to 0.01 B.
PARAMETERS_B = {"hunyuan_video_t2v": 12.82, "skyreels_v1_hunyuan_i2v": 12.82, "wan2.1_t2v_1.3b": 1.42,
                "wan2.1_t2v_14b": 14.29, "wan2.1_i2v_14b_480p": 16.39, "flux1_dev": 11.90, "sd3.5_medium": 2.24}


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_config_builds_and_its_recipe_fits_32_gpus(name):
    import diffusers
    from accelerate import init_empty_weights

    model = REAL_MODELS[name]
    config = model.config()
    cls = getattr(diffusers, config.pop("_class_name"))
    with init_empty_weights():
        transformer = cls.from_config(config)
    assert round(sum(p.numel() for p in transformer.parameters()) / 1e9, 2) == PARAMETERS_B[name]
    cfg = load_config(model.recipe)
    assert cfg.model.family == model.family and model.family in ADAPTERS
    validate_config(cfg)
    validate_parallel(cfg, world_size=32)
    heads = int(config["num_attention_heads"])
    assert heads % cfg.parallel.sp_size == 0, (name, heads, cfg.parallel.sp_size)
    assert model.download.endswith(f"--local-dir {cfg.model.path}")


def test_trainer_has_no_family_specific_code():
    """One trainer: the loop, rollout, update and checkpoint code never names a model family."""
    families = "|".join(sorted({*ADAPTERS, "hunyuan", "skyreels", "demo"}))
    pattern = re.compile(rf"(?<![a-z0-9])({families})(?![a-z])", re.IGNORECASE)  # also wan_sp, demo.base
    trainer = Path(__file__).parents[2] / "megaflow" / "trainer"
    found = [f"{path.name}:{n}: {line.strip()}" for path in sorted(trainer.glob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), start=1) if pattern.search(line)]
    assert found == []
