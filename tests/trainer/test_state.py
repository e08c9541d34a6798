"""Checkpoint bookkeeping of the single-process trainer: what a resume refuses (before any model is
loaded), starting a new run from exported weights, and the KL reference's dtype."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import megaflow.trainer.loop as loop
from megaflow.config import load_config
from megaflow.errors import ConfigError
from megaflow.parallel.topology import Topology
from megaflow.trainer.export import export_checkpoint
from megaflow.trainer.state import COMPLETE_MARKER, checkpoint_dir


def _cfg(out, model_dir, *overrides):
    return load_config("tiny", [f"output_dir={out}", f"model.path={model_dir}", "train.iterations=1",
                                "train.sample_every=0", *overrides])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_wan_dir):
    """A finished one-iteration LoRA run (single process)."""
    out = tmp_path_factory.mktemp("lora-run")
    loop.Trainer(_cfg(out, tiny_wan_dir, "train.lr=1e-2"), show_progress=False).train()
    return out


@pytest.mark.parametrize("overrides, world, message", [
    (["model.lora=false"], 1, r"model.lora: checkpoint True, this run False"),
    (["parallel.zero_stage=2"], 1, r"parallel.zero_stage: checkpoint 0, this run 2"),
    (["parallel.zero_stage=2", "data.prompts_per_iteration=4"], 2, r"processes: checkpoint 1, this run 2"),
])
def test_resume_refuses_another_setup_before_loading_a_model(lora_run, tiny_wan_dir, monkeypatch, overrides, world,
                                                             message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    topo = Topology(world_size=world)  # the layout, without starting torch.distributed
    monkeypatch.setattr(loop, "init_topology", lambda *a, **k: topo)
    monkeypatch.setattr(loop, "load_adapter", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    with pytest.raises(ConfigError, match=message) as err:
        loop.Trainer(_cfg(lora_run, tiny_wan_dir, *overrides), resume="auto")
    text = str(err.value)
    assert "megaflow export" in text and "model.init_weights" in text and "universal checkpoints" in text


def test_resume_refuses_another_family(lora_run, tiny_wan_dir, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy)
    marker = checkpoint_dir(copy, 1) / COMPLETE_MARKER
    meta = json.loads(marker.read_text())
    meta["family"] = "hunyuan"
    marker.write_text(json.dumps(meta))
    monkeypatch.setattr(loop, "load_adapter", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    with pytest.raises(ConfigError, match=r"model.family: checkpoint hunyuan, this run wan"):
        loop.Trainer(_cfg(copy, tiny_wan_dir), resume="auto")


@pytest.mark.parametrize("lora", [True, False])
def test_a_new_run_starts_from_exported_weights(tmp_path, tiny_wan_dir, lora):
    """`megaflow export` then `model.init_weights`: the new run's trainable weights are the exported
    ones (a full fine-tune's too), so a changed setup can continue where the old run stopped."""
    mode = [] if lora else ["model.lora=false"]
    first = tmp_path / "first"
    loop.Trainer(_cfg(first, tiny_wan_dir, "train.lr=1e-2", *mode), show_progress=False).train()
    exported = export_checkpoint(checkpoint_dir(first, 1), tmp_path / "export")
    trainer = loop.Trainer(_cfg(tmp_path / "second", tiny_wan_dir, f"model.init_weights={exported}", *mode),
                           show_progress=False)
    trained = load_file(str(checkpoint_dir(first, 1) / "trainable.safetensors"))
    now = {n: p for n, p in trainer.adapter.transformer.named_parameters() if p.requires_grad}
    assert now.keys() == trained.keys()
    assert all(torch.equal(now[k], trained[k]) for k in trained)
    fresh = loop.Trainer(_cfg(tmp_path / "third", tiny_wan_dir, *mode), show_progress=False)
    differs = [k for k, p in fresh.adapter.transformer.named_parameters() if p.requires_grad
               and not torch.equal(p, trained[k])]
    assert differs  # the weights really came from the export


def test_init_weights_must_hold_what_the_mode_needs(tmp_path, tiny_wan_dir):
    with pytest.raises(ConfigError, match="has no pytorch_lora_weights.safetensors"):
        loop.Trainer(_cfg(tmp_path, tiny_wan_dir, f"model.init_weights={tmp_path}"))
    with pytest.raises(ConfigError, match="has no transformer"):
        loop.Trainer(_cfg(tmp_path, tiny_wan_dir, f"model.init_weights={tmp_path}", "model.lora=false"))


def test_full_finetune_kl_reference_is_kept_in_the_frozen_dtype(tmp_path, tiny_wan_dir):
    """bf16 full fine-tuning: the trained weights are fp32, the reference copy bf16 except the
    modules diffusers keeps in fp32, exactly as a bf16 `from_pretrained` has them."""
    from diffusers import WanTransformer3DModel

    trainer = loop.Trainer(_cfg(tmp_path, tiny_wan_dir, "model.lora=false", "algorithm.kl_beta=0.1",
                                "train.precision=bf16"), show_progress=False)
    adapter = trainer.adapter
    plain = dict(WanTransformer3DModel.from_pretrained(tiny_wan_dir / "transformer",
                                                       torch_dtype=torch.bfloat16).named_parameters())
    assert {p.dtype for p in adapter.transformer.parameters()} == {torch.float32}
    reference = dict(adapter._reference.named_parameters())
    assert {n: p.dtype for n, p in reference.items()} == {n: p.dtype for n, p in plain.items()}
    assert torch.bfloat16 in {p.dtype for p in reference.values()}
    for name, p in adapter.transformer.named_parameters():
        assert torch.equal(reference[name], p.detach().to(reference[name].dtype)), name
        assert reference[name].data_ptr() != p.data_ptr()
