"""DeepSpeed templates: every "auto" filled from the recipe; a user file may fix values."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megaflow.config import load_config
from megaflow.errors import ConfigError
from megaflow.parallel.engine import load_ds_config, template_path


def _cfg(*overrides):
    return load_config("tiny", ["train.lr=3e-4", "train.weight_decay=0.01", "train.adam_eps=1e-6",
                                "train.grad_clip=0.5", "train.micro_batch_size=2", *overrides])


def test_zero3_template_filled_from_recipe():
    cfg = _cfg("parallel.zero_stage=3", "parallel.hpz_partition_size=4")
    ds, adamw = load_ds_config(cfg, grad_accum_steps=10)
    assert template_path(cfg).name == "zero3.json"
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 10
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["zero_hpz_partition_size"] == 4
    assert "optimizer" not in ds  # megaflow builds the AdamW itself
    assert adamw == {"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01}
    assert "auto" not in json.dumps(ds)


def test_offload_and_zero2_templates():
    ds, _ = load_ds_config(_cfg("parallel.zero_stage=3", "parallel.offload=true"), grad_accum_steps=1)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    ds, _ = load_ds_config(_cfg("parallel.zero_stage=2"), grad_accum_steps=1)
    assert ds["zero_optimization"]["stage"] == 2


def test_user_file_values_win_and_mismatches_are_errors(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": 2.0, "zero_optimization": {"stage": 3},
                                "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}))
    ds, adamw = load_ds_config(_cfg("parallel.zero_stage=3", f"parallel.ds_config={path}"), grad_accum_steps=1)
    assert ds["gradient_clipping"] == 2.0 and adamw["lr"] == 1e-5 and adamw["eps"] == 1e-6
    with pytest.raises(ConfigError, match="zero_optimization.stage=3 but parallel.zero_stage=2"):
        load_ds_config(_cfg("parallel.zero_stage=2", f"parallel.ds_config={path}"), grad_accum_steps=1)
    path.write_text(json.dumps({"optimizer": {"type": "Lamb"}}))
    with pytest.raises(ConfigError, match="optimizer type 'Lamb' is not supported"):
        load_ds_config(_cfg("parallel.zero_stage=3", f"parallel.ds_config={path}"), grad_accum_steps=1)


def test_templates_are_package_data_and_zero3_keeps_torch_linear(tmp_path):
    """The templates come from the installed package (`megaflow.ds_configs`, the repository's
    ds_configs/ folder); ZeRO-3 leaves torch's fused linear alone unless a user file asks."""
    import megaflow.ds_configs

    cfg = _cfg("parallel.zero_stage=3")
    assert template_path(cfg).parent == Path(megaflow.ds_configs.__file__).parent
    ds, _ = load_ds_config(cfg, grad_accum_steps=1)
    assert ds["zero_optimization"]["memory_efficient_linear"] is False
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    ds, _ = load_ds_config(_cfg("parallel.zero_stage=3", f"parallel.ds_config={path}"), grad_accum_steps=1)
    assert ds["zero_optimization"]["memory_efficient_linear"] is False
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "memory_efficient_linear": True}}))
    ds, _ = load_ds_config(_cfg("parallel.zero_stage=3", f"parallel.ds_config={path}"), grad_accum_steps=1)
    assert ds["zero_optimization"]["memory_efficient_linear"] is True
